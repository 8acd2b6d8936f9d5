// The pybind11 module _C: loading it registers every op (TORCH_LIBRARY in ops.cpp and the kernels);
// pybind11 itself carries helpers only: build_info, and for each public op a typed entry that calls
// the registered op through the dispatcher (autograd, fake and backend kernels as for torch.ops),
// without torch.ops' Python-side argument parsing: about 3 us less per call, a third of a tiny op's
// cost. segfast/ops/*.py call these in eager mode and torch.ops.segfast.* where dynamo traces.
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include "autograd/autograd.h"
#include "cpu/conv2d_act_direct.h"
#include "cpu/dispatch.h"

namespace {

// How many threads at::parallel_for really uses here: 1 when the module was built without
// -fopenmp, whatever at::get_num_threads() says.
int64_t parallel_for_threads() {
  const int64_t n = 4 * at::get_num_threads();
  std::vector<int64_t> thread_of(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) thread_of[i] = at::get_thread_num();
  });
  std::sort(thread_of.begin(), thread_of.end());
  return std::unique(thread_of.begin(), thread_of.end()) - thread_of.begin();
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = SEGFAST_TORCH_VERSION;
  info["compiler"] = SEGFAST_CXX_COMPILER;
#ifdef SEGFAST_WITH_CUDA
  info["cuda"] = true;
  info["nvcc"] = SEGFAST_NVCC_VERSION;
  pybind11::list archs;
  std::string_view list = SEGFAST_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX"
  while (!list.empty()) {
    const size_t end = std::min(list.find_first_of("; "), list.size());
    if (end > 0) archs.append(std::string(list.substr(0, end)));
    list.remove_prefix(std::min(end + 1, list.size()));
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["nvcc"] = pybind11::none();
  info["cuda_archs"] = pybind11::list();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_for_threads"] = parallel_for_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

template <typename Signature>
struct OpEntry;

template <typename Return, typename... Args>
struct OpEntry<Return(Args...)> {
  // _C.<name>(...) calls segfast::<name> with the signature of its schema
  static void bind(pybind11::module& m, const char* name) {
    // pybind11 cannot hold non-owning argument types: each is taken as the owning type it converts from
    const auto op = segfast::op_handle<Return(Args...)>((std::string("segfast::") + name).c_str());
    m.def(name, [op](typename segfast::Owned<Args>::type... args) -> Return { return op.call(args...); });
  }
};

namespace dispatch = segfast::cpu::dispatch;

dispatch::Choice choice_named(const std::string& name) {
  for (int i = 0; i < dispatch::kChoices; ++i) {
    const auto choice = static_cast<dispatch::Choice>(i);
    if (name == dispatch::choice_name(choice)) return choice;
  }
  throw pybind11::value_error("unknown dispatch choice '" + name + "'");
}

// _C.dispatch_force(choice, path): "segfast" / "vendor" forces a CPU choice point's path, None
// returns it to the table; _C.dispatch_choose(...) is the table's answer for one layer.
void bind_dispatch(pybind11::module& m) {
  m.def(
      "dispatch_force",
      [](const std::string& choice, const std::optional<std::string>& path) {
        if (path && *path != "segfast" && *path != "vendor") {
          throw pybind11::value_error("path must be 'segfast', 'vendor' or None, got '" + *path + "'");
        }
        dispatch::force(
            choice_named(choice),
            path ? std::optional(*path == "segfast" ? dispatch::Path::Segfast : dispatch::Path::Vendor) : std::nullopt);
      },
      pybind11::arg("choice"), pybind11::arg("path"));
  m.def(
      "dispatch_choose",
      [](const std::string& choice, at::ScalarType dtype, int64_t kernel, int64_t in_channels, int64_t out_channels,
         int64_t pixels, bool input_grad) {
        const dispatch::ConvKey key{dtype, kernel, in_channels, out_channels, pixels, input_grad};
        return dispatch::choose(choice_named(choice), key) == dispatch::Path::Segfast ? "segfast" : "vendor";
      },
      pybind11::arg("choice"), pybind11::arg("dtype"), pybind11::arg("kernel"), pybind11::arg("in_channels"),
      pybind11::arg("out_channels"), pybind11::arg("pixels"), pybind11::arg("input_grad"));
}

using Tensor = at::Tensor;
using OptionalTensor = const std::optional<at::Tensor>&;
using Ints = at::IntArrayRef;
using Str = c10::string_view;

void bind_ops(pybind11::module& m) {
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, Ints, Ints, Ints, int64_t, Str,
                                     double)>::bind(m, "conv2d_act");
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, Str, double)>::bind(m, "linear_act");
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, Ints, Ints, Ints, Ints, bool, bool)>::bind(m, "max_pool2d");
  OpEntry<Tensor(const Tensor&, Ints, Ints, Ints, bool, bool, std::optional<int64_t>)>::bind(m, "avg_pool2d");
  OpEntry<Tensor(const Tensor&, const Tensor&, OptionalTensor, Str, int64_t, double, bool)>::bind(m,
                                                                                                  "cross_entropy_loss");
  OpEntry<Tensor(const Tensor&, const Tensor&, int64_t, int64_t)>::bind(m, "confusion_matrix");
  OpEntry<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>::bind(m, "softmax_stats");
  OpEntry<Tensor(const Tensor&, const Tensor&, int64_t, bool)>::bind(m, "dice_sums");
  OpEntry<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, double, Str, int64_t)>::bind(
      m, "focal_loss");
  OpEntry<Tensor(const Tensor&, const Tensor&, int64_t, bool)>::bind(m, "sigmoid_sums");
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, OptionalTensor, double, Str, int64_t)>::bind(
      m, "sigmoid_focal_loss");
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                                     OptionalTensor, OptionalTensor, std::optional<at::ScalarType>,
                                     std::optional<at::MemoryFormat>)>::bind(m, "affine_augment");
  OpEntry<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, OptionalTensor, OptionalTensor, OptionalTensor,
                                             OptionalTensor, bool, double, double, Str, double,
                                             OptionalTensor)>::bind(m, "batch_norm_act");
  OpEntry<std::tuple<Tensor, Tensor>(const Tensor&, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor,
                                     bool, double, double, Str, double, OptionalTensor)>::bind(m, "batch_norm_act_");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  bind_ops(m);
  bind_dispatch(m);
  m.doc() = "segfast C++ operators (registered as torch.ops.segfast.*) and build information";
  m.def("build_info", &build_info, "How this segfast extension was built.");
  // the layers segfast's direct convolution kernel can serve (cpu/conv2d_act_direct.h): torch.compile
  // keeps conv2d_act for them where it hands inductor other inference layers (segfast/ops/conv2d_act.py)
  m.attr("direct_conv_max_input_channels") = segfast::cpu::direct::kMaxInputChannels;
  m.attr("direct_conv_max_kernel") = segfast::cpu::direct::kMaxKernel;
}
