#pragma once
// Dispatcher helpers: what the C++ autograd kernels (csrc/autograd/<family>.cpp, Autograd key), the
// composite ops and the typed pybind11 entries (csrc/bindings.cpp) share to call registered ops.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace segfast {

// The names the autograd files write their Functions with.
using OptionalTensor = const std::optional<at::Tensor>&;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The registered op `name` ("segfast::<op>") with the C++ signature of its schema, found once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The registered op `Name` ("segfast::<op>"), found on first use: not at static initialisation,
// which may run before the schema is registered. Bind it to a name:
//   constexpr char kFocal[] = "segfast::focal_loss";
//   constexpr auto focal_op = registered_op<FocalSignature, kFocal>;
template <typename Signature, const char* Name>
const c10::TypedOperatorHandle<Signature>& registered_op() {
  static const auto op = op_handle<Signature>(Name);
  return op;
}

// An undefined saved tensor as the optional argument it was given as.
inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The owning type of an op argument type, for whoever keeps arguments past the call (an autograd
// context) or takes them from Python (pybind11 cannot hold non-owning types).
template <typename T>
struct Owned {
  using type = T;
};
template <>
struct Owned<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};
template <>
struct Owned<c10::string_view> {
  using type = std::string;
};
template <>
struct Owned<const std::optional<at::Tensor>&> {
  using type = std::optional<at::Tensor>;
};

// The Autograd kernel's path when no input needs a gradient: the op below autograd, without the
// Function's bookkeeping (a third of a tiny call's cost).
template <typename Signature, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// Whether an op argument is a tensor that requires grad (arguments of other types never do).
inline bool requires_grad_arg(const at::Tensor& t) {
  return t.defined() && t.requires_grad();
}
inline bool requires_grad_arg(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad_arg(*t);
}
template <typename T>
bool requires_grad_arg(const T&) {
  return false;
}

// A Function's outputs as the op returns them: one tensor, or a tuple of them.
template <typename Return>
struct FunctionOutputs {
  static at::Tensor from(const torch::autograd::variable_list& out) { return out[0]; }
};
template <typename... T>
struct FunctionOutputs<std::tuple<T...>> {
  static std::tuple<T...> from(const torch::autograd::variable_list& out) {
    return from(out, std::index_sequence_for<T...>{});
  }
  template <size_t... I>
  static std::tuple<T...> from(const torch::autograd::variable_list& out, std::index_sequence<I...>) {
    return {out[I]...};
  }
};

// The Autograd-key kernel of op `Name` (of C++ signature Signature) through the autograd Function
// Fn: when no tensor argument requires grad there is no graph to record, and the op runs below
// autograd directly. Register `&AutogradKernel<Fn, Signature, kName>::call`.
template <typename Fn, typename Signature, const char* Name>
struct AutogradKernel;
template <typename Fn, typename Return, typename... Args, const char* Name>
struct AutogradKernel<Fn, Return(Args...), Name> {
  static Return call(Args... args) {
    if (!(requires_grad_arg(args) || ...)) {
      return call_below_autograd(registered_op<Return(Args...), Name>(), args...);
    }
    return FunctionOutputs<Return>::from(Fn::apply(args...));
  }
};

}  // namespace segfast
