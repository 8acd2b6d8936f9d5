"""Joint image + mask affine augmentation in one pass (``torch.ops.segfast.affine_augment``)."""

from __future__ import annotations

import math

import torch

from segfast.ops._common import INDEX_DTYPES, check_kernel_available, check_tensor, entry, float_dtypes, memory_format

_OP = "affine_augment"


IMAGE_LAYOUTS = ("NCHW", "NHWC")
# what the output may be written in (float16 on CPU too: a conversion, no arithmetic, in that dtype)
OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _out_dtype(image, out_dtype):
    return out_dtype or (image.dtype if image.is_floating_point() else torch.float32)


def _out_format(image, out_memory_format):
    return memory_format(image) if out_memory_format in (None, torch.preserve_format) else out_memory_format


@torch.library.register_fake("segfast::affine_augment")
def _affine_augment_fake(
    image, mask, theta, out_h, out_w, ignore_index, color=None, normalize=None, out_dtype=None, out_memory_format=None
):
    out = torch.empty(
        (image.shape[0], image.shape[1], out_h, out_w),
        dtype=_out_dtype(image, out_dtype),
        device=image.device,
        memory_format=_out_format(image, out_memory_format),
    )
    return out, mask.new_empty((mask.shape[0], out_h, out_w))


def batch_images(op: str, images, layout: str = "NCHW") -> torch.Tensor:
    """Images as decoded, as one (N, C, H, W) tensor (a view where they already are one).

    ``images``: an (N, C, H, W) tensor (``layout="NCHW"``), an (N, H, W, C) tensor
    (``layout="NHWC"``: viewed as channels_last NCHW, no copy), or a list of (H, W, C) / (H, W)
    numpy arrays or tensors, as a Dataset returns them (stacked once into NHWC)."""
    if layout not in IMAGE_LAYOUTS:
        raise ValueError(f"{op}: image_layout must be one of {', '.join(IMAGE_LAYOUTS)}, got {layout!r}")
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{op}: the list of images is empty")
        images = torch.stack([torch.as_tensor(image) for image in images])
        images = images[..., None] if images.dim() == 3 else images  # (H, W) grey images
        layout = "NHWC"
    check_tensor(op, "image", images, dims=(4,))
    return images.permute(0, 3, 1, 2) if layout == "NHWC" else images


def batch_masks(op: str, masks) -> torch.Tensor:
    """(N, H, W) masks, or a list of (H, W) arrays / tensors (stacked)."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError(f"{op}: the list of masks is empty")
        masks = torch.stack([torch.as_tensor(mask) for mask in masks])
    return masks


def _normalize(op, mean, std, channels, device):
    """(2, C) float64 [mean, std] on device, or None when neither is given. Checked as Python
    numbers (no tensor reads: the check traces under torch.compile)."""
    if mean is None and std is None:
        return None
    rows = []
    for name, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        value = default if value is None else value
        value = value.tolist() if isinstance(value, torch.Tensor) else value
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        values = values * channels if len(values) == 1 else values
        if len(values) != channels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"{op}: {name} must be {channels} finite numbers (one per channel), got {value!r}")
        rows.append([float(v) for v in values])
    if 0.0 in rows[1]:
        raise ValueError(f"{op}: std must be nonzero, got {rows[1]}")
    return torch.tensor(rows, dtype=torch.float64, device=device)


def affine_augment(
    image,
    mask,
    theta: torch.Tensor,
    size=None,
    ignore_index: int = 255,
    *,
    color: torch.Tensor | None = None,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
    out_memory_format: torch.memory_format | None = None,
    image_layout: str = "NCHW",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warps images and their masks with one affine map per sample, in one pass.

    Output pixel (x, y) maps back through ``theta`` exactly as ``F.affine_grid(theta, size,
    align_corners=False)`` maps it; the image is read as ``F.grid_sample(mode="bilinear",
    padding_mode="zeros", align_corners=False)`` reads it, the mask at the nearest pixel (halves
    round to even, as grid_sample's "nearest"), and mask pixels that map outside the input become
    ``ignore_index``: labels are never blended. Coordinates are computed in float64.

    Images come as decoded: uint8 (read as fractions of 255, ``v / 255``, as torchvision's
    ``to_dtype(scale=True)``) or floating. The same pass then applies, per output value,
    ``u = clamp(contrast * v + brightness, 0, 1)`` (only when ``color`` is given) and
    ``(u - mean) / std`` (when ``mean`` / ``std`` are given), and writes ``out_dtype``.

    Args:
        image: (N, C, H, W) uint8, float32, float64, bfloat16 (or float16 on CUDA), NCHW or
            channels_last; an (N, H, W, C) tensor with ``image_layout="NHWC"``; or a list of
            (H, W, C) / (H, W) numpy arrays or tensors (a Dataset's decoded images; stacked once).
        mask: (N, H, W) int64, int32 or uint8 class indices, or a list of (H, W) arrays / tensors.
        theta: (N, 2, 3) affine matrices from output to input normalised coordinates.
        size: (out_h, out_w), default the input's (H, W).
        ignore_index: mask value for pixels from outside the input; must fit the mask's dtype.
        color: (N, 2) floating (contrast, brightness) per sample, on image's device; the result is
            clamped to [0, 1] (floating images are taken to be in [0, 1]). None: no jitter, no clamp.
        mean, std: C numbers each (or one for all channels): per-channel normalisation.
        out_dtype: float32, float64, bfloat16 or float16; default image's dtype if floating, else float32.
        out_memory_format: torch.contiguous_format or torch.channels_last; default image's layout.
        image_layout: "NCHW" or "NHWC", how a 4-D image tensor is laid out.

    Returns:
        (image (N, C, out_h, out_w) in out_dtype and out_memory_format, mask (N, out_h, out_w) in
        mask's dtype). On CPU, outputs of 8 MiB and more come from segfast's cache of freed blocks
        (README, Performance): ordinary tensors whose storage cannot grow with ``resize_``.

    Accuracy: bilinear weights and sums in float32 (float64 when image or output is float64): a
    float32 output from uint8 images is within 1e-6 * max(1, max|output|) of the float64 reference
    of the same bytes (5e-7 measured), lower-precision outputs within their rounding; masks exact.
    """
    image = batch_images(_OP, image, image_layout)
    mask = batch_masks(_OP, mask)
    dtypes = float_dtypes(image) + (torch.uint8,)
    check_tensor(_OP, "image", image, dims=(4,), dtypes=dtypes)
    check_tensor(_OP, "mask", mask, dims=(3,), dtypes=INDEX_DTYPES)
    check_tensor(_OP, "theta", theta, dims=(3,))
    n, c, h, w = image.shape
    if mask.shape != (n, h, w):
        raise ValueError(
            f"{_OP}: mask must have shape {(n, h, w)} for image {tuple(image.shape)}, got {tuple(mask.shape)}"
        )
    if theta.shape != (n, 2, 3) or not theta.is_floating_point():
        raise ValueError(
            f"{_OP}: theta must be floating (N, 2, 3) = ({n}, 2, 3), got {theta.dtype} {tuple(theta.shape)}"
        )
    if mask.device != image.device:
        raise ValueError(f"{_OP}: mask is on {mask.device} but image is on {image.device}")
    if h == 0 or w == 0:
        raise ValueError(f"{_OP}: image has an empty spatial size {tuple(image.shape)}")
    out_h, out_w = (h, w) if size is None else size
    if int(out_h) < 1 or int(out_w) < 1:
        raise ValueError(f"{_OP}: size must be positive, got {size!r}")
    info = torch.iinfo(mask.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"{_OP}: ignore_index {ignore_index} does not fit the mask's dtype {mask.dtype}")
    if not torch.compiler.is_compiling() and not torch.isfinite(theta).all():
        raise ValueError(f"{_OP}: theta holds NaN or inf")
    if image.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_OP}: augmentation is not differentiable; call it on data (or under torch.no_grad())")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"{_OP}: out_dtype must be one of float32, float64, bfloat16, float16, got {out_dtype}")
    if out_memory_format not in (None, torch.preserve_format, torch.contiguous_format, torch.channels_last):
        raise ValueError(
            f"{_OP}: out_memory_format must be torch.contiguous_format or torch.channels_last, got {out_memory_format}"
        )
    if color is not None:
        check_tensor(_OP, "color", color, dims=(2,))
        if color.shape != (n, 2) or not color.is_floating_point() or color.device != image.device:
            raise ValueError(
                f"{_OP}: color must be a floating (N, 2) = ({n}, 2) (contrast, brightness) tensor on {image.device}, "
                f"got {color.dtype} {tuple(color.shape)} on {color.device}"
            )
    normalize = _normalize(_OP, mean, std, c, image.device)
    check_kernel_available(_OP, "segfast::affine_augment", image)
    return entry("affine_augment")(
        image,
        mask,
        theta.to(image.device),
        int(out_h),
        int(out_w),
        ignore_index,
        color,
        normalize,
        out_dtype,
        out_memory_format,
    )
