"""linear + bias + activation as one op (``torch.ops.segfast.linear_act``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segfast.ops._activation import inductor_takes_inference, keeps_preact, stock_activation
from segfast.ops._common import check_kernel_available, entry

_OP = "linear_act"


@torch.library.register_fake("segfast::linear_act")
def _linear_act_fake(input, weight, bias, activation, negative_slope):
    out = input.new_empty((*input.shape[:-1], weight.shape[0]))
    return out, (torch.empty_like(out) if keeps_preact(activation, negative_slope) else input.new_empty(0))


@torch.library.register_fake("segfast::linear_act_backward")
def _linear_act_backward_fake(grad_output, saved, input, weight, activation, negative_slope, output_mask):
    return (
        torch.empty_like(input) if output_mask[0] else input.new_empty(0),
        torch.empty_like(weight) if output_mask[1] else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if output_mask[2] else 0),
    )


# autograd: csrc/autograd/linear_act.cpp (C++, registered for the Autograd key)


def linear_act(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``activation(F.linear(input, weight, bias))`` in one op.

    Args:
        input: (*, in_features); float32, float64, bfloat16 or (CUDA) float16.
        weight: (out_features, in_features), input's dtype.
        bias: (out_features,), a one-element tensor (broadcast, as F.linear does) or None.
        activation: "none", "relu", "leaky_relu", "silu", "gelu" (exact) or "sigmoid".
        negative_slope: slope of "leaky_relu" for negative inputs.

    Returns:
        (*, out_features) in input's dtype. With ``activation="none"`` it equals ``F.linear``.

    Backward saves input, weight and one output-sized tensor (the output for relu, sigmoid and
    leaky_relu with slope >= 0, the pre-activation otherwise), and reduces the bias gradient in the
    pass that applies the activation derivative.

    Under ``torch.compile``, a call with no gradient to compute is traced as ``F.linear`` + the
    activation (for inductor to fuse); with a gradient, and under ``torch.export``, it is
    ``torch.ops.segfast.linear_act``.
    """
    # the values are checked by the kernels (csrc/common/linear_act.h), with F.linear's messages
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_cpu:
        check_kernel_available(_OP, "segfast::linear_act", input)
    if bias is not None and bias.dim() < 2 and bias.numel() == 1 and weight.dim() == 2:
        bias = bias.reshape(1).expand(weight.shape[0])  # F.linear broadcasts a one-element bias
    if inductor_takes_inference(input, weight, bias):
        return stock_activation(_OP, F.linear(input, weight, bias), activation, negative_slope)
    out, _ = entry("linear_act")(input, weight, bias, activation, negative_slope)
    return out
