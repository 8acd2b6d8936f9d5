"""Draws docs/augment.png: digits canvases and masks before and after segfast's joint augmentation.

    python examples/augment_picture.py [--out docs/augment.png]

Rows are samples; columns: image, mask, augmented image, augmented mask (palette colours, white
for ignore_index: pixels that came from outside the frame).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from picture_grid import grid, save

from segfast.augment import parse_augment
from segfast.data import DigitsSegmentation
from segfast.data.folder import _palette

SPEC = "rotate=35,flip=0.5,scale=0.7:1.5,translate=0.15,crop=64"


def to_rgb(mask: torch.Tensor) -> torch.Tensor:
    palette = torch.tensor(_palette(256), dtype=torch.uint8)
    palette[255] = 255  # ignore_index: white
    return palette[mask.clamp(0, 255)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/augment.png"))
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    data = DigitsSegmentation("val", count=args.samples, seed=3)
    images, masks = data.tensors
    aug_images, aug_masks, _ = parse_augment(SPEC)(images, masks, torch.Generator().manual_seed(0))
    gray = lambda x: (x[0].clamp(0, 1) * 255).byte()[..., None].expand(-1, -1, 3)  # noqa: E731
    rows = [[gray(images[i]), to_rgb(masks[i]), gray(aug_images[i]), to_rgb(aug_masks[i])] for i in range(args.samples)]
    save(grid(rows), args.out)
    print(f"wrote {args.out} ({SPEC})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
