"""Joint image + mask affine augmentation in one pass (``torch.ops.segfast.affine_augment``)."""

from __future__ import annotations

import torch

from segfast.ops._common import INDEX_DTYPES, check_kernel_available, check_tensor, entry, float_dtypes, memory_format

_OP = "affine_augment"


@torch.library.register_fake("segfast::affine_augment")
def _affine_augment_fake(image, mask, theta, out_h, out_w, ignore_index):
    out = torch.empty(
        (image.shape[0], image.shape[1], out_h, out_w),
        dtype=image.dtype,
        device=image.device,
        memory_format=memory_format(image),
    )
    return out, mask.new_empty((mask.shape[0], out_h, out_w))


def affine_augment(
    image: torch.Tensor, mask: torch.Tensor, theta: torch.Tensor, size=None, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warps images and their masks with one affine map per sample, in one pass.

    Output pixel (x, y) maps back through ``theta`` exactly as ``F.affine_grid(theta, size,
    align_corners=False)`` maps it; the image is read as ``F.grid_sample(mode="bilinear",
    padding_mode="zeros", align_corners=False)`` reads it, the mask at the nearest pixel (halves
    round to even, as grid_sample's "nearest"), and mask pixels that map outside the input become
    ``ignore_index``: labels are never blended. Coordinates are computed in float64.

    Args:
        image: (N, C, H, W) float32, float64, bfloat16 (or float16 on CUDA), NCHW or channels_last.
        mask: (N, H, W) int64, int32 or uint8 class indices.
        theta: (N, 2, 3) affine matrices from output to input normalised coordinates.
        size: (out_h, out_w), default the input's (H, W).
        ignore_index: mask value for pixels from outside the input; must fit the mask's dtype.

    Returns:
        (image (N, C, out_h, out_w) in image's dtype and layout, mask (N, out_h, out_w) in mask's dtype).
        On CPU, outputs of 8 MiB and more come from segfast's cache of freed blocks (README,
        Performance): ordinary tensors whose storage cannot grow with ``resize_``.
    """
    check_tensor(_OP, "image", image, dims=(4,), dtypes=float_dtypes(image))
    check_tensor(_OP, "mask", mask, dims=(3,), dtypes=INDEX_DTYPES)
    check_tensor(_OP, "theta", theta, dims=(3,))
    n, _, h, w = image.shape
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
    check_kernel_available(_OP, "segfast::affine_augment", image)
    return entry("affine_augment")(image, mask, theta.to(image.device), int(out_h), int(out_w), ignore_index)
