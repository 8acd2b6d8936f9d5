"""The confusion matrix of a segmentation (``torch.ops.segfast.confusion_matrix``)."""

from __future__ import annotations

import math

import torch

from segfast.ops._common import INDEX_DTYPES, check_kernel_available, check_tensor, entry, is_int

_OP = "confusion_matrix"


@torch.library.register_fake("segfast::confusion_matrix")
def _confusion_matrix_fake(input, target, num_classes, ignore_index):
    return input.new_empty((num_classes, num_classes), dtype=torch.int64)


def confusion_matrix(
    input: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Counts of (true class, predicted class) over every pixel whose target is not ignore_index.

    Args:
        input: logits (N, C, d1, ...) of any float dtype the ops take (the prediction is their
            argmax over C, computed in the same pass, torch.argmax's rule for ties and NaN), or
            predicted classes (N, d1, ...) as int64, int32 or uint8.
        target: (N, d1, ...) class indices (int64, int32, uint8) in [0, num_classes) or ignore_index.
        num_classes: C; required for predicted classes, taken from the logits otherwise.

    Returns:
        int64 (num_classes, num_classes): entry [t, p] counts pixels of class t predicted as p.
        A class index out of range raises IndexError.
    """
    check_tensor(_OP, "input", input)
    check_tensor(_OP, "target", target, dtypes=INDEX_DTYPES)
    logits = input.is_floating_point()
    if logits:
        if input.dim() < 2:
            raise ValueError(f"{_OP}: logits must be (N, C, d1, ...), got shape {tuple(input.shape)}")
        if num_classes is not None and num_classes != input.shape[1]:
            raise ValueError(f"{_OP}: num_classes={num_classes} but the logits have {input.shape[1]} classes")
        num_classes = input.shape[1]
        pixel_shape = input.shape[:1] + input.shape[2:]
    else:
        check_tensor(_OP, "input", input, dtypes=INDEX_DTYPES)
        if num_classes is None:
            raise ValueError(f"{_OP}: num_classes is required with predicted classes")
        pixel_shape = input.shape
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"{_OP}: num_classes must be a positive int, got {num_classes!r}")
    if target.shape != pixel_shape:
        raise ValueError(f"{_OP}: target must have shape {tuple(pixel_shape)}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"{_OP}: target is on {target.device} but input is on {input.device}")
    check_kernel_available(_OP, "segfast::confusion_matrix", input)
    n = pixel_shape[0] if len(pixel_shape) else 1
    pixels = math.prod(pixel_shape[1:])
    flat_target = target.reshape(n, pixels)
    flat_input = input.reshape(n, num_classes, pixels) if logits else input.reshape(n, pixels)
    return entry("confusion_matrix")(flat_input.detach(), flat_target, num_classes, ignore_index)
