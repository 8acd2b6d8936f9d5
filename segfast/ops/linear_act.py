"""linear + bias + activation as one op (``torch.ops.segfast.linear_act``)."""

from __future__ import annotations

import torch

from segfast.ops._activation import check_activation, keeps_preact, register_autograd
from segfast.ops._common import check_kernel_available, check_same, check_tensor, float_dtypes

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


register_autograd("segfast::linear_act", torch.ops.segfast.linear_act_backward)


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
    """
    check_tensor(_OP, "input", input, dtypes=float_dtypes(input))
    check_tensor(_OP, "weight", weight, dims=(2,))
    if bias is not None:
        check_tensor(_OP, "bias", bias, dims=(0, 1))
        if bias.numel() == 1 and weight.shape[0] != 1:  # F.linear broadcasts a one-element bias
            bias = bias.reshape(1).expand(weight.shape[0])
    check_same(_OP, "input", input, weight=weight, bias=bias)
    check_kernel_available(_OP, "segfast::linear_act", input)
    negative_slope = check_activation(_OP, activation, negative_slope)
    if input.dim() == 0:
        raise ValueError(f"{_OP}: input must have at least one dimension (*, in_features), got a 0-D tensor")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{_OP}: input has {input.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    out, _ = torch.ops.segfast.linear_act(input, weight, bias, activation, negative_slope)
    return out
