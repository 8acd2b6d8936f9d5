"""Per-pixel softmax cross-entropy (``torch.ops.segfast.cross_entropy``)."""

from __future__ import annotations

import torch
from torch.nn import _reduction

from segfast.ops._common import accumulation_dtype, check_kernel_available, entry

_OP = "cross_entropy"


@torch.library.register_fake("segfast::cross_entropy")
def _cross_entropy_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    n, _, s = input.shape
    loss = input.new_empty((n, s) if reduction == "none" else ())
    lse = input.new_empty((n, s), dtype=accumulation_dtype(input.dtype))
    return loss, lse, input.new_empty((), dtype=accumulation_dtype(input.dtype))


@torch.library.register_fake("segfast::cross_entropy_backward")
def _cross_entropy_backward_fake(
    grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing
):
    return torch.empty_like(input)


# autograd of cross_entropy and cross_entropy_with_grad: csrc/autograd/cross_entropy.cpp (C++)


@torch.library.register_fake("segfast::cross_entropy_with_grad")
def _cross_entropy_with_grad_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    return input.new_empty(()), torch.empty_like(input)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    grad_in_forward: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy`` with the same arguments and results, computed per pixel in one pass.

    Args:
        input: logits (N, C), (N, C, d1, d2, ...) or unbatched (C,); float32, float64,
            bfloat16 or (CUDA) float16 (float32 accumulation). NCHW and channels_last are read in place.
        target: class indices (N,), (N, d1, ...) or () as int64, int32 or uint8, each in [0, C)
            or equal to ignore_index; or class probabilities of input's shape and dtype.
        weight: (C,) class weights of input's dtype, or None.
        ignore_index: class-index target value that contributes neither loss nor gradient
            (with probability targets only a negative value is accepted, as in torch).
        reduction: "none" (loss of target's shape), "mean" (weighted mean over non-ignored
            pixels, torch's definition) or "sum".
        label_smoothing: in [0, 1], torch's definition.

        grad_in_forward: (segfast only) compute the gradient during the forward, as
            Liger-Kernel does for LLM losses: backward is then one multiply, and autograd keeps
            the gradient instead of the logits and the log-sum-exp, so the logits can be freed
            right after the loss. Needs reduction "mean" or "sum" and a target that does not
            require grad; the forward does the work of forward + backward.

    By default backward recomputes the softmax from the logits and one saved float per pixel
    (the log-sum-exp); no log-softmax tensor is stored. A class index outside [0, C) raises
    IndexError.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    # segfast::cross_entropy_loss checks every argument (csrc/composite/cross_entropy.cpp) and views
    # the logits as (N, C, S), in C++: an eager call pays for its checks once
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{_OP}: input and target must be Tensors, got {type(input).__name__}, {type(target).__name__}")
    if not input.is_cpu:
        check_kernel_available(_OP, "segfast::cross_entropy", input)
    return entry("cross_entropy_loss")(
        input, target, weight, reduction, ignore_index, label_smoothing, bool(grad_in_forward)
    )
