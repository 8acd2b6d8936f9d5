"""U-Net (Ronneberger et al. 2015) from segfast layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segfast.models._layers import BACKENDS, NORMS, ConvNormAct, LayoutModel, check_choices, head, max_pool

UPSAMPLES = ("transpose", "bilinear")


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, **layer):
        super().__init__(
            ConvNormAct(in_channels, out_channels, **layer), ConvNormAct(out_channels, out_channels, **layer)
        )


class Up(nn.Module):
    """Upsample x2 (halving the channels), match the skip's size, concatenate, double conv."""

    def __init__(self, in_channels: int, out_channels: int, upsample: str, **layer):
        super().__init__()
        self.upsample = upsample
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        else:
            self.up = nn.Conv2d(in_channels, in_channels // 2, 1)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels, **layer)

    def forward(self, x, skip):
        if self.upsample == "transpose":
            x = self.up(x)
        else:
            x = self.up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        # an odd size upstream made x one pixel short: pad it to the skip's size
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], 1))


class UNet(LayoutModel):
    """U-Net: ``depth`` x (double 3x3 conv, 2x2 max-pool) down, a double conv at the bottom, then
    ``depth`` x (upsample, skip concatenation, double conv) up, and a 1x1 head.

    Args:
        in_channels, num_classes: input channels and classes (logits per class).
        base_width: channels of the first level; each level down doubles them.
        depth: number of poolings.
        norm: "batch" (conv -> BatchNorm -> act), "inplace_abn" (the same, segfast's BatchNorm + act
            overwriting the convolution's output: InPlace-ABN, activation "leaky_relu") or "none"
            (conv + act, fused by segfast).
        activation: "relu", "leaky_relu", "silu" or "gelu".
        upsample: "transpose" (2x2 transposed conv) or "bilinear" (bilinear x2 then 1x1 conv).
        backend: "segfast" (segfast layers) or "torch" (stock layers, same parameter names).
        channels_last: run the layers in channels_last (parameters stored so, the input converted,
            NCHW logits returned); None: on the segfast backend, off on the torch backend.

    Input (N, in_channels, H, W) of any H, W >= 2**depth; output logits (N, num_classes, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_width: int = 64,
        depth: int = 4,
        norm: str = "batch",
        activation: str = "relu",
        upsample: str = "transpose",
        backend: str = "segfast",
        channels_last: bool | None = None,
    ):
        super().__init__()
        activations = ("relu", "leaky_relu", "silu", "gelu")
        check_choices(
            "UNet",
            backend=(backend, BACKENDS),
            norm=(norm, NORMS),
            upsample=(upsample, UPSAMPLES),
            activation=(activation, activations),
        )
        if depth < 1 or base_width < 1:
            raise ValueError(f"UNet: depth and base_width must be positive, got {depth}, {base_width}")
        layer = dict(norm=norm, activation=activation, backend=backend)
        self.depth, self.backend = depth, backend
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], **layer)
        self.pool = max_pool(backend)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], **layer) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], upsample, **layer) for i in reversed(range(depth)))
        self.head = head(widths[0], num_classes, backend)
        self._set_layout(channels_last, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2**self.depth:
            raise ValueError(f"UNet: input {tuple(x.shape)} is smaller than 2**depth = {2**self.depth}")
        skips = [self.inc(self._enter(x))]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self._leave(self.head(x))
