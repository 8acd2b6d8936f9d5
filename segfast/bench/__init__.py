"""``segfast bench``: segfast vs stock PyTorch (eager and torch.compile), per op, per model step and
for augmentation, time and memory, side by side in one run.

>>> from segfast import bench
>>> rows, env = bench.run(["ops"], bench.Settings(quick=True), reps=15)
>>> print(bench.report.markdown(rows))
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm import tqdm

from segfast.bench import augment, dispatch, models, ops, overhead, report
from segfast.bench.cases import Case, Settings
from segfast.bench.measure import (
    MachineLimits,
    environment,
    measure_limits,
    peak_memory_bytes,
    time_side_by_side,
    timed_call,
)

SUITES = {"ops": ops, "models": models, "augment": augment, "overhead": overhead, "dispatch": dispatch}
__all__ = ["SUITES", "Row", "Settings", "report", "run"]


@dataclass
class Row:
    """One provider on one case: every number a result file keeps."""

    suite: str
    name: str
    shape: str
    step: str
    dtype: str
    layout: str
    device: str
    provider: str
    baseline: str
    items: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    first_call_ms: float
    images_per_s: float
    floor_ms: float | None
    saved_bytes: int | None
    peak_bytes: int | None
    note: str = ""


class Progress:
    """tqdm over the timed calls (ETA, rate) on a terminal; elsewhere (CI logs) one line per case."""

    def __init__(self, total: int, enabled: bool):
        on_terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="call", disable=not (enabled and on_terminal), leave=False)
        self.lines, self.done, self.total, self.start = enabled and not on_terminal, 0, total, time.perf_counter()

    def case(self, label: str) -> None:
        self.bar.set_description(label[:60])
        if self.lines:
            sys.stderr.write(f"... {self.done}/{self.total} {time.perf_counter() - self.start:.0f} s {label}\n")

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _first_calls(case: Case) -> tuple[dict[str, float], list[str]]:
    """Milliseconds of each provider's first call (compilation included), for the providers that
    run on this case's inputs (a dtype an implementation does not support raises, and is reported
    instead of timed), and notes saying why the others do not."""
    first, notes = {}, []
    for name, fn in case.providers.items():
        try:
            first[name] = timed_call(fn, case.settings.device)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            notes.append(f"{name}: {str(error).splitlines()[0][:120]}")
    return first, notes


class _CountFlops(TorchDispatchMode):
    """The FLOPs of the aten ops torch has formulas for (convolutions, matmuls, attention), summed.
    (torch's FlopCounterMode also tracks modules, with hooks that autograd.grad on a leaf rejects.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def _flops(case: Case, fn) -> float:
    if case.flops is not None:
        return case.flops
    with _CountFlops() as counter:
        fn()
    return float(counter.total)


def run(
    suites: list[str], settings: Settings, reps: int, only: dict[str, list[str]] | None = None, progress: bool = True
) -> tuple[list[Row], dict]:
    """Runs the named suites and returns one Row per (case, provider) and the environment (with the
    machine's measured bandwidth and GEMM rate, from which each row's floor is computed)."""
    torch._dynamo.config.recompile_limit = 64  # one compiled stock function serves several shapes and modes
    limits: MachineLimits = measure_limits(settings.device)
    cases = deque(case for suite in suites for case in SUITES[suite].cases(settings, (only or {}).get(suite)))
    bar = Progress(reps * len(cases), progress)
    rows: list[Row] = []
    while cases:
        case = cases.popleft()  # dropped after its rows: a suite may hold many cases' tensors until they run
        bar.case(f"{case.suite} {case.name} {case.shape} {case.step}")
        first_call_ms, notes = _first_calls(case)
        providers = {name: case.providers[name] for name in first_call_ms}
        if case.baseline not in providers:
            bar.advance(reps)
            continue
        flops = _flops(case, providers[case.baseline])
        floor = limits.floor_ms(case.bytes_moved, flops) if (case.bytes_moved or flops) else None
        timings = time_side_by_side(providers, reps, device=settings.device, progress=bar.advance)
        note = "; ".join(filter(None, [case.note, *notes]))
        for name, timing in timings.items():
            saved = case.saved_bytes[name]() if name in case.saved_bytes else None
            rows.append(
                Row(
                    case.suite,
                    case.name,
                    case.shape,
                    case.step,
                    settings.dtype,
                    settings.layout,
                    settings.device,
                    name,
                    case.baseline,
                    case.items,
                    timing.median_ms,
                    timing.p25_ms,
                    timing.p75_ms,
                    first_call_ms[name],
                    case.items / timing.median_ms * 1e3,
                    floor,
                    saved,
                    peak_memory_bytes(providers[name], settings.device),
                    note,
                )
            )
    bar.close()
    env = environment(settings.device) | {"settings": asdict(settings), "reps": reps, "limits": asdict(limits)}
    return rows, env
