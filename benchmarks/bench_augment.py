"""Joint image + mask augmentation: segfast's one-pass op vs the per-sample stock path.

    python benchmarks/bench_augment.py [--batch 16] [--size 512] [--reps 10] [--out DIR]

A batch of 16 x 3 x 512 x 512 float32 images and int64 (or --mask-dtype uint8) masks, random rotation, flip, scale and
translation. Variants, timed side by side (interleaved):
- "per-sample grid_sample": what a Dataset does per item: F.affine_grid + F.grid_sample for the
  image (bilinear) and for the mask (nearest, as float), out-of-frame mask pixels set to ignore;
- "batched grid_sample": the same three steps once for the whole batch;
- "torchvision v2" (when torchvision is installed): v2.functional.affine per sample on an
  (image, mask) pair;
- "segfast": segfast.ops.affine_augment on the batch.
Prints images/s and the ratio to segfast; writes DIR/augment-<device>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import segfast  # noqa: E402
from segfast.augment import RandomAffine  # noqa: E402
from utils import Row, machine_info, time_side_by_side, write_json  # noqa: E402


def stock_augment(images, masks, theta, ignore_index=255):
    grid = F.affine_grid(theta.to(images.dtype), images.shape, align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", align_corners=False)[:, 0]
    inside = (grid.abs() <= 1).all(-1)
    return out, torch.where(inside, mask.to(masks.dtype), ignore_index)


def variants(images, masks, params):
    theta = params.theta
    fns = {
        "per-sample grid_sample": lambda: [stock_augment(images[i:i + 1], masks[i:i + 1], theta[i:i + 1])
                                           for i in range(len(images))],
        "batched grid_sample": lambda: stock_augment(images, masks, theta),
        "segfast": lambda: segfast.ops.affine_augment(images, masks, theta),
    }
    try:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF
    except ImportError:
        return fns

    def torchvision_per_sample():
        for i in range(len(images)):
            angle, scale = float(params.angle[i]), float(params.scale[i])
            shift = [float(params.translate[i, 0]) * images.shape[-1], float(params.translate[i, 1]) * images.shape[-2]]
            TF.affine(tv_tensors.Image(images[i]), angle=angle, translate=shift, scale=scale, shear=[0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
            TF.affine(tv_tensors.Mask(masks[i]), angle=angle, translate=shift, scale=scale, shear=[0.0], fill=255)

    fns["torchvision v2"] = torchvision_per_sample
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mask-dtype", choices=["int64", "uint8"], default="int64",
                        help="uint8: masks as PNG masks usually come (a quarter of int64's output floor)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    masks = torch.randint(0, 21, (args.batch, args.size, args.size), generator=g).to(args.device,
                                                                                     getattr(torch, args.mask_dtype))
    params = RandomAffine(rotate=30, flip=0.5, scale=(0.5, 2.0), translate=0.1).sample(args.batch, images.shape[-2:], g)
    fns = variants(images, masks, params)
    times = time_side_by_side(fns, args.reps, device=args.device)
    info = machine_info()
    print(f"\naffine augmentation of {args.batch} x 3 x {args.size} x {args.size} float32 images + "
          f"{args.mask_dtype} masks on {args.device} ({info['cpu']}, {info['threads']} threads), "
          f"torch {info['torch']}, segfast {info['segfast_commit']}, {info['date']}\n")
    print("| variant | ms per batch | images/s | segfast speed-up |\n|---|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {args.batch / ms * 1e3:.0f} | {ms / times['segfast']:.2f}x |")
    rows = [Row("affine_augment", f"{args.batch}x3x{args.size}x{args.size}", "fwd", k, v) for k, v in times.items()]
    write_json(args.out / f"augment-{args.device}-{args.mask_dtype}.json", rows, {"machine": info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
