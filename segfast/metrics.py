"""Segmentation metrics from a confusion matrix computed by segfast's fused argmax + bincount op,
and the expected calibration error from its softmax_stats op."""

from __future__ import annotations

import torch
import torch.distributed as dist

from segfast.ops.metrics import confusion_matrix
from segfast.ops.softmax_stats import softmax_stats

__all__ = ["CalibrationError", "SegmentationMetrics", "confusion_matrix"]


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


class CalibrationError:
    """Expected calibration error of a softmax segmentation, pixel by pixel, over batches.

    Each pixel's confidence (its max softmax probability, from ``segfast.ops.softmax_stats``) falls
    into one of ``bins`` equal-width bins of (0, 1] (bin b holds (b / bins, (b + 1) / bins]);
    ``compute()`` returns ``sum_b |accuracy_b - confidence_b| * pixels_b / pixels`` (the L1 ECE of
    Guo et al. 2017, torchmetrics' ``MulticlassCalibrationError(norm="l1")``), pixels whose target
    is ``ignore_index`` left out.

    ``update(logits, target)``: logits (N, C, ...) floating, target (N, ...) class indices.
    """

    def __init__(self, bins: int = 15, ignore_index: int = 255, device=None):
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"CalibrationError: bins must be a positive int, got {bins!r}")
        self.bins, self.ignore_index = bins, ignore_index
        # per bin: pixels, sum of confidences, correct predictions (float64: exact counts to 2^53)
        self.sums = torch.zeros(3, bins, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        prediction, confidence, _ = softmax_stats(logits)
        self.add(prediction, confidence, target)

    def add(self, prediction: torch.Tensor, confidence: torch.Tensor, target: torch.Tensor) -> None:
        """``update`` from softmax_stats' outputs already at hand: (N, ...) predicted classes and
        their max softmax probabilities."""
        if target.shape != prediction.shape:
            raise ValueError(
                f"CalibrationError: target must have shape {tuple(prediction.shape)}, got {tuple(target.shape)}"
            )
        keep = target != self.ignore_index
        confidence = confidence[keep].double()
        bin_of = (confidence * self.bins).ceil().long().clamp(1, self.bins) - 1
        correct = (prediction[keep] == target[keep]).double()
        self.sums.index_add_(1, bin_of, torch.stack([torch.ones_like(confidence), confidence, correct]))

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def compute(self) -> float:
        pixels, confidence, correct = self.sums
        total = pixels.sum()
        if total == 0:
            return float("nan")
        return ((correct - confidence).abs().sum() / total).item()
