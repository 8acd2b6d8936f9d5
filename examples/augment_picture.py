"""Draws docs/augment.png: digits canvases and masks before and after segfast's joint augmentation.

    python examples/augment_picture.py [--out docs/augment.png]

Rows are samples; columns: image, mask, augmented image, augmented mask (palette colours, white
for ignore_index: pixels that came from outside the frame).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

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
    rows = []
    for i in range(args.samples):
        gray = lambda x: (x[0].clamp(0, 1) * 255).byte()[..., None].expand(-1, -1, 3)  # noqa: E731
        tiles = [gray(images[i]), to_rgb(masks[i]), gray(aug_images[i]), to_rgb(aug_masks[i])]
        spacer = torch.full((64, 4, 3), 128, dtype=torch.uint8)
        rows.append(torch.cat([t for tile in tiles for t in (tile, spacer)][:-1], 1))
    picture = torch.cat(
        [t for row in rows for t in (row, torch.full((4, row.shape[1], 3), 128, dtype=torch.uint8))][:-1]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture.numpy()).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out} ({SPEC})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
