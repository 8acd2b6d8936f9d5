"""Binary and multi-label segmentation losses with the sigmoid fused in
(``torch.ops.segfast.sigmoid_sums`` / ``sigmoid_focal_loss``): every class is an independent
sigmoid, the logits are read in place, and backward saves nothing but the caller's tensors.

Modes, as segmentation_models_pytorch names them: ``"binary"`` takes (N, 1, d1, ...) logits and a
target (N, d1, ...) or (N, 1, d1, ...); ``"multilabel"`` takes (N, C, d1, ...) logits and a target
of the same shape. Targets are 0 / 1 (int64, int32, uint8 or bool) or probabilities (floating);
elements whose target equals ``ignore_index`` are left out of every sum."""

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

SIGMOID_MODES = ("binary", "multilabel")


@torch.library.register_fake("segfast::sigmoid_sums")
def _sigmoid_sums_fake(input, target, ignore_index, squared):
    n, c, _ = input.shape
    return input.new_empty((5, n, c), dtype=accumulation_dtype(input.dtype))


@torch.library.register_fake("segfast::sigmoid_sums_backward")
def _sigmoid_sums_backward_fake(grad_sums, input, target, ignore_index, squared):
    return torch.empty_like(input)


@torch.library.register_fake("segfast::sigmoid_focal_loss")
def _sigmoid_focal_fake(input, target, alpha, gamma, reduction, ignore_index):
    loss = torch.empty_like(input) if reduction == "none" else input.new_empty(())
    return loss, input.new_empty((), dtype=accumulation_dtype(input.dtype))


@torch.library.register_fake("segfast::sigmoid_focal_loss_backward")
def _sigmoid_focal_backward_fake(grad_loss, input, target, alpha, gamma, count, reduction, ignore_index):
    return torch.empty_like(input)


# autograd of sigmoid_sums and sigmoid_focal_loss: csrc/autograd/sigmoid_losses.cpp (C++)


def sigmoid_elements(op: str, kernel: str, mode: str, input: torch.Tensor, target: torch.Tensor):
    """(N, C, S) logits and a target of the same shape and layout kind (views where possible),
    after the checks every sigmoid loss shares; ``kernel`` is the segfast op that will run."""
    check_tensor(op, "input", input, dtypes=float_dtypes(input))
    if mode not in SIGMOID_MODES:
        raise ValueError(f"{op}: mode must be 'multiclass', 'binary' or 'multilabel', got {mode!r}")
    check_tensor(op, "target", target, dtypes=(*INDEX_DTYPES, torch.bool, *float_dtypes(input)))
    if input.dim() < 2:
        raise ValueError(f"{op}: input must be (N, C, d1, ...) logits, got shape {tuple(input.shape)}")
    if mode == "binary":
        if input.shape[1] != 1:
            raise ValueError(
                f"{op}: mode='binary' takes (N, 1, ...) logits, got shape {tuple(input.shape)}; for C classes "
                "use mode='multilabel' (a sigmoid each) or mode='multiclass' (softmax)"
            )
        if target.shape == input.shape[:1] + input.shape[2:]:
            target = target.unsqueeze(1)
    if target.shape != input.shape:
        raise ValueError(f"{op}: target must have the logits' shape {tuple(input.shape)}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"{op}: target is on {target.device} but input is on {input.device}")
    if input.numel() == 0:
        raise ValueError(f"{op}: empty batch (input shape {tuple(input.shape)})")
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    elif target.is_floating_point() and target.dtype != input.dtype:
        target = target.to(input.dtype)
    if target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: target must not require grad")
    check_kernel_available(op, f"segfast::{kernel}", input)
    n, c = input.shape[:2]
    elements = math.prod(input.shape[2:])
    return input.reshape(n, c, elements), target.reshape(n, c, elements)


def sigmoid_sums(x: torch.Tensor, t: torch.Tensor, ignore_index: int, squared: bool) -> torch.Tensor:
    """(5, N, C) sums of (N, C, S) logits and targets: p y, p (p^2 if ``squared``), y, BCE, count."""
    return entry("sigmoid_sums")(x, t, ignore_index, bool(squared))


def dice_of_sums(sums, op, weight, include_background, batch, smooth_nr, smooth_dr, reduction, dtype):
    """The Dice loss from (inter, pred, truth) sums of shape (N, C), as MONAI's DiceLoss."""
    inter, pred, truth = sums[0], sums[1], sums[2]
    if batch:
        inter, pred, truth = inter.sum(0, keepdim=True), pred.sum(0, keepdim=True), truth.sum(0, keepdim=True)
    loss = 1 - (2 * inter + smooth_nr) / (pred + truth + smooth_dr)
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if not include_background:
        if loss.shape[1] < 2:
            raise ValueError(f"{op}: include_background=False needs at least 2 classes")
        loss = loss[:, 1:]
    loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    return loss.to(dtype)


def sigmoid_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str,
    weight: torch.Tensor | float | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """:func:`segfast.ops.dice_loss` for ``mode="binary"`` / ``"multilabel"``: p = sigmoid(x)."""
    x, t = sigmoid_elements("dice_loss", "sigmoid_sums", mode, input, target)
    check_reduction("dice_loss", reduction)
    smooth_nr = check_float_arg("dice_loss", "smooth_nr", smooth_nr, 0.0)
    smooth_dr = check_float_arg("dice_loss", "smooth_dr", smooth_dr, 0.0)
    weight = class_vector("dice_loss", "weight", weight, x.shape[1], input, every_class)
    sums = sigmoid_sums(x, t, ignore_index, squared_pred)
    return dice_of_sums(
        sums, "dice_loss", weight, include_background, batch, smooth_nr, smooth_dr, reduction, input.dtype
    )


def dice_bce_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str = "binary",
    lambda_dice: float = 1.0,
    lambda_bce: float = 1.0,
    weight: torch.Tensor | float | Sequence[float] | None = None,
    ignore_index: int = -100,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """``lambda_dice * Dice + lambda_bce * BCE`` of sigmoid logits, both from one pass over the
    elements (one ``sigmoid_sums`` call).

    Dice as :func:`segfast.ops.dice_loss` with the same ``mode`` (mean over (sample, class) losses);
    BCE as ``F.binary_cross_entropy_with_logits(input, target)``: the mean over the elements whose
    target is not ``ignore_index``. ``weight`` weighs each class's Dice loss only.

    Args:
        input: logits (N, 1, d1, ...) for ``mode="binary"``, (N, C, d1, ...) for ``"multilabel"``;
            float32/float64/bfloat16 (float16 on CUDA), sums accumulated in float32 (float64).
        target: (N, d1, ...) or the logits' shape for binary, the logits' shape for multilabel:
            0 / 1 (int64, int32, uint8, bool) or probabilities.

    Returns a 0-D tensor of the logits' dtype. Backward saves nothing but the caller's tensors.
    """
    x, t = sigmoid_elements("dice_bce_loss", "sigmoid_sums", mode, input, target)
    lambda_dice = check_float_arg("dice_bce_loss", "lambda_dice", lambda_dice, 0.0)
    lambda_bce = check_float_arg("dice_bce_loss", "lambda_bce", lambda_bce, 0.0)
    smooth_nr = check_float_arg("dice_bce_loss", "smooth_nr", smooth_nr, 0.0)
    smooth_dr = check_float_arg("dice_bce_loss", "smooth_dr", smooth_dr, 0.0)
    weight = class_vector("dice_bce_loss", "weight", weight, x.shape[1], input, every_class)
    sums = sigmoid_sums(x, t, ignore_index, squared_pred)
    dice = dice_of_sums(
        sums, "dice_bce_loss", weight, include_background, batch, smooth_nr, smooth_dr, "mean", sums.dtype
    )
    bce = sums[3].sum() / sums[4].sum()
    return (lambda_dice * dice + lambda_bce * bce).to(input.dtype)


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str,
    gamma: float = 2.0,
    alpha: torch.Tensor | float | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`segfast.ops.focal_loss` for ``mode="binary"`` / ``"multilabel"``: torchvision's
    ``sigmoid_focal_loss`` per element, alpha a number (every class) or one per class."""
    x, t = sigmoid_elements("focal_loss", "sigmoid_focal_loss", mode, input, target)
    check_reduction("focal_loss", reduction)
    gamma = check_float_arg("focal_loss", "gamma", gamma, 0.0)
    alpha = class_vector("focal_loss", "alpha", alpha, x.shape[1], input, every_class)
    if alpha is not None and alpha.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("focal_loss: alpha must not require grad")
    loss, _ = entry("sigmoid_focal_loss")(x, t, alpha, gamma, reduction, ignore_index)
    if reduction != "none":
        return loss
    return loss.reshape(input.shape)
