"""The ``augment`` suite: joint image + mask affine augmentation of a batch, segfast's one-pass op
vs the stock ways of doing the same.

- ``int64`` / ``uint8`` (mask dtypes): float images already in a batch, segfast vs per sample
  (what a Dataset does) and batched ``F.affine_grid`` + ``F.grid_sample``, and torchvision v2.
- ``bytes``: what users run, from decoded uint8 HWC images (a list of numpy arrays, as a Dataset
  returns them) and uint8 masks to a float32 NCHW batch normalised with ImageNet's mean / std:
  rotation +-30 degrees, horizontal flip (p = 0.5), scale 0.75-1.25, crop to 7/8. segfast's
  ``AugmentCollate`` (stack, then one pass), albumentations per sample as its users write it
  (A.Affine + HorizontalFlip + RandomCrop + Normalize + ToTensorV2, then the batch stacked: the
  DataLoader's collate), and torchvision.transforms.v2 per sample; each where installed.
  The libraries' defaults differ and are set to do the same work: masks outside the frame get 255
  (the ignore index; albumentations' ``fill_mask`` and torchvision's mask fill default to 0),
  images are bilinear (torchvision's RandomAffine defaults to nearest), masks nearest. Left as each
  library has it: scale is drawn log-uniform by segfast, uniform by the others; the crop window is
  drawn in the input frame by segfast (a translation of up to 1/16 of the size), after the warp by
  the others; OpenCV's uint8 bilinear uses 5-bit fixed-point weights (segfast float32). None of
  these changes the work per pixel.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

import segfast
from segfast.augment import AugmentCollate, RandomAffine
from segfast.bench.cases import SEGFAST, Case, Settings, nbytes

SUITE = "augment"
PER_SAMPLE = "per-sample grid_sample"
ALBUMENTATIONS, TORCHVISION = "albumentations", "torchvision v2"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def _albumentations(samples, crop):
    """albumentations per sample, as its users write it, then the batch stacked; None if not installed."""
    try:
        import albumentations as A
        import cv2
        from albumentations.pytorch import ToTensorV2
    except ImportError:
        return None
    transform = A.Compose(
        [
            A.Affine(
                rotate=(-30, 30),
                scale=(0.75, 1.25),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=255,
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
            A.RandomCrop(crop, crop),
            A.Normalize(mean=MEAN, std=STD),
            ToTensorV2(),
        ]
    )

    def run():
        out = [transform(image=image, mask=mask) for image, mask in samples]
        return torch.stack([o["image"] for o in out]), torch.stack([o["mask"] for o in out])

    return run


def _torchvision(samples, crop):
    """torchvision.transforms.v2 per sample, then the batch stacked; None if not installed."""
    try:
        from torchvision import tv_tensors
        from torchvision.transforms import v2
    except ImportError:
        return None
    transform = v2.Compose(
        [
            v2.RandomAffine(
                degrees=30,
                scale=(0.75, 1.25),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: 255},
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(crop),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=MEAN, std=STD),
        ]
    )

    def run():
        out = [
            transform(
                tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))
            )
            for image, mask in samples
        ]
        return torch.stack([image for image, _ in out]), torch.stack([mask for _, mask in out])

    return run


def bytes_case(settings: Settings) -> Case:
    """From decoded uint8 HWC images and uint8 masks to a normalised float32 NCHW batch."""
    batch, size = (4, 256) if settings.quick else (16, 512)
    crop = size * 7 // 8
    rng = np.random.default_rng(0)
    samples = [
        (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.integers(0, 21, (size, size), dtype=np.uint8))
        for _ in range(batch)
    ]
    transform = RandomAffine(
        rotate=30,
        flip=0.5,
        scale=(0.75, 1.25),
        translate=(size - crop) / 2 / size,
        crop=crop,
        mean=MEAN,
        std=STD,
        out_dtype=torch.float32,
        out_memory_format=torch.contiguous_format,
    )
    collate = AugmentCollate(transform, torch.Generator().manual_seed(0), image_layout="NHWC")
    providers = {SEGFAST: lambda: collate(samples)}
    for name, make in ((ALBUMENTATIONS, _albumentations), (TORCHVISION, _torchvision)):
        run = make(samples, crop)
        if run is not None:
            providers[name] = run
    baseline = ALBUMENTATIONS if ALBUMENTATIONS in providers else SEGFAST
    return Case(
        SUITE,
        "uint8 HWC -> normalised float32",
        f"{batch}x{size}x{size}x3 -> {crop}x{crop}",
        "fwd",
        providers,
        batch,
        settings,
        baseline=baseline,
        bytes_moved=batch * (size * size * 4 + crop * crop * (3 * 4 + 1)),
        flops=0.0,
        note="" if baseline == ALBUMENTATIONS else "albumentations not installed",
    )


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    if settings.device == "cpu" and (only is None or "bytes" in only):
        yield bytes_case(settings)
    only = [name for name in only or ["int64", "uint8"] if name != "bytes"]
    batch, size = (4, 256) if settings.quick else (16, 512)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(settings.device, settings.torch_dtype)
    images = images.contiguous(memory_format=settings.memory_format)
    for mask_dtype in only:
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
