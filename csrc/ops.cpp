// The segfast operator library: every op's schema, and nothing else. Kernels register per backend
// beside their family: csrc/cpu/<family>.cpp (CPU), csrc/cuda/<family>.cu (CUDA),
// csrc/composite/<family>.cpp (ops built from other segfast ops, any backend). Autograd is C++ in
// csrc/autograd/<family>.cpp (Autograd key) or, for the families not moved yet, Python beside the
// fake kernels in segfast/ops/<family>.py; csrc/bindings.cpp is the pybind11 module (helpers only).
#include <torch/library.h>

// segfast; the CUDA simulation's test module compiles this file again for `segfast_sim`
// (csrc/cuda/launch.cuh). The indirection expands the name before TORCH_LIBRARY pastes it.
#ifndef SEGFAST_OPS_NAMESPACE
#define SEGFAST_OPS_NAMESPACE segfast
#endif
#define SEGFAST_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

SEGFAST_TORCH_LIBRARY(SEGFAST_OPS_NAMESPACE, m) {
  // conv2d + bias + activation. Returns (output, saved): `saved` is the pre-activation when the
  // activation's derivative needs it (silu, gelu, leaky_relu with a negative slope), else empty.
  m.def(
      "conv2d_act(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str activation, float negative_slope) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); a gradient not asked for in output_mask is empty.
  m.def(
      "conv2d_act_backward(Tensor grad_output, Tensor saved, Tensor input, Tensor weight, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, "
      "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // linear + bias + activation on (*, in_features) input; (output, saved) as conv2d_act.
  m.def(
      "linear_act(Tensor input, Tensor weight, Tensor? bias, str activation, float negative_slope) "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_act_backward(Tensor grad_output, Tensor saved, Tensor input, Tensor weight, str activation, "
      "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Max pooling. Returns (output, argmax): argmax holds torch's flat int64 indices when
  // return_indices, else the compact offset inside the window (uint8, int32 past 256 elements).
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode, bool return_indices) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor argmax, SymInt[4] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad_output, SymInt[4] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
      "int? divisor_override) -> Tensor");

  // Per-pixel softmax cross-entropy on (N, C, S) logits, S = flattened spatial dims. `target` is
  // (N, S) class indices or (N, C, S) probabilities. Returns (loss, lse, total_weight): the
  // per-pixel log-sum-exp (float32, float64 for float64 logits) is all that backward needs.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, str reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, str reduction, int ignore_index, "
      "float label_smoothing) -> Tensor");
  // F.cross_entropy's face: (C,), (N, C) or (N, C, d1, ...) logits, every argument checked, the
  // gradient-in-forward mode when asked for and a gradient will be needed. Built from the ops here
  // (csrc/composite/cross_entropy.cpp); the loss has the target's shape for reduction "none".
  m.def(
      "cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, str reduction, int ignore_index, "
      "float label_smoothing, bool grad_in_forward) -> Tensor");
  // The gradient-in-forward mode (reduction mean or sum): returns (loss, d loss / d input), so
  // that backward is one multiply and keeps neither the logits nor the log-sum-exp alive.
  m.def(
      "cross_entropy_with_grad(Tensor input, Tensor target, Tensor? weight, str reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor, Tensor)");

  // Segmentation metrics: the (num_classes, num_classes) int64 confusion matrix, [true, predicted],
  // of (N, C, S) logits (argmax over C, fused) or (N, S) predicted classes against (N, S) targets.
  m.def("confusion_matrix(Tensor input, Tensor target, int num_classes, int ignore_index) -> Tensor");

  // What a prediction says of itself, per pixel of (N, C, S) logits, in one read: (argmax int64
  // (N, S), max softmax probability (N, S), softmax entropy (N, S) in nats), the last two in the
  // logits' dtype. Not differentiable.
  m.def("softmax_stats(Tensor input) -> (Tensor, Tensor, Tensor)");

  // Segmentation losses on (N, C, S) logits and (N, S) class indices, softmax fused in.
  // dice_sums: per (sample, class) over the non-ignored pixels, (3, N, C) float32 (float64 for
  // float64): sum p*y, sum p (p^2 if squared), sum y; the Dice formula itself is Python math on these.
  m.def("dice_sums(Tensor input, Tensor target, int ignore_index, bool squared) -> Tensor");
  m.def(
      "dice_sums_backward(Tensor grad_sums, Tensor input, Tensor target, int ignore_index, bool squared) "
      "-> Tensor");
  // focal_loss: -alpha_t (1 - p_t)^gamma log p_t per pixel; returns (loss, lse, count) like
  // cross_entropy, count = the non-ignored pixels (the mean's divisor).
  m.def(
      "focal_loss(Tensor input, Tensor target, Tensor? alpha, float gamma, str reduction, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "focal_loss_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? alpha, float gamma, "
      "Tensor lse, Tensor count, str reduction, int ignore_index) -> Tensor");

  // Sigmoid (binary and multi-label) losses on (N, C, S) logits and a target of the same shape:
  // probabilities of the logits' dtype, or 0 / 1 as int64, int32 or uint8; elements whose target
  // equals ignore_index are left out. sigmoid_sums: per (sample, class), (5, N, C) float32 (float64
  // for float64): sum p*y, sum p (p^2 if squared), sum y, sum of BCE-with-logits, count of elements;
  // Dice and BCE are Python math on these.
  m.def("sigmoid_sums(Tensor input, Tensor target, int ignore_index, bool squared) -> Tensor");
  m.def(
      "sigmoid_sums_backward(Tensor grad_sums, Tensor input, Tensor target, int ignore_index, bool squared) "
      "-> Tensor");
  // sigmoid_focal_loss: torchvision's sigmoid_focal_loss per element, alpha per class (or none);
  // returns (loss, count), count = the elements left in (the mean's divisor).
  m.def(
      "sigmoid_focal_loss(Tensor input, Tensor target, Tensor? alpha, float gamma, str reduction, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? alpha, float gamma, "
      "Tensor count, str reduction, int ignore_index) -> Tensor");

  // Joint image + mask augmentation: per sample, the affine map theta (N, 2, 3), from output to
  // input coordinates normalised to [-1, 1] (F.affine_grid's convention, align_corners=False),
  // samples the (N, C, H, W) image bilinearly (zeros outside, as F.grid_sample) and the (N, H, W)
  // mask at the nearest pixel (ignore_index outside), into (out_h, out_w), in one pass. Images are
  // floating or uint8 (read as fractions of 255); the same pass applies per-sample contrast and
  // brightness, color (N, 2), clamped to [0, 1], and per-channel normalisation, normalize (2, C)
  // = (mean, std), and writes out_dtype in out_memory_format (common/augment.h: SampleColor).
  m.def(
      "affine_augment(Tensor image, Tensor mask, Tensor theta, int out_h, int out_w, int ignore_index, "
      "Tensor? color=None, Tensor? normalize=None, ScalarType? out_dtype=None, MemoryFormat? out_memory_format=None) "
      "-> (Tensor, Tensor)");

  // act(BatchNorm(input) [+ residual]), F.batch_norm's arguments. Training: batch statistics, and
  // running_mean / running_var (when given) updated in place with `momentum` (unbiased variance).
  // Returns (output, mean, invstd): the statistics the output was normalised with (the running
  // ones in eval mode), saved for backward with the input.
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, float negative_slope, "
      "Tensor? residual) -> (Tensor, Tensor, Tensor)");
  // InPlace-ABN: the same, the output overwriting the input; returns (mean, invstd). Needs an
  // invertible activation ("none", "leaky_relu" with a positive slope) and a weight without zeros.
  m.def(
      "batch_norm_act_(Tensor(a!) input, Tensor? weight, Tensor? bias, Tensor(b!)? running_mean, "
      "Tensor(c!)? running_var, bool training, float momentum, float eps, str activation, float negative_slope, "
      "Tensor? residual) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_residual, grad_weight, grad_bias); one not asked for in output_mask is empty.
  // `saved` is the input, or with from_output (InPlace-ABN) the output, which backward inverts.
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor saved, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, Tensor? residual, bool training, str activation, float negative_slope, bool from_output, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
