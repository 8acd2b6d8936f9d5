"""Dice and focal losses with the softmax fused in (``torch.ops.segfast.dice_sums`` /
``focal_loss``): the logits are read in place, and backward saves per-(sample, class) sums (Dice)
or one float per pixel (focal), never a probability tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from segfast.ops._common import (
    INDEX_DTYPES,
    accumulation_dtype,
    check_float_arg,
    check_kernel_available,
    check_reduction,
    check_tensor,
    class_vector,
    entry,
    every_class,
    float_dtypes,
)
from segfast.ops.sigmoid_losses import dice_of_sums, sigmoid_dice_loss, sigmoid_focal_loss


@torch.library.register_fake("segfast::dice_sums")
def _dice_sums_fake(input, target, ignore_index, squared):
    n, c, _ = input.shape
    return input.new_empty((3, n, c), dtype=accumulation_dtype(input.dtype))


@torch.library.register_fake("segfast::dice_sums_backward")
def _dice_sums_backward_fake(grad_sums, input, target, ignore_index, squared):
    return torch.empty_like(input)


@torch.library.register_fake("segfast::focal_loss")
def _focal_fake(input, target, alpha, gamma, reduction, ignore_index):
    n, _, s = input.shape
    loss = input.new_empty((n, s) if reduction == "none" else ())
    return (
        loss,
        input.new_empty((n, s), dtype=accumulation_dtype(input.dtype)),
        input.new_empty((), dtype=accumulation_dtype(input.dtype)),
    )


@torch.library.register_fake("segfast::focal_loss_backward")
def _focal_backward_fake(grad_loss, input, target, alpha, gamma, lse, count, reduction, ignore_index):
    return torch.empty_like(input)


# autograd of dice_sums and focal_loss: csrc/autograd/segmentation_losses.cpp (C++)


def _pixels(op, kernel, input, target):
    """(N, C, S) logits and (N, S) targets, views where possible, after the checks every loss shares;
    ``kernel`` is the segfast op that will run (``dice_loss`` runs ``dice_sums``)."""
    check_tensor(op, "input", input, dtypes=float_dtypes(input))
    check_tensor(op, "target", target, dtypes=INDEX_DTYPES)
    if input.dim() < 2:
        raise ValueError(f"{op}: input must be (N, C, d1, ...) logits, got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ValueError(f"{op}: input has no classes (shape {tuple(input.shape)})")
    if input.shape[1] == 1:  # softmax over one channel is 1 everywhere: loss constant, gradient 0
        raise ValueError(
            f"{op}: input has one channel, but the softmax of one channel is 1 everywhere (the loss would be "
            "constant and its gradient 0); for one foreground class pass mode='binary' (a sigmoid), else give "
            "the logits of every class, background included (C >= 2)"
        )
    pixel_shape = input.shape[:1] + input.shape[2:]
    if target.shape != pixel_shape:
        raise ValueError(f"{op}: target must have shape {tuple(pixel_shape)}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"{op}: target is on {target.device} but input is on {input.device}")
    if input.numel() == 0:
        raise ValueError(f"{op}: empty batch (input shape {tuple(input.shape)})")
    check_kernel_available(op, f"segfast::{kernel}", input)
    n, c = input.shape[:2]
    pixels = math.prod(input.shape[2:])
    return input.reshape(n, c, pixels), target.reshape(n, pixels)


def _background_one_minus(value, classes):
    """MONAI's scalar focal alpha: 1 - alpha for the background class 0, alpha for the others."""
    return torch.cat([1 - value.reshape(1), value.expand(classes - 1)])


def dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str = "multiclass",
    weight: torch.Tensor | float | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss of softmax(input) against one-hot class targets, as MONAI's ``DiceLoss``
    (``softmax=True, to_onehot_y=True``) defines it, with ignore_index; or, with ``mode="binary"`` /
    ``"multilabel"``, of sigmoid(input) against 0 / 1 (or probability) targets of the logits' shape
    (MONAI's ``sigmoid=True``; segfast.ops.sigmoid_losses, where the modes are described).

    For each sample and class (over all samples when ``batch``), over the pixels whose target is
    not ``ignore_index``: I = sum p y, P = sum p (sum p^2 if ``squared_pred``), G = sum y, and
    loss = 1 - (2 I + smooth_nr) / (P + G + smooth_dr).

    Args:
        input: logits (N, C, d1, ...), float32/float64/bfloat16 (float16 on CUDA); the sums
            accumulate in float32 (float64 for float64), so 16-bit inputs at 512x512 cannot overflow.
        target: class indices (N, d1, ...) int64/int32/uint8 in [0, C) or ``ignore_index``
            (multiclass); 0 / 1 or probabilities shaped as the sigmoid modes take them.
        mode: "multiclass" (softmax over C >= 2 classes), "binary" ((N, 1, ...) logits) or
            "multilabel" (a sigmoid per class).
        include_background: keep class 0 in the loss.
        weight: class weights multiplying each class's loss (before dropping the background): a (C,)
            tensor, a sequence of C numbers, or one number for every class (MONAI's rule).
        reduction: "mean" / "sum" over (sample, class) losses, or "none": (N, C') (or (1, C') with batch).

    Backward saves nothing but the caller's logits and targets; it recomputes the softmax.
    """
    if mode != "multiclass":
        options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
        options.update(include_background=include_background, batch=batch, squared_pred=squared_pred)
        return sigmoid_dice_loss(input, target, mode=mode, smooth_nr=smooth_nr, smooth_dr=smooth_dr, **options)
    x, t = _pixels("dice_loss", "dice_sums", input, target)
    check_reduction("dice_loss", reduction)
    smooth_nr = check_float_arg("dice_loss", "smooth_nr", smooth_nr, 0.0)
    smooth_dr = check_float_arg("dice_loss", "smooth_dr", smooth_dr, 0.0)
    weight = class_vector("dice_loss", "weight", weight, x.shape[1], input, every_class)
    if not include_background and x.shape[1] < 2:
        raise ValueError("dice_loss: include_background=False needs at least 2 classes")
    sums = entry("dice_sums")(x, t, ignore_index, bool(squared_pred))
    return dice_of_sums(
        sums, "dice_loss", weight, include_background, batch, smooth_nr, smooth_dr, reduction, input.dtype
    )


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str = "multiclass",
    gamma: float = 2.0,
    alpha: torch.Tensor | float | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017) with the softmax fused in:
    -alpha_t (1 - p_t)^gamma log p_t per pixel, p_t the softmax probability of the target class.
    With ``mode="binary"`` / ``"multilabel"``: torchvision's ``sigmoid_focal_loss`` per element,
    alpha_t BCE (1 - p_t)^gamma with p = sigmoid(x), p_t = p y + (1 - p)(1 - y) and alpha_t =
    alpha y + (1 - alpha)(1 - y) (1 without alpha; torchvision's default is alpha=0.25, segfast's
    None), over the sigmoid modes' targets (segfast.ops.sigmoid_losses).

    Args:
        input: logits (N, C, d1, ...); target: (N, d1, ...) class indices, as ``dice_loss``.
        gamma: focusing parameter >= 0 (0 with no alpha is cross-entropy).
        alpha: class weights alpha_c: a (C,) tensor or a sequence of C numbers; or one number a,
            which weighs the background class 0 by 1 - a and every other class by a (MONAI's rule
            for softmax focal loss); or None. Sigmoid modes: one number for every class (the
            weight of y = 1), or one per class.
        reduction: "mean" (over the non-ignored pixels / elements), "sum", or "none" (target's
            shape; the logits' shape in the sigmoid modes).

    Backward keeps one float per pixel (the log-sum-exp), as cross_entropy.
    """
    if mode != "multiclass":
        return sigmoid_focal_loss(
            input, target, mode=mode, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=reduction
        )
    x, t = _pixels("focal_loss", "focal_loss", input, target)
    check_reduction("focal_loss", reduction)
    gamma = check_float_arg("focal_loss", "gamma", gamma, 0.0)
    alpha = class_vector("focal_loss", "alpha", alpha, x.shape[1], input, _background_one_minus)
    if alpha is not None and alpha.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("focal_loss: alpha must not require grad")
    loss, _, _ = entry("focal_loss")(x, t, alpha, gamma, reduction, ignore_index)
    return loss.reshape(target.shape) if reduction == "none" else loss
