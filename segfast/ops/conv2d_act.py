"""conv2d + bias + activation as one op (``torch.ops.segfast.conv2d_act``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segfast.ops._activation import inductor_takes_inference, keeps_preact, stock_activation
from segfast.ops._common import check_kernel_available, entry, memory_format, pair

_OP = "conv2d_act"


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("segfast::conv2d_act")
def _conv2d_act_fake(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    n, _, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    size = (
        n,
        out_channels,
        _conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        _conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    )
    channels_last = torch.channels_last in (memory_format(input), memory_format(weight))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(size, dtype=input.dtype, device=input.device, memory_format=fmt)
    preact = (
        torch.empty(size, dtype=input.dtype, device=input.device, memory_format=fmt)
        if keeps_preact(activation, negative_slope)
        else input.new_empty(0)
    )
    return out, preact


@torch.library.register_fake("segfast::conv2d_act_backward")
def _conv2d_act_backward_fake(
    grad_output, saved, input, weight, stride, padding, dilation, groups, activation, negative_slope, output_mask
):
    def grad_like(t, wanted):
        return torch.empty_like(t, memory_format=memory_format(t)) if wanted else t.new_empty(0)

    grad_bias = weight.new_empty(weight.shape[0] if output_mask[2] else 0)
    return grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]), grad_bias


# autograd: csrc/autograd/conv2d_act.cpp (C++, registered for the Autograd key)


def _direct_kernel_may_run(x, weight, stride, dilation, groups, activation) -> bool:
    """Whether segfast's direct kernel can serve this call's CPU forward (an NCHW first layer: few
    input channels, stride and dilation 1): where the dispatch table takes it, it beats oneDNN and
    so inductor, and the op decides per call, so torch.compile keeps the op for such a layer."""
    from segfast import _C

    nchw = memory_format(x) == memory_format(weight) == torch.contiguous_format
    return (
        activation != "none"
        and x.is_cpu
        and nchw
        and groups == 1
        and tuple(stride) == tuple(dilation) == (1, 1)
        and weight.shape[1] <= _C.direct_conv_max_input_channels
        and max(weight.shape[2:]) <= _C.direct_conv_max_kernel
    )


def _same_padding(op, weight, stride, dilation):
    """padding="same" as torch computes it: (left, extra right) per spatial dim."""
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' needs stride 1 (as in torch), got stride={tuple(stride)}")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    return [t // 2 for t in total], [t % 2 for t in total]


def conv2d_act(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``activation(F.conv2d(input, weight, bias, stride, padding, dilation, groups))`` in one op.

    Args:
        input: (N, C_in, H, W) or unbatched (C_in, H, W); float32, float64, bfloat16 or (CUDA) float16.
        weight: (C_out, C_in / groups, kH, kW), input's dtype.
        bias: (C_out,) or None.
        stride, padding, dilation, groups: as ``F.conv2d``; padding may be "same" or "valid".
        activation: "none", "relu", "leaky_relu", "silu", "gelu" (exact, erf) or "sigmoid".
        negative_slope: slope of "leaky_relu" for negative inputs.

    Returns:
        (N, C_out, H_out, W_out) (unbatched: (C_out, H_out, W_out)) in input's dtype; channels_last
        when input or weight is, as ``F.conv2d``. With ``activation="none"`` it equals ``F.conv2d``.

    Backward saves input, weight and one output-sized tensor (the output for relu, sigmoid and
    leaky_relu with slope >= 0; the pre-activation otherwise), and reduces the bias gradient in
    the same pass that applies the activation derivative.

    Under ``torch.compile``, a call with no gradient to compute is traced as ``F.conv2d`` + the
    activation (inductor lays it out, fuses it and, with ``freezing``, prepacks the weight), except
    where segfast's direct first-layer kernel may run (NCHW, <= 4 input channels, stride and
    dilation 1); with a gradient, and under ``torch.export``, it is ``torch.ops.segfast.conv2d_act``.
    """
    # the values are checked by the kernels (csrc/common/conv2d_act.h), with the messages of
    # F.conv2d's checks: an eager call pays for them once, in C++
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_cpu:
        check_kernel_available(_OP, "segfast::conv2d_act", input)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    stride = pair(_OP, "stride", stride)
    dilation = pair(_OP, "dilation", dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            padding, extra = _same_padding(_OP, weight, stride, dilation)
            if any(extra):  # even dilated kernel: torch pads one more at the bottom/right
                x = F.pad(x, [0, extra[1], 0, extra[0]])
        else:
            raise ValueError(f"{_OP}: padding must be 'valid', 'same', an int or a pair of ints; got {padding!r}")
    else:
        padding = pair(_OP, "padding", padding)
    if inductor_takes_inference(x, weight, bias) and not _direct_kernel_may_run(
        x, weight, stride, dilation, groups, activation
    ):
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        out = stock_activation(_OP, z, activation, negative_slope)
    else:
        out, _ = entry("conv2d_act")(x, weight, bias, stride, padding, dilation, groups, activation, negative_slope)
    return out.squeeze(0) if unbatched else out
