"""BatchNorm + activation, with an optional residual added before the activation
(``torch.ops.segfast.batch_norm_act``; autograd in csrc/autograd/batch_norm_act.cpp)."""

from __future__ import annotations

import torch

from segfast.ops._activation import check_activation
from segfast.ops._common import accumulation_dtype, check_float_arg, check_kernel_available, entry, memory_format

_OP = "batch_norm_act"


@torch.library.register_fake("segfast::batch_norm_act")
def _batch_norm_act_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps, activation, negative_slope, residual
):
    stats = input.new_empty(input.shape[1], dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(input, memory_format=memory_format(input)), stats, stats.clone()


@torch.library.register_fake("segfast::batch_norm_act_")
def _batch_norm_act_inplace_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps, activation, negative_slope, residual
):
    stats = input.new_empty(input.shape[1], dtype=accumulation_dtype(input.dtype))
    return stats, stats.clone()


@torch.library.register_fake("segfast::batch_norm_act_backward")
def _batch_norm_act_backward_fake(
    grad_output,
    input,
    weight,
    bias,
    mean,
    invstd,
    residual,
    training,
    activation,
    negative_slope,
    from_output,
    output_mask,
):
    def like(t, wanted):
        return torch.empty_like(t, memory_format=memory_format(t)) if wanted else t.new_empty(0)

    affine = weight if weight is not None else input
    return (
        like(input, output_mask[0]),
        like(input, output_mask[1]),
        like(affine, output_mask[2] and weight is not None),
        like(affine, output_mask[3] and weight is not None),
    )


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) [+ residual])``
    in two passes over the input forward and two backward.

    Args:
        input: (N, C), (N, C, L) or (N, C, H, W); float32, float64, bfloat16 (float32 statistics) or
            (CUDA) float16; NCHW or channels_last, read in place (the output keeps the layout).
        running_mean, running_var: (C,) running statistics, updated in place in training as torch
            updates them (``momentum``, unbiased variance); None: batch statistics only.
        weight, bias: (C,) affine parameters, or None (no affine).
        training: normalise with the batch's statistics (and update the running ones), else with
            the running statistics.
        momentum, eps: as ``F.batch_norm`` (``momentum=None``, the cumulative average, is the
            module's: ``segfast.nn.BatchNormAct2d`` passes 1 / num_batches_tracked).
        activation: "none", "relu", "leaky_relu", "silu", "gelu" or "sigmoid"; negative_slope for
            "leaky_relu".
        residual: input-shaped tensor added before the activation (ResNet's bn2 -> + identity -> relu).
        inplace: InPlace-ABN (Rota Bulo et al., CVPR 2018): the output overwrites ``input``, which
            is returned, and is all backward keeps; backward inverts the activation to recover the
            normalised input. Needs activation "none" or "leaky_relu" with negative_slope > 0 and
            a weight without zeros (else ValueError); the input must not be needed elsewhere by
            autograd (as any in-place op).

    Returns:
        the output, input's shape, dtype and layout (with ``inplace``, ``input`` itself).

    Backward keeps the input (one activation-sized tensor; with ``inplace`` the output in its
    place) and two floats per channel, and recomputes the normalised value and the activation's
    derivative from them.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a Tensor, got {type(input).__name__}")
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
        ("residual", residual),
    ):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor or None, got {type(t).__name__}")
    if not input.is_cpu:
        check_kernel_available(_OP, "segfast::batch_norm_act", input)
    if momentum is None:
        raise ValueError(
            f"{_OP}: momentum=None (cumulative average) needs the batch count: use segfast.nn.BatchNormAct2d"
        )
    negative_slope = check_activation(_OP, activation, negative_slope)
    args = (
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        check_float_arg(_OP, "momentum", momentum),
        check_float_arg(_OP, "eps", eps, 0.0),
        activation,
        negative_slope,
        residual,
    )
    if inplace:
        entry("batch_norm_act_")(input, *args)
        return input
    out, _, _ = entry("batch_norm_act")(input, *args)
    return out
