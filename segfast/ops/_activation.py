"""What the fused op-plus-activation families (conv2d_act, linear_act) share on the Python side."""

from __future__ import annotations

from segfast.ops._common import check_float_arg

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu", "gelu", "sigmoid")


def derivative_from_output(activation: str, negative_slope: float) -> bool:
    """Mirrors derivative_from_output() in csrc/common/activation.h."""
    return activation in ("relu", "sigmoid") or (activation == "leaky_relu" and negative_slope >= 0)


def keeps_preact(activation: str, negative_slope: float) -> bool:
    """Whether the op returns the pre-activation for backward (else an empty tensor)."""
    return activation != "none" and not derivative_from_output(activation, negative_slope)


def check_activation(op: str, activation: str, negative_slope: float) -> float:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    return check_float_arg(op, "negative_slope", negative_slope)
