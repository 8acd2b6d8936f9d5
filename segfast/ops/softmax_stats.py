"""What a prediction says of itself, per pixel, in one read of the logits
(``torch.ops.segfast.softmax_stats``): argmax, max softmax probability and softmax entropy."""

from __future__ import annotations

import math

import torch

from segfast.ops._common import check_kernel_available, check_tensor, entry, float_dtypes

_OP = "softmax_stats"


@torch.library.register_fake("segfast::softmax_stats")
def _softmax_stats_fake(input):
    n, _, s = input.shape
    return input.new_empty((n, s), dtype=torch.int64), input.new_empty((n, s)), input.new_empty((n, s))


def softmax_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel: the predicted class, its softmax probability (the confidence) and the softmax
    entropy, from one read of the logits.

    Equals ``(input.argmax(1), input.softmax(1).amax(1), torch.special.entr(input.softmax(1)).sum(1))``
    (torch.argmax's rule for ties and NaN: the first maximum, or the first NaN; a NaN or +inf
    logit makes the pixel's probability and entropy NaN, as torch's softmax; -inf logits are
    classes of probability 0). Accumulates in float32 (float64 for float64); not differentiable
    (the outputs never require grad).

    Args:
        input: logits (N, C, d1, ...) float32, float64, bfloat16 (or float16 on CUDA), any layout.

    Returns:
        (argmax int64, max_prob, entropy), each (N, d1, ...); max_prob in (0, 1] and entropy in
        [0, log C] nats, in input's dtype.
    """
    check_tensor(_OP, "input", input, dtypes=float_dtypes(input))
    if input.dim() < 2 or input.shape[1] == 0:
        raise ValueError(f"{_OP}: input must be (N, C, d1, ...) logits with C > 0, got shape {tuple(input.shape)}")
    check_kernel_available(_OP, "segfast::softmax_stats", input)
    pixel_shape = input.shape[:1] + input.shape[2:]
    flat = input.detach().reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))
    return tuple(t.view(pixel_shape) for t in entry("softmax_stats")(flat))
