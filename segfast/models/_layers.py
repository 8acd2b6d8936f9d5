"""Layer factories shared by the models: the same parameter names on both backends, so a
state_dict loads in either and ``backend="torch"`` is an exact A/B baseline."""

from __future__ import annotations

import torch
from torch import nn

import segfast.nn as snn

BACKENDS = ("segfast", "torch")
NORMS = ("batch", "inplace_abn", "none")
_TORCH_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}


def check_choices(model: str, **arguments) -> None:
    """Each keyword ``name=(value, choices)``: a ValueError naming the model and argument unless
    value is one of choices."""
    for name, (value, choices) in arguments.items():
        if value not in choices:
            raise ValueError(f"{model}: {name} must be one of {', '.join(choices)}, got {value!r}")


class LayoutModel(nn.Module):
    """A model that runs its layers in channels_last when asked: parameters stored channels_last,
    the input converted on the way in, NCHW logits out."""

    def _set_layout(self, channels_last: bool | None, backend: str) -> None:
        """None: channels_last on the segfast backend (oneDNN's 3x3 convolutions with 16-64 channels
        run faster in it on CPU: the quick suite's U-Net training step went from 47.8 to 40.3 ms),
        the caller's layout on the torch backend (the stock baseline, as users run it)."""
        self.channels_last = backend == "segfast" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _leave(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.contiguous() if self.channels_last else logits


class ConvNormAct(nn.Module):
    """conv k x k -> [BatchNorm] -> activation, as ``conv`` / ``norm`` / ``act`` submodules.

    segfast without norm: one ``Conv2dAct`` (activation fused) and ``act`` is Identity; with
    BatchNorm: the convolution, then ``BatchNormAct2d`` (BatchNorm and activation fused, BatchNorm2d's
    parameter names) and ``act`` is Identity; "inplace_abn" is that BatchNormAct2d with
    ``inplace=True``, overwriting the convolution's output (leaky_relu only). The torch backend keeps
    three stock modules (the same math for "batch" and "inplace_abn").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        norm: str = "batch",
        activation: str = "relu",
        backend: str = "segfast",
    ):
        super().__init__()
        if norm == "inplace_abn" and activation != "leaky_relu":
            raise ValueError(
                f"norm='inplace_abn' inverts the activation in backward: it needs 'leaky_relu', got {activation!r}"
            )
        padding = kernel_size // 2
        fused = backend == "segfast" and norm == "none"
        if fused:
            self.conv = snn.Conv2dAct(in_channels, out_channels, kernel_size, padding=padding, activation=activation)
        elif backend == "segfast":
            self.conv = snn.Conv2dAct(
                in_channels, out_channels, kernel_size, padding=padding, bias=norm == "none", activation="none"
            )
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=norm == "none")
        if norm != "none" and backend == "segfast":
            self.norm = snn.BatchNormAct2d(out_channels, activation=activation, inplace=norm == "inplace_abn")
        else:
            self.norm = nn.BatchNorm2d(out_channels) if norm != "none" else nn.Identity()
        self.act = nn.Identity() if backend == "segfast" else _TORCH_ACTIVATIONS[activation]()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def max_pool(backend: str) -> nn.Module:
    return snn.MaxPool2d(2) if backend == "segfast" else nn.MaxPool2d(2)


def head(in_channels: int, num_classes: int, backend: str) -> nn.Module:
    """The 1x1 classifier: logits, no activation."""
    if backend == "segfast":
        return snn.Conv2dAct(in_channels, num_classes, 1, activation="none")
    return nn.Conv2d(in_channels, num_classes, 1)
