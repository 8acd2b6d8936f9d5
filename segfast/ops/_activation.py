"""What the fused op-plus-activation families (conv2d_act, linear_act) share on the Python side."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segfast.ops._common import check_float_arg

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu", "gelu", "sigmoid")


def derivative_from_output(activation: str, negative_slope: float) -> bool:
    """Mirrors derivative_from_output() in csrc/common/activation.h."""
    return activation in ("relu", "sigmoid") or (activation == "leaky_relu" and negative_slope >= 0)


def keeps_preact(activation: str, negative_slope: float) -> bool:
    """Whether the op returns the pre-activation for backward (else an empty tensor)."""
    return activation != "none" and not derivative_from_output(activation, negative_slope)


def check_activation_name(op: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


def check_activation(op: str, activation: str, negative_slope: float) -> float:
    check_activation_name(op, activation)
    return check_float_arg(op, "negative_slope", negative_slope)


def stock_activation(op: str, z: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """``activation`` applied to z as torch.nn.functional computes it (negative_slope as
    F.leaky_relu takes it: under torch.compile it may be symbolic, where no float check can run)."""
    check_activation_name(op, activation)
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    return z


def inductor_takes_inference(*tensors: torch.Tensor | None) -> bool:
    """Whether a fused op-plus-activation call is traced by torch.compile with no gradient to
    compute. There the op is given to inductor as its stock composition: the core is the same vendor
    convolution / GEMM segfast calls, and inductor adds what an opaque op would block: its layout
    choice (e.g. a channels_last convolution for an NCHW caller, the change back fused into the
    activation), weight prepacking under freezing, and fusion with its neighbours. segfast's fused
    pass pays off in backward (the bias gradient and a compact saved state), which keeps the op,
    as does torch.export (the exported program keeps segfast's kernels)."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
