"""What the fused op-plus-activation families (conv2d_act, linear_act) share on the Python side."""

from __future__ import annotations

import torch

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


def saved_activation(ctx, output, activation: str, negative_slope: float):
    """In setup_context: the one activation-sized tensor backward needs (the output where the
    derivative follows from it, else the pre-activation); the pre-activation output gets no
    zero-filled gradient."""
    out, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.set_materialize_grads(False)
    return out if derivative_from_output(activation, negative_slope) else preact


def register_autograd(op: str, backward_op) -> None:
    """Autograd for a fused op ``(input, weight, bias, *args, activation, negative_slope) ->
    (output, preact)`` whose backward op takes ``(grad_output, saved, input, weight, *args,
    activation, negative_slope, output_mask)`` and returns (grad_input, grad_weight, grad_bias)."""

    def setup_context(ctx, inputs, output):
        input, weight, bias, *args = inputs
        ctx.save_for_backward(input, weight, saved_activation(ctx, output, *args[-2:]))
        ctx.args, ctx.has_bias, ctx.inputs = args, bias is not None, len(inputs)

    def backward(ctx, grad_out, _grad_preact):
        if grad_out is None:
            return (None,) * ctx.inputs
        input, weight, saved = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_op(grad_out, saved, input, weight, *ctx.args, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * (ctx.inputs - 3)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
