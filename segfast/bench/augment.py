"""The ``augment`` suite: joint image + mask affine augmentation of a batch, segfast's one-pass op
vs the stock ways of doing the same: per sample (what a Dataset does) and batched with
``F.affine_grid`` + ``F.grid_sample``, and torchvision.transforms.v2 per sample where installed."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import segfast
from segfast.augment import RandomAffine
from segfast.bench.cases import SEGFAST, Case, Settings, nbytes

SUITE = "augment"
PER_SAMPLE = "per-sample grid_sample"


def stock_augment(images, masks, theta, ignore_index=255):
    """Bilinear image, nearest mask (as float), out-of-frame mask pixels set to ignore_index."""
    grid = F.affine_grid(theta.to(images.dtype), images.shape, align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", align_corners=False)[:, 0]
    inside = (grid.abs() <= 1).all(-1)
    return out, torch.where(inside, mask.to(masks.dtype), ignore_index)


def _torchvision_per_sample(images, masks, params):
    try:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF
    except ImportError:
        return None

    def run():
        for i in range(len(images)):
            angle, scale = float(params.angle[i]), float(params.scale[i])
            shift = [float(params.translate[i, 0]) * images.shape[-1], float(params.translate[i, 1]) * images.shape[-2]]
            TF.affine(
                tv_tensors.Image(images[i]),
                angle=angle,
                translate=shift,
                scale=scale,
                shear=[0.0],
                interpolation=TF.InterpolationMode.BILINEAR,
            )
            TF.affine(tv_tensors.Mask(masks[i]), angle=angle, translate=shift, scale=scale, shear=[0.0], fill=255)

    return run


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    batch, size = (4, 256) if settings.quick else (16, 512)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(settings.device, settings.torch_dtype)
    images = images.contiguous(memory_format=settings.memory_format)
    for mask_dtype in only or ["int64", "uint8"]:
        masks = torch.randint(0, 21, (batch, size, size), generator=g).to(settings.device, getattr(torch, mask_dtype))
        params = RandomAffine(rotate=30, flip=0.5, scale=(0.5, 2.0), translate=0.1).sample(batch, (size, size), g)
        theta = params.theta.to(settings.device)
        providers = {
            # masks and theta bound now: the cases are generated before they run
            PER_SAMPLE: lambda masks=masks, theta=theta: [
                stock_augment(images[i : i + 1], masks[i : i + 1], theta[i : i + 1]) for i in range(batch)
            ],
            "batched grid_sample": lambda masks=masks, theta=theta: stock_augment(images, masks, theta),
            SEGFAST: lambda masks=masks, theta=theta: segfast.ops.affine_augment(images, masks, theta),
        }
        torchvision = _torchvision_per_sample(images, masks, params)
        if torchvision is not None:
            providers["torchvision v2"] = torchvision
        yield Case(
            SUITE,
            "affine_augment",
            f"{batch}x3x{size}x{size} + {mask_dtype} mask",
            "fwd",
            providers,
            batch,
            settings,
            baseline=PER_SAMPLE,
            bytes_moved=2 * nbytes(images, masks),
            flops=0.0,
        )
