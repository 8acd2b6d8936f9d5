"""The ``overhead`` suite: what one call costs at tiny sizes, where the kernel's work is nothing and
the per-call path is everything (the 8x8 and 16x16 feature maps of every segmentation network,
batch-1 inference). Every op, forward (under no_grad) and forward + backward, segfast vs stock eager,
each provider timed over a loop of ``CALLS`` calls: a row's milliseconds are for ``CALLS`` calls, so
microseconds per call are ``median_ms * 1000 / CALLS``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import segfast
from segfast.bench.augment import stock_augment
from segfast.bench.cases import EAGER, SEGFAST, Case, Settings
from segfast.bench.measure import no_grad
from segfast.bench.ops import stock_dice, stock_focal

SUITE = "overhead"
CALLS = 200


def _looped(fn: Callable[[], object]) -> Callable[[], None]:
    def run():
        for _ in range(CALLS):
            fn()

    return run


def _tiny(settings: Settings, *shape: int, grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, device=settings.device, dtype=settings.torch_dtype)
    return x.to(memory_format=settings.memory_format).requires_grad_(grad) if x.dim() == 4 else x.requires_grad_(grad)


def _ops(settings: Settings):
    """(name, shape, stock, segfast, inputs, inputs to differentiate) of every op at a tiny size."""
    dev = settings.device
    x = _tiny(settings, 1, 4, 8, 8)
    w, b = _tiny(settings, 4, 4, 3, 3), _tiny(settings, 4)
    rows, lw, lb = _tiny(settings, 8, 16), _tiny(settings, 16, 16), _tiny(settings, 16)
    logits = _tiny(settings, 2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 8, 8), device=dev)
    image = _tiny(settings, 1, 3, 8, 8, grad=False)
    mask = torch.randint(0, 5, (1, 8, 8), device=dev)
    theta = torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]], device=dev)
    yield "max_pool2d", "1x4x8x8", lambda t: F.max_pool2d(t, 2), lambda t: segfast.ops.max_pool2d(t, 2), [x], [x]
    yield "avg_pool2d", "1x4x8x8", lambda t: F.avg_pool2d(t, 2), lambda t: segfast.ops.avg_pool2d(t, 2), [x], [x]
    yield (
        "conv2d_act relu",
        "1x4x8x8 -> 4",
        lambda t, w, b: F.relu(F.conv2d(t, w, b, padding=1)),
        lambda t, w, b: segfast.ops.conv2d_act(t, w, b, padding=1, activation="relu"),
        [x, w, b],
        [x, w, b],
    )
    yield (
        "linear_act relu",
        "8x16 -> 16",
        lambda t, w, b: F.relu(F.linear(t, w, b)),
        lambda t, w, b: segfast.ops.linear_act(t, w, b, activation="relu"),
        [rows, lw, lb],
        [rows, lw, lb],
    )
    yield "cross_entropy", "2x5x8x8", F.cross_entropy, segfast.ops.cross_entropy, [logits, target], [logits]
    yield ("dice_loss", "2x5x8x8", stock_dice, segfast.ops.dice_loss, [logits, target], [logits])
    yield ("focal_loss", "2x5x8x8", stock_focal, segfast.ops.focal_loss, [logits, target], [logits])
    yield (
        "confusion_matrix",
        "2x5x8x8",
        lambda x, t: torch.bincount(t.flatten() * 5 + x.argmax(1).flatten(), minlength=25).view(5, 5),
        lambda x, t: segfast.ops.confusion_matrix(x, t, 5),
        [logits, target],
        [],
    )
    yield ("affine_augment", "1x3x8x8 + mask", stock_augment, segfast.ops.affine_augment, [image, mask, theta], [])


def _scalar(out) -> torch.Tensor:
    first = out[0] if isinstance(out, tuple) else out
    return first.sum()


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    for name, shape, stock, ours, inputs, wrt in _ops(settings):
        if only and name.split()[0] not in only:
            continue
        shape = f"{shape}, {CALLS} calls"
        impls = {EAGER: stock, SEGFAST: ours}
        yield Case(
            SUITE,
            name,
            shape,
            "fwd",
            {k: _looped(no_grad(lambda f=f, x=inputs: f(*x))) for k, f in impls.items()},
            1,
            settings,
        )
        if wrt:
            step = {
                k: _looped(lambda f=f, x=inputs, wrt=wrt: torch.autograd.grad(_scalar(f(*x)), wrt))
                for k, f in impls.items()
            }
            yield Case(SUITE, name, shape, "fwd+bwd", step, 1, settings)


NAMES = [
    "max_pool2d",
    "avg_pool2d",
    "conv2d_act",
    "linear_act",
    "cross_entropy",
    "dice_loss",
    "focal_loss",
    "confusion_matrix",
    "affine_augment",
]
