"""Segmentation metrics from a confusion matrix computed by segfast's fused argmax + bincount op."""

from __future__ import annotations

import torch
import torch.distributed as dist

from segfast.ops.metrics import confusion_matrix

__all__ = ["SegmentationMetrics", "confusion_matrix"]


class SegmentationMetrics:
    """Accumulates the confusion counts over batches; every figure honours ignore_index (ignored
    pixels are not counted at all).

    ``mode="multiclass"`` (default): ``update(logits_or_classes, target)`` adds a batch of (N, C, ...)
    logits (argmax fused into segfast's confusion_matrix op) or (N, ...) predicted classes against
    (N, ...) class indices. ``mode="binary"`` / ``"multilabel"`` (segmentation_models_pytorch's
    modes, as the sigmoid losses take them): (N, C, ...) logits or probabilities (thresholded at
    ``threshold`` after a sigmoid for logits, torchmetrics' rule: values outside [0, 1] are logits)
    or 0 / 1 predictions against 0 / 1 targets of the same shape (binary: also (N, ...)), each class
    counted on its own; ``num_classes`` is C (1 for binary).

    ``all_reduce()`` sums the counts over the processes of a torch.distributed run; ``compute()``
    returns a dict of floats and lists:

    - ``iou``: per class, TP / (TP + FP + FN), NaN for a class absent from both target and
      prediction; ``miou``: the mean over classes that are not NaN.
    - ``dice``: per class, 2 TP / (2 TP + FP + FN) (NaN as above); ``mean_dice``.
    - ``pixel_accuracy``: correct / counted pixels (binary and multi-label: correct / counted
      elements, every class's).
    """

    MODES = ("multiclass", "binary", "multilabel")

    def __init__(
        self, num_classes: int, ignore_index: int = -100, device=None, mode: str = "multiclass", threshold: float = 0.5
    ):
        if mode not in self.MODES:
            raise ValueError(f"SegmentationMetrics: mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "binary" and num_classes != 1:
            raise ValueError(f"SegmentationMetrics: mode='binary' has one class, got num_classes={num_classes}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SegmentationMetrics: threshold must be in (0, 1), got {threshold}")
        self.num_classes, self.ignore_index, self.mode, self.threshold = num_classes, ignore_index, mode, threshold
        if mode == "multiclass":
            self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        else:  # per class: TP, FP, FN, TN
            self.matrix = torch.zeros(num_classes, 4, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if self.mode == "multiclass":
            counts = confusion_matrix(prediction, target, self.num_classes, self.ignore_index)
        else:
            counts = self._sigmoid_counts(prediction, target)
        self.matrix += counts.to(self.matrix.device)

    def _sigmoid_counts(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mode == "binary" and target.dim() == prediction.dim() - 1:
            target = target.unsqueeze(1)
        if prediction.shape != target.shape or prediction.dim() < 2 or prediction.shape[1] != self.num_classes:
            raise ValueError(
                f"SegmentationMetrics: {self.mode} takes (N, {self.num_classes}, ...) predictions and targets of "
                f"their shape, got {tuple(prediction.shape)} and {tuple(target.shape)}"
            )
        if prediction.is_floating_point():
            probabilities = prediction if ((prediction >= 0) & (prediction <= 1)).all() else prediction.sigmoid()
            predicted = probabilities > self.threshold
        else:
            predicted = prediction != 0
        counted = target != self.ignore_index
        bad = counted & (target != 0) & (target != 1)
        if bad.any():
            raise ValueError(
                f"SegmentationMetrics: {self.mode} targets must be 0, 1 or ignore_index "
                f"({self.ignore_index}), got {target[bad][0].item()}"
            )
        truth = target == 1
        dims = [0, *range(2, prediction.dim())]
        return torch.stack(
            [
                (predicted & truth & counted).sum(dims),
                (predicted & ~truth & counted).sum(dims),
                (~predicted & truth & counted).sum(dims),
                (~predicted & ~truth & counted).sum(dims),
            ],
            dim=1,
        )

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, object]:
        m = self.matrix.double()
        if self.mode == "multiclass":
            tp = m.diagonal()
            fp, fn = m.sum(0) - tp, m.sum(1) - tp
            correct, total = tp.sum(), m.sum()
        else:
            tp, fp, fn, tn = m.unbind(1)
            correct, total = (tp + tn).sum(), m.sum()
        union = tp + fp + fn
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
        return {
            "miou": iou.nanmean().item(),
            "iou": iou.tolist(),
            "mean_dice": dice.nanmean().item(),
            "dice": dice.tolist(),
            "pixel_accuracy": (correct / total).item() if total > 0 else float("nan"),
            "pixels": int(total.item()),
        }
