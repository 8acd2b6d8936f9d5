"""Inference deployment: fold eval-mode BatchNorm into the convolutions and fuse the activations."""

from __future__ import annotations

import copy

import torch
from torch import nn

from segfast import nn as snn
from segfast.convert import _activation_of_module

__all__ = ["fold_batchnorm"]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: tuple[str, float] | None) -> snn.Conv2dAct:
    """Conv2dAct computing act(bn(conv(x))) for bn in eval mode: W' = W s, b' = (b - mean) s + beta,
    s = gamma / sqrt(var + eps), computed in float64."""
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        name, slope = activation or ("none", 0.01)
        w = conv.weight
        fused = snn.Conv2dAct(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            True,
            device=w.device,
            dtype=w.dtype,
            activation=name,
            negative_slope=slope,
        )
        fused.weight.copy_(w.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bias)
    return fused.eval()


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    plain_conv = type(conv) is nn.Conv2d or (isinstance(conv, snn.Conv2dAct) and conv.activation == "none")
    return (
        plain_conv
        and conv.padding_mode == "zeros"
        and type(bn) in (nn.BatchNorm2d, snn.BatchNormAct2d)
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Folds every eval-mode ``BatchNorm2d`` that directly follows a convolution into it, and fuses
    the activation after it (or, for ``segfast.nn.BatchNormAct2d``, its own):
    ``conv -> BatchNorm2d [-> ReLU/LeakyReLU/SiLU/GELU/Sigmoid]`` becomes
    one ``segfast.nn.Conv2dAct``; the BatchNorm and activation slots become ``nn.Identity`` (so
    module names stay). Covers ``nn.Sequential`` runs and segfast's models' conv/norm/act blocks.

    The model must be in eval mode (folding uses the running statistics); the folded model's
    outputs equal the original's in eval mode, up to rounding. Returns a folded deep copy, or
    ``model`` itself with ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm: model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "fold_batchnorm: the model is in training mode; call model.eval() first "
            "(folding uses BatchNorm's running statistics)"
        )
    model = model if inplace else copy.deepcopy(model)
    for parent in list(model.modules()):
        slots = list(parent._modules)
        if not isinstance(parent, nn.Sequential):
            slots = [s for s in ("conv", "norm", "act") if s in parent._modules]  # segfast's ConvNormAct
            if slots[:2] != ["conv", "norm"]:
                continue
        for i in range(len(slots) - 1):
            conv, bn = parent._modules[slots[i]], parent._modules[slots[i + 1]]
            if not _foldable(conv, bn):
                continue
            if isinstance(bn, snn.BatchNormAct2d):  # its activation is its own
                activation, after = (bn.activation, bn.negative_slope), None
            else:
                after = parent._modules[slots[i + 2]] if i + 2 < len(slots) else None
                activation = _activation_of_module(after) if after is not None else None
            parent._modules[slots[i]] = _folded(conv, bn, activation)
            parent._modules[slots[i + 1]] = nn.Identity()
            if after is not None and activation is not None:
                parent._modules[slots[i + 2]] = nn.Identity()
    return model
