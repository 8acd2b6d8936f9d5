"""FCN (Long, Shelhamer, Darrell 2015) on a VGG-style backbone, from segfast layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segfast.models._layers import BACKENDS, NORMS, ConvNormAct, LayoutModel, check_choices, head, max_pool

VARIANTS = ("8s", "16s", "32s")


class FCN(LayoutModel):
    """FCN-8s/16s/32s: five VGG stages (3x3 conv + act, then 2x2 max-pool), a fully
    convolutional classifier (``fc6`` 3x3, ``fc7`` 1x1) and the skip-fusion head: class scores at
    pool5, plus (16s) pool4, plus (8s) pool3, each upsampled bilinearly to the next one's size and
    summed, then upsampled to the input.

    Args:
        in_channels, num_classes: input channels and classes.
        variant: "8s", "16s" or "32s".
        base_width: channels of stage 1 (VGG: 64); stages widen x2 up to 8x.
        convs_per_stage: convolutions per stage (VGG-16: (2, 2, 3, 3, 3)).
        norm, backend, channels_last: as for UNet.

    Input (N, in_channels, H, W), any H, W >= 32; output logits (N, num_classes, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: str = "8s",
        base_width: int = 64,
        convs_per_stage=(2, 2, 3, 3, 3),
        norm: str = "none",
        backend: str = "segfast",
        channels_last: bool | None = None,
    ):
        super().__init__()
        check_choices("FCN", variant=(variant, VARIANTS), backend=(backend, BACKENDS), norm=(norm, NORMS))
        if len(convs_per_stage) != 5 or min(convs_per_stage) < 1:
            raise ValueError(f"FCN: convs_per_stage must be 5 positive ints, got {convs_per_stage!r}")
        layer = dict(norm=norm, activation="relu", backend=backend)
        self.variant = variant
        widths = [base_width * m for m in (1, 2, 4, 8, 8)]
        stages, channels = [], in_channels
        for width, convs in zip(widths, convs_per_stage):
            stages.append(
                nn.Sequential(*(ConvNormAct(channels if i == 0 else width, width, **layer) for i in range(convs)))
            )
            channels = width
        self.stages = nn.ModuleList(stages)
        self.pool = max_pool(backend)
        self.fc6 = ConvNormAct(widths[4], 2 * widths[4], 3, **layer)
        self.fc7 = ConvNormAct(2 * widths[4], 2 * widths[4], 1, **layer)
        self.score_fr = head(2 * widths[4], num_classes, backend)
        self.score_pool4 = head(widths[3], num_classes, backend) if variant in ("8s", "16s") else None
        self.score_pool3 = head(widths[2], num_classes, backend) if variant == "8s" else None
        self._set_layout(channels_last, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"FCN: input {tuple(x.shape)} is smaller than 32 (five 2x poolings)")
        x, size, pooled = self._enter(x), x.shape[-2:], []
        for stage in self.stages:
            x = self.pool(stage(x))
            pooled.append(x)
        score = self.score_fr(self.fc7(self.fc6(x)))
        for level, scorer in ((3, self.score_pool4), (2, self.score_pool3)):
            if scorer is not None:
                skip = scorer(pooled[level])
                score = skip + F.interpolate(score, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self._leave(F.interpolate(score, size=size, mode="bilinear", align_corners=False))
