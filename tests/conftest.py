"""Shared test helpers: tolerances in the flash-attention style (our error against a float64
reference at most twice stock PyTorch's error in the same dtype, plus a small floor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import segfast  # noqa: F401  (registers the ops)

# stock PyTorch for each fused activation, as act(z, negative_slope)
ACTIVATION_REFERENCES = {
    "none": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": F.leaky_relu,
    "silu": lambda z, slope: F.silu(z),
    "gelu": lambda z, slope: F.gelu(z),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
}

# error floor per dtype, for outputs where stock happens to be exact
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def max_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    a, reference = a.double(), reference.double()
    both_nan = a.isnan() & reference.isnan()
    same_inf = (a == reference) & reference.isinf()
    diff = (a - reference).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    return diff.max().item() if diff.numel() else 0.0


def assert_close_to_reference(ours: torch.Tensor, stock: torch.Tensor, reference: torch.Tensor, what: str = ""):
    """|ours - ref| <= 2 |stock - ref| + floor, all against the float64 reference."""
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    assert ours.dtype == stock.dtype, f"{what}: dtype {ours.dtype} vs stock {stock.dtype}"
    scale = max(1.0, reference.double().abs().max().item()) if reference.numel() else 1.0
    bound = 2 * max_error(stock, reference) + FLOOR[ours.dtype] * scale
    err = max_error(ours, reference)
    assert err <= bound, f"{what}: error {err:.3g} vs float64 reference exceeds {bound:.3g} (stock's x2 + floor)"


def assert_grads_close_to_reference(names, outputs, inputs, grad):
    """The gradients of (ours, stock, reference) outputs w.r.t. their own inputs (three tuples, one
    tensor per name), under the float64 grad (cast for ours and stock), by the rule above."""
    ours, stock, ref = (
        torch.autograd.grad(out, wrt, grad.to(out.dtype)) for out, wrt in zip(outputs, inputs, strict=True)
    )
    for name, a, s, r in zip(names, ours, stock, ref, strict=True):
        assert_close_to_reference(a, s, r, f"grad {name}")


def every_window_reaches_the_input(size, kernel, stride, padding, dilation, ceil_mode) -> bool:
    """False when some pooling window along this axis holds only padding (e.g. a 1-pixel input,
    kernel 2, dilation 2, padding 1). torch then returns -inf with an index outside the window,
    and its own max_pool2d backward writes out of bounds (heap corruption, seen with torch 2.13),
    so tests must not run torch's backward there."""
    from segfast.ops.pooling import _pooled_size

    out = _pooled_size(size, kernel, stride, padding, dilation, ceil_mode)
    return all(any(0 <= o * stride - padding + t * dilation < size for t in range(kernel)) for o in range(out))


class SavedBytes:
    """Counts the bytes autograd saves for backward, except storage shared with `exclude`."""

    def __init__(self, exclude=()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.excluded:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def pytest_terminal_summary(terminalreporter):
    """`make fuzz` reports how many cases each op saw (and how many were invalid or refused)."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.STATS:
        terminalreporter.write_sep("-", "fuzz cases")
        for key, count in sorted(fuzz.STATS.items()):
            terminalreporter.write_line(f"{key}: {count}")
