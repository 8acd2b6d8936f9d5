"""Shared benchmark helpers: side-by-side timing, saved-for-backward bytes, tables and JSON."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from segfast.profiling import FreshOutputs

FLOOR = "output floor"


@dataclass
class Case:
    """One op at one shape: variants (e.g. "eager", "compile", "segfast") of the same computation.

    Each variant is a callable returning the output (forward) and a callable running forward +
    backward; inputs are built once per case so that every variant sees the same tensors.
    """

    op: str
    shape: str
    forward: dict[str, Callable[[], object]]
    forward_backward: dict[str, Callable[[], object]]
    saved_bytes: dict[str, Callable[[], int]] = field(default_factory=dict)


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    variant: str
    median_ms: float
    saved_bytes: int | None = None


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``torch.no_grad()`` (the inference forward)."""
    def run():
        with torch.no_grad():
            return fn()
    return run


def time_side_by_side(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                      device: str = "cpu") -> dict[str, float]:
    """Median milliseconds of each callable, run interleaved so that they share the machine's
    noise, the order rotating each round (A B C, B C A, ...) so that no variant always follows
    the same one (allocator and cache state carry over from call to call). On CUDA each call is
    timed with events on the current stream."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list] = {name: [] for name in fns}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                samples[name].append((start, end))
            else:
                start = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
        samples = {name: [a.elapsed_time(b) for a, b in s] for name, s in samples.items()}
    return {name: statistics.median(s) for name, s in samples.items()}


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def saved_tensor_bytes(forward: Callable[[], object], inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward, not counting storage shared with
    ``inputs`` (which the caller holds anyway). Each storage counts once."""
    excluded = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def output_floor(fn: Callable[[], object]) -> Callable[[], object]:
    """A callable that allocates and writes once every tensor ``fn``'s ops return: what any
    implementation returning fresh tensors of those sizes pays (here mostly page faults of newly
    mapped memory), the floor under ``fn``'s time."""
    with FreshOutputs() as fresh:
        fn()
    specs = fresh.outputs

    def allocate_and_fill():
        return [torch.empty_strided(size, stride, dtype=dtype).fill_(0) for _, size, stride, dtype in specs]

    return allocate_and_fill


def machine_info() -> dict[str, object]:
    import segfast

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "segfast_commit": commit,
        "python": platform.python_version(),
        "cpu": cpu or platform.processor(),
        "threads": torch.get_num_threads(),
        "build": {k: v for k, v in segfast.build_info().items() if k != "parallel_info"},
    }


def markdown_table(rows: list[Row], baseline: str = "eager", ours: str = "segfast") -> str:
    """One line per (op, shape, mode): each variant's time and its ratio to ours."""
    groups: dict[tuple[str, str, str], dict[str, Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.shape, row.mode), {})[row.variant] = row
    variants = list(dict.fromkeys(r.variant for r in rows))
    compared = [v for v in variants if v not in (ours, FLOOR)]
    with_saved = [v for v in variants if v != FLOOR]
    header = ["op", "shape", "pass"] + [f"{v} ms" for v in variants]
    header += [f"{v} / {ours}" for v in compared] + ["saved for bwd: " + " / ".join(with_saved)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (op, shape, mode), by_variant in groups.items():
        mine = by_variant.get(ours)
        cells = [op, shape, mode] + [f"{by_variant[v].median_ms:.2f}" if v in by_variant else "" for v in variants]
        for v in compared:
            ok = mine and v in by_variant
            cells.append(f"{by_variant[v].median_ms / mine.median_ms:.2f}x" if ok else "")
        saved = [by_variant[v].saved_bytes if v in by_variant else None for v in with_saved]
        cells.append(" / ".join("-" if b is None else _mib(b) for b in saved) if any(b is not None for b in saved)
                     else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_json(path: Path, rows: list[Row], extra: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
