"""What a segmentation model's prediction rests on, per pixel: confidence and entropy maps from one
fused pass over the logits (``segfast.ops.softmax_stats``), and a class-saliency map by Grad-CAM
on the model's last decoder block (Selvaraju et al. 2017, in its segmentation form of Vinogradova
et al. 2020: the class's logits summed over the pixels predicted as that class)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segfast.ops.softmax_stats import softmax_stats

__all__ = ["Explanation", "decoder_block", "explain", "grad_cam", "overlay", "two_class"]


def two_class(logits: torch.Tensor) -> torch.Tensor:
    """A binary model's (N, 1, ...) logits x as the (N, 2, ...) logits (0, x), whose softmax is
    (1 - sigmoid(x), sigmoid(x)): argmax, confidence and entropy then read as for any model. Logits
    with more channels come back as they are."""
    return torch.cat([torch.zeros_like(logits), logits], 1) if logits.shape[1] == 1 else logits


@dataclass
class Explanation:
    """One image's maps, each (H, W) float32 on the CPU unless said."""

    mask: torch.Tensor  # int64 predicted classes
    confidence: torch.Tensor  # max softmax probability, in (0, 1]
    entropy: torch.Tensor  # softmax entropy / log C, in [0, 1]
    saliency: torch.Tensor  # Grad-CAM of `saliency_class`, scaled to [0, 1]
    saliency_class: int


def decoder_block(model: nn.Module) -> nn.Module:
    """The block Grad-CAM reads: segfast's UNet's last up block (its inc block at depth 0), FCN's fc7."""
    from segfast.models import FCN, UNet

    if isinstance(model, UNet):
        return model.up[-1] if len(model.up) else model.inc
    if isinstance(model, FCN):
        return model.fc7
    raise ValueError(f"explain: no decoder block known for {type(model).__name__}; pass layer=")


def _recorded_forward(model: nn.Module, layer: nn.Module, batch: torch.Tensor):
    """(two-class logits, the layer's output A) of one forward recorded by autograd: the maps and
    Grad-CAM's gradient both come from it."""
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.update(output=output))
    try:
        with torch.enable_grad():
            logits = two_class(model(batch))
    finally:
        handle.remove()
    return logits, captured["output"]


def _cam(logits, activation, predicted, class_index: int, size) -> torch.Tensor:
    """relu(sum_k a_k A_k), a_k the spatial mean of d score / d A_k, score the class's logits summed
    over the pixels predicted as it (``predicted`` (1, 1, H, W); all pixels when none is),
    upsampled bilinearly to ``size``, scaled to [0, 1]."""
    region = predicted == class_index
    region = region if region.any() else torch.ones_like(region)
    with torch.enable_grad():
        score = (logits[:, class_index : class_index + 1] * region).sum()
        (gradient,) = torch.autograd.grad(score, activation)
    weights = gradient.mean((2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).float().cpu()


def grad_cam(model: nn.Module, layer: nn.Module, image: torch.Tensor, class_index: int) -> torch.Tensor:
    """Grad-CAM of class_index for one (1, C, H, W) image: relu(sum_k a_k A_k) of the layer's output
    A, a_k the spatial mean of d score / d A_k, score the class's logits summed over the pixels
    predicted as it (all pixels when none is); upsampled bilinearly to (H, W), scaled to [0, 1]."""
    logits, activation = _recorded_forward(model, layer, image)
    return _cam(logits, activation, logits.argmax(1, keepdim=True), class_index, image.shape[-2:])


def explain(model: nn.Module, image: torch.Tensor, class_index: int | None = None, layer=None) -> Explanation:
    """The maps of one (C, H, W) image, from one forward pass. ``class_index``: the class Grad-CAM
    explains; default the most frequent predicted class other than 0 (background), or 0 when
    nothing else is predicted. A binary model (one sigmoid channel) reads as two classes, 0 and 1
    (``two_class``)."""
    model.eval()
    batch = image.unsqueeze(0)
    logits, activation = _recorded_forward(model, layer or decoder_block(model), batch)
    predicted, confidence, entropy = softmax_stats(logits.detach().float())
    classes = logits.shape[1]
    mask = predicted[0].cpu()
    if class_index is None:
        counts = torch.bincount(mask.flatten(), minlength=classes)
        counts[0] = 0 if counts[1:].any() else counts[0]
        class_index = int(counts.argmax())
    if not 0 <= class_index < classes:
        raise ValueError(f"explain: class {class_index} is not in [0, {classes})")
    saliency = _cam(logits, activation, predicted[:, None], class_index, batch.shape[-2:])
    entropy = entropy[0].cpu() / max(math.log(classes), 1e-12)
    return Explanation(mask, confidence[0].cpu(), entropy, saliency, class_index)


# a dark-blue -> red -> yellow ramp ("hot"-like), readable over grey images
_RAMP = torch.tensor(
    [[0, 0, 0.3], [0.1, 0.1, 0.9], [0.9, 0.1, 0.1], [1.0, 0.6, 0.0], [1.0, 1.0, 0.4]], dtype=torch.float32
)


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """(H, W, 3) uint8: the (C, H, W) image in [0, 1] (grey or RGB) under a colour map of heat
    (H, W) in [0, 1] with opacity alpha."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    position = heat.clamp(0, 1).nan_to_num(0.0) * (len(_RAMP) - 1)
    low = position.floor().long().clamp(max=len(_RAMP) - 2)
    t = (position - low)[..., None]
    colour = _RAMP[low] * (1 - t) + _RAMP[low + 1] * t
    blended = (1 - alpha) * rgb.permute(1, 2, 0).float().clamp(0, 1) + alpha * colour
    return (blended * 255).round().byte()
