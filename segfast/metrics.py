"""Segmentation metrics from a confusion matrix computed by segfast's fused argmax + bincount op."""

from __future__ import annotations

import torch
import torch.distributed as dist

from segfast.ops.metrics import confusion_matrix

__all__ = ["SegmentationMetrics", "confusion_matrix"]


class SegmentationMetrics:
    """Accumulates the confusion matrix over batches; every figure honours ignore_index (ignored
    pixels are not counted at all).

    ``update(logits_or_classes, target)`` adds a batch; ``all_reduce()`` sums the matrix over the
    processes of a torch.distributed run; ``compute()`` returns a dict of floats and lists:

    - ``iou``: per class, TP / (TP + FP + FN), NaN for a class absent from both target and
      prediction; ``miou``: the mean over classes that are not NaN.
    - ``dice``: per class, 2 TP / (2 TP + FP + FN) (NaN as above); ``mean_dice``.
    - ``pixel_accuracy``: correct / counted pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = -100, device=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix += confusion_matrix(prediction, target, self.num_classes, self.ignore_index).to(self.matrix.device)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, object]:
        m = self.matrix.double()
        tp = m.diagonal()
        fp, fn = m.sum(0) - tp, m.sum(1) - tp
        union = tp + fp + fn
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
        total = m.sum()
        return {
            "miou": iou.nanmean().item(),
            "iou": iou.tolist(),
            "mean_dice": dice.nanmean().item(),
            "dice": dice.tolist(),
            "pixel_accuracy": (tp.sum() / total).item() if total > 0 else float("nan"),
            "pixels": int(total.item()),
        }
