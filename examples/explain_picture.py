"""Draws docs/explain.png: what `segfast predict --explain` writes, for digits canvases.

    segfast train --model unet --data digits --epochs 15 --out runs/unet-digits.pt
    python examples/explain_picture.py --checkpoint runs/unet-digits.pt [--out docs/explain.png]

Rows are test canvases; columns: image, predicted mask, confidence (max softmax probability),
entropy (/ log C) and Grad-CAM saliency of the most predicted digit class, each map over the image
(dark blue 0 -> red -> yellow 1), as the --explain overlays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from picture_grid import grid, save

from segfast.cli.segment import _model_from_checkpoint
from segfast.data import DigitsSegmentation
from segfast.data.folder import _palette
from segfast.explain import explain, overlay


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/explain.png"))
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    model, _, _ = _model_from_checkpoint(args.checkpoint, None)
    images, _ = DigitsSegmentation("test", count=args.samples, seed=5).tensors
    palette = torch.tensor(_palette(256), dtype=torch.uint8)
    rows = []
    for image in images:
        maps = explain(model, image)
        grey = (image[0].clamp(0, 1) * 255).byte()[..., None].expand(-1, -1, 3)
        rows.append(
            [grey, palette[maps.mask]] + [overlay(image, m) for m in (maps.confidence, maps.entropy, maps.saliency)]
        )
        print(f"class {maps.saliency_class}: mean confidence {maps.confidence.mean():.3f}")
    save(grid(rows), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
