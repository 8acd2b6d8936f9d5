"""How ``segfast bench`` measures: interleaved timing, memory, and this machine's limits."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from segfast.bench.profiling import FreshOutputs


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call (the first call of a compiled provider includes its compilation)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``torch.no_grad()`` (the inference forward)."""

    def run():
        with torch.no_grad():
            return fn()

    return run


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 2,
    device: str = "cpu",
    progress: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Times each callable ``reps`` times, interleaved, after ``warmup`` calls each: rep r runs them
    in order ``carryover_balanced_orders(n)[r % len(...)]``, so they share the machine's drift and
    each one follows every other one equally often. (A plain rotation, A B C, B C A, ..., has each
    provider follow the same one in most rounds: on CPU, segfast after the compiled stock backward
    ran at 0.66-0.75x the speed of its own copy placed elsewhere.) CUDA calls are timed with events on the
    current stream."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    orders = carryover_balanced_orders(len(names))
    samples: dict[str, list] = {name: [] for name in fns}
    for rep in range(reps):
        for name in (names[i] for i in orders[rep % len(orders)]):
            if device == "cuda":
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                fns[name]()
                end_event.record()
                samples[name].append((start_event, end_event))
            else:
                start = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
        progress()
    if device == "cuda":
        torch.cuda.synchronize()
        samples = {name: [a.elapsed_time(b) for a, b in s] for name, s in samples.items()}
    timings = {}
    for name, s in samples.items():
        quartiles = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        timings[name] = Timing(statistics.median(s), quartiles[0], quartiles[2])
    return timings


def carryover_balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which every index directly follows every other one equally often:
    Williams' crossover design, the n cyclic shifts of 0, 1, n-1, 2, n-2, ... (each ordered pair
    once), with their reverses for an odd n (each pair twice)."""
    first, low, high = [0], 1, n - 1
    for k in range(1, n):
        if k % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 and n > 1 else orders


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Memory ``fn`` needs at its peak above what was in use before it: on CUDA the allocator's
    peak; on CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs), which
    includes memory the allocator returned to the system. glibc's free memory is handed back first
    (malloc_trim), else pages freed by an earlier call would be reused unseen. None where Linux
    does not allow the reset."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    del out
    return max(peak - base, 0) * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


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
    implementation returning fresh tensors of those sizes pays (on CPU mostly the page faults of
    newly mapped memory)."""
    with FreshOutputs() as fresh:
        fn()
    specs = fresh.outputs

    def allocate_and_fill():
        return [torch.empty_strided(size, stride, dtype=dtype).fill_(0) for _, size, stride, dtype in specs]

    return allocate_and_fill


@dataclass
class MachineLimits:
    """Measured here, by the suite: the rates a kernel cannot beat."""

    bandwidth_gb_s: float  # copy of a 256 MiB buffer (read + write)
    gemm_gflop_s: float  # float32 matmul, 2048^3
    conv_gflop_s: float  # float32 3x3 convolution 8x64x64x64 -> 64 (oneDNN / cuDNN)

    @property
    def compute_gflop_s(self) -> float:
        """The faster of the two: on some CPUs the convolution library outruns the BLAS GEMM."""
        return max(self.gemm_gflop_s, self.conv_gflop_s)

    def floor_ms(self, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
        return max(bytes_moved / (self.bandwidth_gb_s * 1e9), flops / (self.compute_gflop_s * 1e9)) * 1e3


def measure_limits(device: str) -> MachineLimits:
    def best_ms(fn, reps=5):
        timed_call(fn, device)  # warm-up
        return min(timed_call(fn, device) for _ in range(reps))

    source = torch.empty(2**26, device=device).fill_(1)  # 256 MiB: beyond any cache
    target = torch.empty_like(source).fill_(0)
    copy_ms = best_ms(lambda: target.copy_(source))
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    gemm_ms = best_ms(lambda: a @ b)
    x, w = torch.randn(8, 64, 64, 64, device=device), torch.randn(64, 64, 3, 3, device=device)
    with torch.no_grad():
        conv_ms = best_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    conv_flops = 2 * 8 * 64 * 64 * 64 * 64 * 9
    return MachineLimits(
        bandwidth_gb_s=2 * source.nbytes / copy_ms / 1e6,
        gemm_gflop_s=2 * n**3 / gemm_ms / 1e6,
        conv_gflop_s=conv_flops / conv_ms / 1e6,
    )


def environment(device: str) -> dict[str, object]:
    """What a result depends on: versions, machine, threads, CPU flags, build, segfast commit."""
    import segfast

    commit = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        pass
    cpu, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx", "sse4"))]
                break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "segfast": segfast.__version__,
        "segfast_commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "build": {k: v for k, v in segfast.build_info().items() if k != "parallel_info"},
    }
    return info
