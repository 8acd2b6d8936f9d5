"""scikit-learn's bundled 8x8 handwritten digits, upscaled, as a classification data set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from segfast.data.digits_segmentation import load_sklearn_digits

SPLITS = ("train", "test")


class DigitsClassification(TensorDataset):
    """The 1,797 digits of ``sklearn.datasets.load_digits`` (shipped with scikit-learn),
    bilinearly upscaled to ``image_size`` and scaled to [0, 1].

    Items are ``(image, label)``: image float32 (1, image_size, image_size), label int64 in [0, 10).
    The split is deterministic: a fixed permutation (``seed``) puts ``test_fraction`` of the
    digits in "test" and the rest in "train".
    """

    def __init__(self, split: str = "train", image_size: int = 28, test_fraction: float = 0.2, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"DigitsClassification: split must be one of {', '.join(SPLITS)}, got {split!r}")
        images, labels = load_sklearn_digits()
        images = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(test_fraction * len(labels)))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        super().__init__(images[chosen].contiguous(), labels[chosen])
