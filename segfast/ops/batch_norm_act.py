"""BatchNorm + activation, with an optional residual added before the activation
(``torch.ops.segfast.batch_norm_act``; autograd in csrc/autograd/batch_norm_act.cpp)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from segfast.ops._activation import check_activation
from segfast.ops._common import accumulation_dtype, check_float_arg, check_kernel_available, entry, memory_format

_OP = "batch_norm_act"


def _empty_statistics(input):
    """(mean, invstd): one value per channel in the accumulation dtype."""
    return tuple(input.new_empty(input.shape[1], dtype=accumulation_dtype(input.dtype)) for _ in range(2))


@torch.library.register_fake("segfast::batch_norm_act")
def _batch_norm_act_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps, activation, negative_slope, residual
):
    return torch.empty_like(input, memory_format=memory_format(input)), *_empty_statistics(input)


@torch.library.register_fake("segfast::batch_norm_act_")
def _batch_norm_act_inplace_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps, activation, negative_slope, residual
):
    return _empty_statistics(input)


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


class _SyncBatchNormAct(torch.autograd.Function):
    """Training-mode batch_norm_act with the batch statistics of every process in ``group``, as
    ``nn.SyncBatchNorm``: one all_gather of (count, mean, variance) in forward, one all_reduce of
    the two per-channel gradient sums in backward. Normalising and its backward run segfast's
    kernels in their given-statistics (eval) mode; the statistics' own gradient is added here.
    Parameter gradients are this process's (DDP averages them), the input gradient the global one."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, momentum, eps, activation, slope, group):
        dims = [0] + list(range(2, input.dim()))
        count = input.numel() // input.shape[1]
        var, mean = torch.var_mean(input, dim=dims, correction=0)
        local = torch.stack([torch.full_like(mean, count), mean, var]).to(torch.float64)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        counts, means, variances = torch.stack(gathered).unbind(1)
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        if running_mean is not None:  # torch's update: unbiased variance of the global batch
            running_mean.mul_(1 - momentum).add_(global_mean.to(running_mean.dtype), alpha=momentum)
            unbiased = global_var * total / (total - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        out, mean, invstd = entry("batch_norm_act")(
            input, weight, bias, global_mean, global_var, False, 0.0, eps, activation, slope, residual
        )
        ctx.save_for_backward(input, weight, bias, mean, invstd, residual)
        ctx.args, ctx.total, ctx.group = (activation, slope), total, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, bias, mean, invstd, residual = ctx.saved_tensors
        activation, slope = ctx.args
        # eval-mode backward: w * invstd * g, g itself for the residual, and the local sums
        mask = [ctx.needs_input_grad[0], residual is not None and ctx.needs_input_grad[3], True, True]
        saved = (input, weight, bias, mean, invstd, residual)
        grad_in, grad_res, sum_gxhat, sum_g = torch.ops.segfast.batch_norm_act_backward(
            grad_out.contiguous(), *saved, False, activation, slope, False, mask
        )
        sums = torch.stack([sum_g, sum_gxhat]).to(torch.float64)
        dist.all_reduce(sums, group=ctx.group)
        if ctx.needs_input_grad[0]:
            shape = [1, -1] + [1] * (input.dim() - 2)
            k = (weight.to(invstd.dtype) * invstd / ctx.total.to(invstd.dtype)).view(shape)
            xhat = (input.to(invstd.dtype) - mean.view(shape)) * invstd.view(shape)
            g_sum, gxhat_sum = (s.to(invstd.dtype).view(shape) for s in sums)
            grad_in = (grad_in.to(invstd.dtype) - k * (g_sum + xhat * gxhat_sum)).to(input.dtype)
        return (
            grad_in if ctx.needs_input_grad[0] else None,
            sum_gxhat if ctx.needs_input_grad[1] else None,
            sum_g if ctx.needs_input_grad[2] else None,
            grad_res if residual is not None and ctx.needs_input_grad[3] else None,
        ) + (None,) * 7


def sync_batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    """Training-mode :func:`batch_norm_act` whose batch statistics are those of the whole batch
    across the processes of ``process_group`` (``torch.distributed``; default: the world), as
    ``nn.SyncBatchNorm`` computes them: one all_gather per call in forward, one all_reduce in
    backward. Every process calls it, with its own part of the batch.

    Args: as :func:`batch_norm_act` in training; ``weight`` and ``bias`` are required (C,)
    tensors (use ones and zeros for no affine). The running statistics are updated with the global
    batch's mean and unbiased variance. Not under ``torch.compile`` (the collectives run in Python
    autograd) and not in place.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: the synchronised variant needs an initialised torch.distributed process group")
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_OP}: the synchronised variant needs weight and bias tensors (ones and zeros for no affine)")
    negative_slope = check_activation(_OP, activation, negative_slope)
    return _SyncBatchNormAct.apply(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        check_float_arg(_OP, "momentum", momentum),
        check_float_arg(_OP, "eps", eps, 0.0),
        activation,
        negative_slope,
        process_group,
    )
