"""Per-pixel softmax cross-entropy (``torch.ops.segfast.cross_entropy``)."""

from __future__ import annotations

import math

import torch
from torch.nn import _reduction

from segfast.ops._common import (
    INDEX_DTYPES,
    accumulation_dtype,
    check_float_arg,
    check_kernel_available,
    check_reduction,
    check_same,
    check_tensor,
    float_dtypes,
    is_int,
)

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


def _setup_context(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing = inputs
    _, lse, total_weight = output
    # lse and total_weight are internal: no zero-filled gradients for them
    ctx.mark_non_differentiable(lse, total_weight)
    ctx.set_materialize_grads(False)
    # logits and target are the caller's tensors; the only new state is one float per pixel
    ctx.save_for_backward(input, target, weight, lse, total_weight)
    ctx.args = (reduction, ignore_index, label_smoothing)


def _backward(ctx, grad_loss, _grad_lse, _grad_total_weight):
    input, target, weight, lse, total_weight = ctx.saved_tensors
    reduction, ignore_index, label_smoothing = ctx.args
    grad_input = grad_target = None
    if grad_loss is None:
        return (None,) * 6
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.segfast.cross_entropy_backward(
            grad_loss, input, target, weight, lse, total_weight, *ctx.args
        )
    if ctx.needs_input_grad[1]:  # probability targets: d loss / d q_c = -(1 - eps) w_c log_softmax_c
        per_pixel = grad_loss / total_weight if reduction == "mean" else grad_loss
        per_pixel = per_pixel.unsqueeze(1) if reduction == "none" else per_pixel
        log_prob = input - lse.unsqueeze(1).to(input.dtype)
        class_weight = 1.0 if weight is None else weight.view(1, -1, 1)
        grad_target = -(1.0 - label_smoothing) * class_weight * log_prob * per_pixel
    return grad_input, grad_target, None, None, None, None


torch.library.register_autograd("segfast::cross_entropy", _backward, setup_context=_setup_context)


@torch.library.register_fake("segfast::cross_entropy_with_grad")
def _cross_entropy_with_grad_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    return input.new_empty(()), torch.empty_like(input)


def _with_grad_setup_context(ctx, inputs, output):
    _, grad_input = output
    ctx.mark_non_differentiable(grad_input)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_input)  # the only state: neither logits nor log-sum-exp


def _with_grad_backward(ctx, grad_loss, _grad_grad_input):
    if grad_loss is None:
        return (None,) * 6
    (grad_input,) = ctx.saved_tensors
    return (grad_input * grad_loss.to(grad_input.dtype),) + (None,) * 5


torch.library.register_autograd(
    "segfast::cross_entropy_with_grad", _with_grad_backward, setup_context=_with_grad_setup_context
)


def _as_pixels(input, target, prob):
    """(N, C, S) logits and (N, S) indices / (N, C, S) probabilities, views where possible."""
    if input.dim() == 1:  # unbatched (C,)
        return input.view(1, -1, 1), (target.view(1, -1, 1) if prob else target.view(1, 1))
    if input.dim() == 2:  # (N, C): samples become the pixels of one image, no copy
        return input.t().unsqueeze(0), (target.t().unsqueeze(0) if prob else target.unsqueeze(0))
    n, c = input.shape[:2]
    pixels = math.prod(input.shape[2:])
    return input.reshape(n, c, pixels), (target.reshape(n, c, pixels) if prob else target.reshape(n, pixels))


def _check_weight(input, weight, classes):
    if weight is None:
        return
    check_tensor(_OP, "weight", weight, dims=(1,))
    if weight.shape[0] != classes:
        raise ValueError(f"{_OP}: weight must have shape ({classes},), got {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{_OP}: weight must not require grad (torch does not differentiate it either)")
    check_same(_OP, "input", input, weight=weight)


def _check_target(input, target, prob, ignore_index):
    """Probabilities of the input's shape, dtype and device, or class indices of its pixel shape."""
    if prob:
        check_same(_OP, "input", input, target=target)
        if target.shape != input.shape:
            raise ValueError(
                f"{_OP}: probability target must have input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index >= 0:  # torch's rule: a negative ignore_index is accepted and has no effect
            raise ValueError(
                f"{_OP}: ignore_index={ignore_index} is not supported for probability targets (as in torch)"
            )
        return
    check_tensor(_OP, "target", target, dtypes=INDEX_DTYPES)
    if target.shape == input.shape:  # torch reads a target of the input's shape as probabilities
        raise TypeError(
            f"{_OP}: a target of the input's shape {tuple(input.shape)} holds class probabilities "
            f"and must be floating point, got {target.dtype}"
        )
    if target.device != input.device:
        raise ValueError(f"{_OP}: target is on {target.device} but input is on {input.device}")
    pixel_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != pixel_shape:
        raise ValueError(
            f"{_OP}: class-index target must have shape {tuple(pixel_shape)} for input "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )


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
    check_tensor(_OP, "input", input, dtypes=float_dtypes(input))
    check_tensor(_OP, "target", target)
    check_kernel_available(_OP, "segfast::cross_entropy", input)
    if input.dim() == 0:
        raise ValueError(f"{_OP}: input must be (C,), (N, C) or (N, C, d1, ...), got a 0-D tensor")
    check_reduction(_OP, reduction)
    label_smoothing = check_float_arg(_OP, "label_smoothing", label_smoothing, 0.0, 1.0)
    if not is_int(ignore_index):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {ignore_index!r}")
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if classes == 0:
        raise ValueError(f"{_OP}: input has no classes (shape {tuple(input.shape)})")
    _check_weight(input, weight, classes)
    prob = target.is_floating_point()
    _check_target(input, target, prob, ignore_index)
    if reduction == "mean" and input.numel() == 0:
        raise ValueError(
            f"{_OP}: the mean over an empty batch is undefined (input shape {tuple(input.shape)}); "
            "torch returns NaN here"
        )

    pixel_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    logits, pixel_target = _as_pixels(input, target, prob)
    if grad_in_forward:
        if reduction == "none":
            raise ValueError(f"{_OP}: grad_in_forward needs reduction 'mean' or 'sum', got 'none'")
        if prob and target.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: grad_in_forward computes no gradient for a target that requires grad")
        if not (input.requires_grad and torch.is_grad_enabled()):
            grad_in_forward = False  # nothing will call backward: the plain forward is cheaper
    if grad_in_forward:
        loss, _ = torch.ops.segfast.cross_entropy_with_grad(
            logits, pixel_target, weight, reduction, ignore_index, label_smoothing
        )
        return loss
    loss, _, _ = torch.ops.segfast.cross_entropy(logits, pixel_target, weight, reduction, ignore_index, label_smoothing)
    if reduction != "none":
        return loss
    return loss.reshape(pixel_shape)
