"""A segmentation task with no download: canvases of scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

SPLITS = ("train", "val", "test")
DEFAULT_COUNTS = {"train": 2000, "val": 250, "test": 250}


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's package."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data sets need scikit-learn (pip install scikit-learn)") from error
    digits = load_digits()
    return torch.from_numpy(digits.images).float() / 16.0, torch.from_numpy(digits.target).long()


class DigitsSegmentation(TensorDataset):
    """Canvases of ``size`` x ``size`` pixels holding 1 to 3 non-overlapping handwritten digits,
    each scaled to 14-28 pixels and placed at random, with a per-pixel label: background 0, a
    digit d's stroke pixels d + 1 (11 classes).

    The 1,797 source digits are split once (fixed permutation): 70% feed "train", 15% "val", 15%
    "test", so test canvases show unseen handwriting. Canvases are generated at construction,
    deterministically from ``seed`` and the split.

    Items are ``(image, mask)``: image float32 (1, size, size) in [0, 1], mask int64 (size, size);
    with ``binary=True`` the mask is 1 on any digit, 0 elsewhere (binary segmentation).
    """

    num_classes = 11

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        count: int | None = None,
        seed: int = 0,
        digit_sizes: tuple[int, int] = (14, 28),
        digits_per_image: tuple[int, int] = (1, 3),
        binary: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"DigitsSegmentation: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 8 <= digit_sizes[0] <= digit_sizes[1] <= size:
            raise ValueError(f"DigitsSegmentation: digit_sizes {digit_sizes} must lie in [8, size={size}]")
        count = DEFAULT_COUNTS[split] if count is None else count
        images, labels = load_sklearn_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))  # the split is fixed
        bounds = {"train": (0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}[split]
        pool = order[int(bounds[0] * len(order)) : int(bounds[1] * len(order))]
        g = torch.Generator().manual_seed(seed * len(SPLITS) + SPLITS.index(split))
        canvas = torch.zeros(count, 1, size, size)
        mask = torch.zeros(count, size, size, dtype=torch.long)
        for i in range(count):
            boxes: list[tuple[int, int, int]] = []
            wanted = int(torch.randint(digits_per_image[0], digits_per_image[1] + 1, (), generator=g))
            for _ in range(10 * wanted):  # rejection sampling of non-overlapping boxes
                if len(boxes) == wanted:
                    break
                side = int(torch.randint(digit_sizes[0], digit_sizes[1] + 1, (), generator=g))
                y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
                if any(y < by + bs and by < y + side and x < bx + bs and bx < x + side for by, bx, bs in boxes):
                    continue
                boxes.append((y, x, side))
                pick = pool[int(torch.randint(0, len(pool), (), generator=g))]
                digit = F.interpolate(
                    images[pick][None, None], size=(side, side), mode="bilinear", align_corners=False
                )[0, 0].clamp(0, 1)
                canvas[i, 0, y : y + side, x : x + side] = digit
                mask[i, y : y + side, x : x + side][digit > 0.35] = labels[pick] + 1
        super().__init__(canvas, (mask > 0).long() if binary else mask)
