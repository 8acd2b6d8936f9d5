"""max_pool2d and avg_pool2d (``torch.ops.segfast.max_pool2d`` / ``avg_pool2d``)."""

from __future__ import annotations

import torch

from segfast.ops._common import check_kernel_available, entry, is_int, memory_format, pair


def _pooled_size(size, kernel, stride, padding, dilation, ceil_mode):
    # mirrors pool_output_size() in csrc/common/pooling.h (torch's pooling_output_shape)
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _empty_pooled(input, kernel, stride, padding, dilation, ceil_mode, dtype):
    size = [
        _pooled_size(input.shape[2 + d], kernel[d], stride[d], padding[d], dilation[d], ceil_mode) for d in range(2)
    ]
    return torch.empty((*input.shape[:2], *size), dtype=dtype, device=input.device, memory_format=memory_format(input))


def _argmax_dtype(kernel, return_indices):
    if return_indices:
        return torch.int64
    return torch.uint8 if kernel[0] * kernel[1] <= 256 else torch.int32


@torch.library.register_fake("segfast::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    out = _empty_pooled(input, kernel_size, stride, padding, dilation, ceil_mode, input.dtype)
    argmax = _empty_pooled(
        input, kernel_size, stride, padding, dilation, ceil_mode, _argmax_dtype(kernel_size, return_indices)
    )
    return out, argmax


@torch.library.register_fake("segfast::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, argmax, input_size, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty(
        input_size, dtype=grad_output.dtype, device=grad_output.device, memory_format=memory_format(argmax)
    )


@torch.library.register_fake("segfast::avg_pool2d")
def _avg_pool2d_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _empty_pooled(input, kernel_size, stride, padding, [1, 1], ceil_mode, input.dtype)


@torch.library.register_fake("segfast::avg_pool2d_backward")
def _avg_pool2d_backward_fake(
    grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    return torch.empty(
        input_size, dtype=grad_output.dtype, device=grad_output.device, memory_format=memory_format(grad_output)
    )


# autograd of both ops: csrc/autograd/pooling.cpp (C++, registered for the Autograd key)


def _pool_args(op, input, kernel_size, stride, padding, dilation):
    """(batched input, kernel, stride, padding, dilation, unbatched) as the op takes them. Their
    values are checked by the kernels, with the messages of F.max_pool2d's checks
    (csrc/common/pooling.h), so that an eager call pays for the checks once, in C++."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    unbatched = input.dim() == 3
    if not unbatched and input.dim() != 4:
        raise ValueError(f"{op}: input must be 3-D or 4-D, got {input.dim()}-D with shape {tuple(input.shape)}")
    if not input.is_cpu:
        check_kernel_available(op, f"segfast::{op}", input)
    kernel = pair(op, "kernel_size", kernel_size)
    no_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    stride = kernel if no_stride else pair(op, "stride", stride)
    return (
        input.unsqueeze(0) if unbatched else input,
        kernel,
        stride,
        pair(op, "padding", padding),
        pair(op, "dilation", dilation),
        unbatched,
    )


def max_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """``F.max_pool2d`` with the same arguments and results.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32, float64, bfloat16 or (CUDA)
            float16; NCHW or channels_last (the output keeps the layout).
        kernel_size, stride (default: kernel_size), padding, dilation, ceil_mode: as ``F.max_pool2d``.
        return_indices: also return torch's flat int64 indices (H * W plane offsets).

    Returns:
        (N, C, H_out, W_out) in input's dtype, plus the int64 indices if ``return_indices``.

    Backward saves only the argmax as the offset inside the window: uint8 when the window has at
    most 256 elements (int32 above), 8x smaller than torch's int64 indices; the input is not kept.
    """
    x, kernel, stride, padding, dilation, unbatched = _pool_args(
        "max_pool2d", input, kernel_size, stride, padding, dilation
    )
    out, indices = entry("max_pool2d")(x, kernel, stride, padding, dilation, bool(ceil_mode), bool(return_indices))
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out


def avg_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """``F.avg_pool2d`` with the same arguments and results.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32, float64, bfloat16 or (CUDA)
            float16; NCHW or channels_last (the output keeps the layout).
        kernel_size, stride (default: kernel_size), padding, ceil_mode, count_include_pad,
            divisor_override: as ``F.avg_pool2d``.

    Returns:
        (N, C, H_out, W_out) in input's dtype. Backward saves no tensor.
    """
    x, kernel, stride, padding, _, unbatched = _pool_args("avg_pool2d", input, kernel_size, stride, padding, 1)
    if divisor_override is not None and not is_int(divisor_override):
        raise ValueError(f"avg_pool2d: divisor_override must be a non-zero int or None, got {divisor_override!r}")
    out = entry("avg_pool2d")(x, kernel, stride, padding, bool(ceil_mode), bool(count_include_pad), divisor_override)
    return out.squeeze(0) if unbatched else out
