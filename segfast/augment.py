"""Random joint image + mask augmentation on segfast's one-pass affine op.

``RandomAffine`` samples, per sample, a rotation, horizontal/vertical flips, a scale, a
translation, the output (crop) size and optionally a contrast / brightness jitter, and applies
them to a batch of images (bilinear) and their masks (nearest, ``ignore_index`` outside the frame)
with ``segfast.ops.affine_augment``: one pass, on the device the batch is on, from images as
decoded (uint8 HWC, or float) to the normalised float batch a model takes. ``AugmentCollate``
makes it a DataLoader ``collate_fn``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from segfast.ops.augment import affine_augment, batch_images, batch_masks

__all__ = ["AffineParams", "AugmentCollate", "RandomAffine", "parse_augment"]


@dataclass
class AffineParams:
    """What one call sampled, per sample: enough to reproduce it (``theta``) or invert it."""

    angle: torch.Tensor  # (N,) degrees; the content turns counter-clockwise on screen (y down)
    scale: torch.Tensor  # (N,) > 1 zooms in
    translate: torch.Tensor  # (N, 2) (x, y) shift of the sampled window, in fractions of the input size
    hflip: torch.Tensor  # (N,) bool
    vflip: torch.Tensor  # (N,) bool
    theta: torch.Tensor  # (N, 2, 3) float64, output -> input normalised coordinates (F.affine_grid's)
    color: torch.Tensor | None = None  # (N, 2) float64 (contrast, brightness), when jittered


def affine_theta(angle, scale, translate, hflip, vflip, in_size, out_size) -> torch.Tensor:
    """theta (N, 2, 3) float64 for the parameters, rotation in pixel units (correct for H != W).

    An output pixel at offset u (pixels from the output centre, y down) reads the input at
    R F u / scale + translate * (W, H) from the input centre, R = [[cos, -sin], [sin, cos]]
    (so the content turns counter-clockwise on screen, as torch.rot90 with k=1 for 90 degrees);
    normalising by the half sizes gives F.affine_grid's theta.
    """
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    a = torch.deg2rad(angle.double())
    cos, sin = torch.cos(a), torch.sin(a)
    fx = 1.0 - 2.0 * hflip.double()
    fy = 1.0 - 2.0 * vflip.double()
    s = scale.double()
    theta = torch.zeros(len(a), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * fx / s * out_w / in_w
    theta[:, 0, 1] = -sin * fy / s * out_h / in_w
    theta[:, 1, 0] = sin * fx / s * out_w / in_h
    theta[:, 1, 1] = cos * fy / s * out_h / in_h
    theta[:, :, 2] = 2.0 * translate.double()
    return theta


class RandomAffine:
    """Random rotation, flips, scale, translation and crop, the same map for a sample's image and mask.

    Args:
        rotate: angles uniform in [-rotate, rotate] degrees.
        flip, vflip: probabilities of a horizontal / vertical flip.
        scale: (low, high): scales log-uniform in it (> 1 zooms in).
        translate: shifts uniform in [-translate, translate] of the input size, per axis.
        crop: output size (h, w) or an int; default the input size. With translate, a random crop.
        ignore_index: mask value for output pixels that come from outside the input.
        brightness, contrast: jitter, ``clamp(a * v + b, 0, 1)`` per sample with a uniform in
            [1 - contrast, 1 + contrast] and b uniform in [-brightness, brightness] (albumentations'
            RandomBrightnessContrast with brightness_by_max), v the image in [0, 1] (uint8 / 255).
        mean, std: per-channel normalisation ``(v - mean) / std`` after the jitter (one number or C).
        out_dtype, out_memory_format: the output images' dtype (default: the images' if floating,
            else float32) and layout (default: the images').

    ``transform(images, masks, generator=None, image_layout="NCHW")`` takes images and masks on any
    device: (N, C, H, W) images, (N, H, W, C) with ``image_layout="NHWC"``, or lists of (H, W, C)
    arrays / tensors (uint8 or float), and (N, H, W) masks or a list of (H, W); it returns
    ``(images, masks, params)``. Parameters are drawn on the CPU from ``generator``, so a seeded
    generator reproduces a run.
    """

    def __init__(
        self,
        rotate: float = 0.0,
        flip: float = 0.0,
        vflip: float = 0.0,
        scale=(1.0, 1.0),
        translate: float = 0.0,
        crop=None,
        ignore_index: int = 255,
        brightness: float = 0.0,
        contrast: float = 0.0,
        mean=None,
        std=None,
        out_dtype: torch.dtype | None = None,
        out_memory_format: torch.memory_format | None = None,
    ):
        if not 0 <= flip <= 1 or not 0 <= vflip <= 1:
            raise ValueError(f"RandomAffine: flip probabilities must be in [0, 1], got {flip}, {vflip}")
        if not (0 < scale[0] <= scale[1]) or not math.isfinite(scale[1]):
            raise ValueError(f"RandomAffine: scale must be (low, high) with 0 < low <= high, got {scale!r}")
        if rotate < 0 or translate < 0 or not math.isfinite(rotate) or not math.isfinite(translate):
            raise ValueError(f"RandomAffine: rotate and translate must be finite and >= 0, got {rotate}, {translate}")
        crop = (crop, crop) if isinstance(crop, int) else crop
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"RandomAffine: crop must be a positive int or (h, w), got {crop!r}")
        self.rotate, self.flip, self.vflip, self.scale = float(rotate), float(flip), float(vflip), tuple(scale)
        if not 0 <= brightness <= 1 or not 0 <= contrast <= 1:
            raise ValueError(f"RandomAffine: brightness and contrast must be in [0, 1], got {brightness}, {contrast}")
        self.translate, self.crop, self.ignore_index = float(translate), crop, ignore_index
        self.brightness, self.contrast, self.mean, self.std = float(brightness), float(contrast), mean, std
        self.out_dtype, self.out_memory_format = out_dtype, out_memory_format

    def sample(self, n: int, in_size, generator: torch.Generator | None = None) -> AffineParams:
        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

        angle = uniform(-self.rotate, self.rotate, n)
        log_low, log_high = math.log(self.scale[0]), math.log(self.scale[1])
        scale = torch.exp(uniform(log_low, log_high, n))
        translate = uniform(-self.translate, self.translate, n, 2)
        hflip = torch.rand(n, generator=generator) < self.flip
        vflip = torch.rand(n, generator=generator) < self.vflip
        out_size = self.crop or tuple(in_size)
        theta = affine_theta(angle, scale, translate, hflip, vflip, in_size, out_size)
        color = None
        if self.brightness > 0 or self.contrast > 0:
            color = torch.stack(
                [uniform(1 - self.contrast, 1 + self.contrast, n), uniform(-self.brightness, self.brightness, n)], 1
            )
        return AffineParams(angle, scale, translate, hflip, vflip, theta, color)

    def __call__(self, images, masks, generator: torch.Generator | None = None, image_layout: str = "NCHW"):
        images = batch_images("RandomAffine", images, image_layout)
        masks = batch_masks("RandomAffine", masks)
        params = self.sample(images.shape[0], images.shape[-2:], generator)
        color = None if params.color is None else params.color.to(images.device)
        out_images, out_masks = affine_augment(
            images,
            masks,
            params.theta,
            self.crop or images.shape[-2:],
            self.ignore_index,
            color=color,
            mean=self.mean,
            std=self.std,
            out_dtype=self.out_dtype,
            out_memory_format=self.out_memory_format,
        )
        return out_images, out_masks, params


class AugmentCollate:
    """A DataLoader ``collate_fn``: stacks (image, mask) pairs and augments the batch in one pass.

    Images are (C, H, W) tensors (``image_layout="NCHW"``) or, as decoded, (H, W, C) / (H, W)
    uint8 or float arrays / tensors (``image_layout="NHWC"``); masks (H, W) arrays or tensors."""

    def __init__(self, transform: RandomAffine, generator: torch.Generator | None = None, image_layout: str = "NCHW"):
        self.transform, self.generator, self.image_layout = transform, generator, image_layout

    def __call__(self, batch):
        images = [image for image, _ in batch]
        if self.image_layout == "NCHW":
            images = torch.stack([torch.as_tensor(image) for image in images])
        images, masks, _ = self.transform(images, [mask for _, mask in batch], self.generator)
        return images, masks


def parse_augment(spec: str, ignore_index: int = 255, **options) -> RandomAffine:
    """``"rotate=30,flip=0.5,vflip=0,scale=0.5:2,translate=0.1,crop=48,brightness=0.2,contrast=0.2"``
    (any subset) -> RandomAffine; ``options`` (mean, std, out_dtype, ...) pass through."""
    kwargs: dict[str, object] = {"ignore_index": ignore_index, **options}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        try:
            if key in ("rotate", "flip", "vflip", "translate", "brightness", "contrast"):
                kwargs[key] = float(value)
            elif key == "scale":
                low, _, high = value.partition(":")
                kwargs["scale"] = (float(low), float(high or low))
            elif key == "crop":
                h, _, w = value.partition("x")
                kwargs["crop"] = (int(h), int(w or h))
            else:
                raise ValueError(
                    f"unknown key {key!r} (rotate, flip, vflip, scale, translate, crop, brightness, contrast)"
                )
        except ValueError as error:
            raise ValueError(f"--augment {spec!r}: {item!r}: {error}") from None
    return RandomAffine(**kwargs)
