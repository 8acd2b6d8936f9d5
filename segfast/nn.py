"""Modules mirroring ``torch.nn``: same constructor arguments and state_dict keys, segfast ops inside."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import L1Loss  # the mean-absolute-error loss: torch's own is already a single kernel

from segfast import ops
from segfast.ops._activation import check_activation

__all__ = [
    "AvgPool2d",
    "BatchNormAct2d",
    "Conv2dAct",
    "CrossEntropyLoss",
    "DiceBCELoss",
    "DiceCELoss",
    "DiceLoss",
    "FocalLoss",
    "L1Loss",
    "LinearAct",
    "MaxPool2d",
    "SyncBatchNormAct2d",
]


class Conv2dAct(nn.Conv2d):
    """``nn.Conv2d`` followed by an activation, as one fused op.

    Arguments are ``nn.Conv2d``'s plus ``activation`` (see ``segfast.ops.ACTIVATIONS``) and
    ``negative_slope`` (leaky_relu). Parameters are ``weight`` (C_out, C_in / groups, kH, kW) and
    ``bias`` (C_out,), so state_dicts load both ways with ``nn.Conv2d``. Only
    ``padding_mode="zeros"`` is supported.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ):
        if padding_mode != "zeros":
            raise ValueError(f"Conv2dAct: only padding_mode='zeros' is supported, got {padding_mode!r}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"Conv2dAct: activation must be one of {', '.join(ops.ACTIVATIONS)}; got {activation!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        window = (self.stride, self.padding, self.dilation, self.groups)
        return ops.conv2d_act(input, self.weight, self.bias, *window, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


class LinearAct(nn.Linear):
    """``nn.Linear`` followed by an activation, as one fused op.

    Arguments are ``nn.Linear``'s plus ``activation`` and ``negative_slope``; parameters are
    ``weight`` (out_features, in_features) and ``bias`` (out_features,), so state_dicts load both
    ways with ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ):
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"LinearAct: activation must be one of {', '.join(ops.ACTIVATIONS)}; got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear_act(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` on segfast's kernel (compact uint8 argmax saved for backward)."""

    def forward(self, input: torch.Tensor):
        window = (self.kernel_size, self.stride, self.padding, self.dilation)
        return ops.max_pool2d(input, *window, ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` on segfast's kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        window = (self.kernel_size, self.stride, self.padding)
        return ops.avg_pool2d(input, *window, self.ceil_mode, self.count_include_pad, self.divisor_override)


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an activation, as one fused op (``segfast.ops.batch_norm_act``).

    Arguments are ``nn.BatchNorm2d``'s plus ``activation`` (default "relu"), ``negative_slope``
    (leaky_relu) and ``inplace`` (InPlace-ABN: the output overwrites the input, which must be a
    tensor nothing else in the graph needs — a convolution's output is; "none" or "leaky_relu"
    with a positive slope only, see ``segfast.ops.batch_norm_act``). The state_dict keys are
    BatchNorm2d's (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``),
    so weights load both ways. ``forward(input, residual=None)`` adds ``residual`` before the
    activation (ResNet's bn2 -> + identity -> relu).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        inplace: bool = False,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        check_activation("BatchNormAct2d", activation, negative_slope)
        if inplace and not (activation == "none" or (activation == "leaky_relu" and negative_slope > 0)):
            raise ValueError(
                "BatchNormAct2d: inplace=True (InPlace-ABN) inverts the activation in backward, so it needs "
                f"activation 'none' or 'leaky_relu' with negative_slope > 0; got {activation!r}, {negative_slope}"
            )
        self.activation, self.negative_slope, self.inplace = activation, negative_slope, inplace

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        # nn.BatchNorm2d's rules for the momentum and for which statistics are used and updated
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return ops.batch_norm_act(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.inplace,
        )

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{inplace}"


class SyncBatchNormAct2d(BatchNormAct2d):
    """:class:`BatchNormAct2d` whose training statistics are the whole batch's across the processes
    of ``process_group`` (``torch.distributed``), as ``nn.SyncBatchNorm``: one all_gather per layer
    in forward, one all_reduce in backward (``segfast.ops.sync_batch_norm_act``). In eval mode, or
    without an initialised process group of more than one process, it is BatchNormAct2d. Build it
    with :meth:`convert_sync_batchnorm`; ``inplace=True`` is not offered here."""

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        if self.inplace:
            raise ValueError("SyncBatchNormAct2d: inplace=True (InPlace-ABN) is not available synchronised")
        self.process_group = process_group

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        synchronised = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        if not (self.training and synchronised):
            return super().forward(input, residual)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = self.num_features
        weight = self.weight if self.affine else torch.ones(c, dtype=input.dtype, device=input.device)
        bias = self.bias if self.affine else torch.zeros(c, dtype=input.dtype, device=input.device)
        return ops.sync_batch_norm_act(
            input,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            weight,
            bias,
            factor,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``nn.SyncBatchNorm.convert_sync_batchnorm`` for segfast models: every BatchNormAct2d becomes
        a SyncBatchNormAct2d (parameters and running statistics kept), and every stock BatchNorm
        an ``nn.SyncBatchNorm``. Returns the converted module (``module`` itself when it is not a
        BatchNorm)."""
        if isinstance(module, BatchNormAct2d) and not isinstance(module, SyncBatchNormAct2d) and not module.inplace:
            state = [*module.parameters(), *module.buffers()]
            factory = dict(device=state[0].device, dtype=state[0].dtype) if state else {}
            synced = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                activation=module.activation,
                negative_slope=module.negative_slope,
                process_group=process_group,
                **factory,
            )
            synced.load_state_dict(module.state_dict())
            synced.train(module.training)
            return synced
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, BatchNormAct2d):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` on segfast's per-pixel kernel.

    ``grad_in_forward=True`` (keyword-only, segfast's addition) computes the gradient in the
    forward pass; see :func:`segfast.ops.cross_entropy`.
    """

    def __init__(self, *args, grad_in_forward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_in_forward = grad_in_forward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            grad_in_forward=self.grad_in_forward,
        )


def _as_buffer(value) -> torch.Tensor | None:
    """A loss's class weights as a buffer (it follows the module's .to()): a tensor as given, a number
    (0-D) or a sequence of numbers as a float tensor; the op reads a 0-D one by MONAI's rule."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        raise TypeError(f"class weights must be a number, a sequence of numbers or a tensor, got {value!r}")
    return torch.tensor(value, dtype=torch.get_default_dtype())


class DiceLoss(nn.Module):
    """Soft Dice loss with the softmax (or, ``mode="binary"`` / ``"multilabel"``, the sigmoid) fused
    in; arguments as :func:`segfast.ops.dice_loss`."""

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        squared_pred: bool = False,
        ignore_index: int = -100,
        weight: torch.Tensor | float | Sequence[float] | None = None,
        batch: bool = False,
        reduction: str = "mean",
        mode: str = "multiclass",
    ):
        super().__init__()
        self.register_buffer("weight", _as_buffer(weight))
        self.options = dict(
            mode=mode,
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            squared_pred=squared_pred,
            ignore_index=ignore_index,
            batch=batch,
            reduction=reduction,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.dice_loss(input, target, weight=self.weight, **self.options)


class FocalLoss(nn.Module):
    """Focal loss with the softmax (or, ``mode="binary"`` / ``"multilabel"``, the sigmoid) fused in;
    arguments as :func:`segfast.ops.focal_loss`."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: torch.Tensor | float | Sequence[float] | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        mode: str = "multiclass",
    ):
        super().__init__()
        self.register_buffer("alpha", _as_buffer(alpha))
        self.gamma, self.ignore_index, self.reduction, self.mode = gamma, ignore_index, reduction, mode

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.focal_loss(
            input,
            target,
            mode=self.mode,
            gamma=self.gamma,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class DiceBCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_bce * BCE`` of sigmoid logits from one fused pass (binary and
    multi-label segmentation); arguments as :func:`segfast.ops.dice_bce_loss`."""

    def __init__(
        self,
        mode: str = "binary",
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        ignore_index: int = -100,
        weight: torch.Tensor | float | Sequence[float] | None = None,
        **dice_options,
    ):
        super().__init__()
        self.register_buffer("weight", _as_buffer(weight))
        self.options = dict(mode=mode, lambda_dice=lambda_dice, lambda_bce=lambda_bce, ignore_index=ignore_index)
        self.options.update(dice_options)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.dice_bce_loss(input, target, weight=self.weight, **self.options)


class DiceCELoss(nn.Module):
    """``lambda_dice * DiceLoss + lambda_ce * CrossEntropyLoss`` on the same logits (MONAI's
    DiceCELoss), both segfast's fused ops; ``ignore_index`` and ``weight`` apply to both."""

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ignore_index: int = -100,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        **dice_options,
    ):
        super().__init__()
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.dice = DiceLoss(ignore_index=ignore_index, weight=weight, **dice_options)
        # one number weighs every class alike: a weighted mean over pixels does not change
        ce_weight = self.dice.weight if self.dice.weight is not None and self.dice.weight.dim() == 1 else None
        self.ce = CrossEntropyLoss(weight=ce_weight, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(input, target) + self.lambda_ce * self.ce(input, target)
