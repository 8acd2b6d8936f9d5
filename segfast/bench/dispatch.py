"""The ``dispatch`` suite: at each CPU choice point between segfast's own kernel and ATen's
(``csrc/cpu/dispatch.h``), every path timed on a grid of layer shapes, each path forced through
``segfast._C.dispatch_force``. Its result files (``benchmarks/results/dispatch-cpu-<dtype>.json``)
are what ``benchmarks/update_dispatch.py`` turns into the table the kernels decide from
(``csrc/cpu/dispatch_table.inc``): a row wherever segfast's path beat every other path at every
measured point of a box of shapes.

The providers are paths, not libraries: ``vendor`` (oneDNN in the caller's NCHW layout, the
baseline), ``channels_last`` (oneDNN runs channels_last: in forward the activation pass writes the
NCHW output, in backward it writes grad_z channels_last) and ``direct`` (segfast's direct
convolution for layers with <= 4 input channels).
Every point is a batch of ``BATCH`` images: the table is keyed on the output pixels of the whole
batch (what decides between the paths is mostly how much memory a call touches), so the image size
axis spans it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from segfast import _C
from segfast.bench.cases import Case, Settings

SUITE = "dispatch"
VENDOR, CHANNELS_LAST, DIRECT = "vendor", "channels_last", "direct"
FORWARD, BACKWARD, BACKWARD_WEIGHT = "conv2d_act forward", "conv2d_act backward", "conv2d_act backward weight"
NAMES = ["forward", "backward"]

# what each provider forces, {choice point: path}; the choices it leaves alone cannot arise in its case
FORCED = {
    VENDOR: {
        "direct_conv_forward": "vendor",
        "direct_conv_weight_grad": "vendor",
        "channels_last_backward": "vendor",
        "channels_last_forward": "vendor",
    },
    CHANNELS_LAST: {
        "direct_conv_forward": "vendor",
        "direct_conv_weight_grad": "vendor",
        "channels_last_backward": "segfast",
        "channels_last_forward": "segfast",
    },
    DIRECT: {"direct_conv_forward": "segfast", "direct_conv_weight_grad": "segfast"},
}
BATCH = 8


def grid(quick: bool) -> dict[str, tuple[int, ...]]:
    """The measured values of each axis: a network's first layers (1-4 input channels, kernels up to
    7: the direct kernel's range) and the narrow layers after them (8-64 channels, 1x1 and 3x3)."""
    if quick:
        return {"direct_in": (3,), "direct_k": (3,), "layer_in": (16,), "layer_k": (3,), "out": (16,), "size": (32, 64)}
    return {
        "direct_in": (1, 3, 4),
        "direct_k": (3, 5, 7),
        "layer_in": (8, 16, 32, 64),
        "layer_k": (1, 3),
        "out": (16, 64),
        "size": (32, 64, 128, 256),
    }


@contextlib.contextmanager
def forcing(paths: dict[str, str]) -> Iterator[None]:
    """Inside, the CPU choice points named in ``paths`` take the given path ("segfast" / "vendor")
    whatever the table says; after, the table decides again."""
    for choice, path in paths.items():
        _C.dispatch_force(choice, path)
    try:
        yield
    finally:
        for choice in paths:
            _C.dispatch_force(choice, None)


def forced(paths: dict[str, str], fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with forcing(paths):
            return fn()

    return run


def _lazy(build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """The call ``build`` returns, built at the first call: a case's tensors exist only while it runs
    (the runner drops each case after its rows), not for the whole grid at once."""
    built = None

    def run():
        nonlocal built
        if built is None:
            built = build()
        return built()

    return run


def _layer(settings: Settings, cin: int, cout: int, k: int, size: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cin, size, size, generator=gen).to(settings.torch_dtype)
    w = (torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).to(settings.torch_dtype)
    b = torch.randn(cout, generator=gen).to(settings.torch_dtype)
    return x, w, b


def _conv_args(k: int) -> tuple:
    return ([1, 1], [k // 2, k // 2], [1, 1], 1)


def _forward(settings, cin, cout, k, size):
    x, w, b = _layer(settings, cin, cout, k, size)

    def run():
        with torch.no_grad():
            return torch.ops.segfast.conv2d_act(x, w, b, *_conv_args(k), "relu", 0.01)

    return run


def _backward(settings, cin, cout, k, size, input_grad: bool):
    x, w, b = _layer(settings, cin, cout, k, size)
    with torch.no_grad():
        saved, _ = torch.ops.segfast.conv2d_act(x, w, b, *_conv_args(k), "relu", 0.01)
    grad = torch.randn(saved.shape, generator=torch.Generator().manual_seed(1)).to(saved.dtype)
    mask = [input_grad, True, True]
    return lambda: torch.ops.segfast.conv2d_act_backward(grad, saved, x, w, *_conv_args(k), "relu", 0.01, mask)


def _points(axes: dict, direct: bool):
    ins, kernels = (axes["direct_in"], axes["direct_k"]) if direct else (axes["layer_in"], axes["layer_k"])
    for cin in ins:
        for k in kernels:
            for cout in axes["out"]:
                for size in axes["size"]:
                    yield cin, k, cout, size


def _case(settings, name, step, cin, size, cout, k, paths: dict[str, Callable]) -> Case:
    shape = f"{BATCH}x{cin}x{size}x{size} -> {cout} k{k}"
    providers = {p: forced(FORCED[p], fn) for p, fn in paths.items()}
    return Case(SUITE, name, shape, step, providers, BATCH, settings, baseline=VENDOR)


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    if settings.device != "cpu":
        return
    axes = grid(settings.quick)
    if not only or "forward" in only:
        for direct in (True, False):
            for cin, k, cout, size in _points(axes, direct):
                fwd = _lazy(lambda a=(settings, cin, cout, k, size): _forward(*a))
                paths = {VENDOR: fwd, CHANNELS_LAST: fwd} | ({DIRECT: fwd} if direct else {})
                yield _case(settings, FORWARD, "fwd", cin, size, cout, k, paths)
    if not only or "backward" in only:
        for direct in (True, False):
            for cin, k, cout, size in _points(axes, direct):
                for input_grad in (False, True):
                    bwd = _lazy(lambda a=(settings, cin, cout, k, size, input_grad): _backward(*a))
                    paths = {VENDOR: bwd, CHANNELS_LAST: bwd}
                    if direct and not input_grad:
                        paths[DIRECT] = bwd
                    name = BACKWARD if input_grad else BACKWARD_WEIGHT
                    yield _case(settings, name, "bwd", cin, size, cout, k, paths)
