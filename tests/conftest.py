"""Shared test helpers: the backends every family's tests run on (the `device` and `accelerator`
fixtures), and tolerances in the flash-attention style (our error against a float64 reference at
most twice stock PyTorch's error in the same dtype, plus a small floor)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import platform

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import segfast  # noqa: F401  (registers the ops)

# ------------------------------------------------------------------------------------- backends


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a test's segfast kernels run. "cpu": the C++ kernels. "cuda-sim": the CUDA kernels
    (csrc/cuda/*.cu) compiled for the CPU SIMT simulation (docs/cuda-sim.md), on CPU tensors: while
    the test runs, every segfast op's CPU kernel is the simulated CUDA one, so the Python faces,
    autograd and modules run the CUDA code. "cuda": a GPU."""

    name: str

    @property
    def device(self) -> torch.device:
        """Where the test's tensors live."""
        return torch.device("cuda" if self.name == "cuda" else "cpu")

    @property
    def ops(self):
        """The op namespace whose kernels are this backend's (for direct torch.ops calls)."""
        return torch.ops.segfast_sim if self.name == "cuda-sim" else torch.ops.segfast

    def __str__(self) -> str:
        return self.name

    def both(self, op: str, *args):
        """(this backend's result moved to the CPU, the CPU kernel's result) of torch.ops op on the same
        arguments (copies of them: some ops write their arguments)."""

        def copies(device):
            return [a.clone().to(device) if isinstance(a, torch.Tensor) else a for a in args]

        def to_cpu(result):
            if isinstance(result, (tuple, list)):
                return type(result)(to_cpu(r) for r in result)
            return result.cpu() if isinstance(result, torch.Tensor) else result

        return to_cpu(getattr(self.ops, op)(*copies(self.device))), getattr(torch.ops.segfast, op)(*copies("cpu"))


def _simulation_available() -> str | None:
    """None when segfast._cuda_sim is importable, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):  # CMakeLists.txt builds the simulation there only
        return "the CUDA simulation's fibers are x86-64 code"
    try:
        importlib.import_module("segfast._cuda_sim")
    except ImportError as e:
        return f"segfast._cuda_sim is not built ({e}); `make build` builds it"
    return None


def _cuda_available() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    # a GPU with a build that has no CUDA kernels is a failure, not a skip: the test runs and fails
    return None


def _backend_params(names):
    why_not = {"cpu": lambda: None, "cuda-sim": _simulation_available, "cuda": _cuda_available}
    marks = {"cpu": [], "cuda-sim": [pytest.mark.cuda_sim], "cuda": [pytest.mark.cuda]}
    params = []
    for name in names:
        reason = why_not[name]()
        skip = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(Backend(name), id=name, marks=marks[name] + skip))
    return params


@contextlib.contextmanager
def _simulated_cuda_kernels():
    """Every segfast op whose CUDA file the simulation compiled runs its simulated CUDA kernel for
    CPU tensors until the block ends (a Python kernel over the C++ CPU kernel, removed after)."""
    import warnings

    library = torch.library.Library("segfast", "IMPL")
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("segfast_sim::") or not torch._C._dispatch_has_kernel_for_dispatch_key(
            qualified, "CPU"
        ):
            continue
        name = qualified.split("::")[1]
        simulated = getattr(torch.ops.segfast_sim, name).default

        def kernel(*args, _simulated=simulated, **kwargs):
            return _simulated(*args, **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns once that a kernel is overridden: that is the point
            library.impl(name, kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()


class CapturedCall:
    """fn(*inputs) as a CUDA graph replays it. On "cuda": captured once into a torch.cuda.CUDAGraph
    (after a warm-up call), then each run copies new values into the captured inputs and replays.
    On "cuda-sim": each run calls fn with the simulated stream marked as capturing, so the kernels
    take the paths they take inside a capture (no host reads). Not for "cpu"."""

    def __init__(self, device: Backend, fn, *inputs):
        assert device.name in ("cuda", "cuda-sim"), device
        self.device, self.fn, self.inputs = device, fn, [t.clone() for t in inputs]
        if device.name == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(*self.inputs)

    def run(self, *inputs):
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        if self.device.name == "cuda":
            self.graph.replay()
            torch.cuda.synchronize()
            return self.output.clone()
        import segfast._cuda_sim

        segfast._cuda_sim.set_stream_capturing(True)
        try:
            return self.fn(*self.inputs)
        finally:
            segfast._cuda_sim.set_stream_capturing(False)


def assert_mixed_devices_refused(device: Backend, cases) -> None:
    """Each call (a direct torch.ops call with one argument left on the CPU) is a ValueError, not an
    illegal memory access that ends the CUDA context (issue 15, defect 8). A GPU only."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    for call in cases:
        with pytest.raises(ValueError, match="is on cpu but"):
            call()
    torch.cuda.synchronize()  # the context is alive


def skip_unless_supported(device: Backend, dtype: torch.dtype):
    """float16 runs on the GPU only: the CPU kernels (and so the simulation, compared with them and
    run on CPU tensors) take float64, float32 and bfloat16."""
    if dtype == torch.float16 and device.name != "cuda":
        pytest.skip("float16 is a CUDA-only dtype")


def skip_on_simulation(device: Backend, why: str = "torch.compile's graph calls the same ops as eager"):
    """For tests whose subject is not the kernels (compile, registration): the simulation would only
    repeat the CPU run, slower."""
    if device.name == "cuda-sim":
        pytest.skip(why)


@pytest.fixture(params=_backend_params(["cpu", "cuda-sim", "cuda"]))
def device(request):
    """Each backend in turn (a Backend: .device for the tensors, .ops, .name)."""
    backend = request.param
    if backend.name == "cuda":
        assert segfast.build_info()["cuda"], "this segfast build has no CUDA kernels (build against a CUDA torch)"
    with _simulated_cuda_kernels() if backend.name == "cuda-sim" else contextlib.nullcontext():
        yield backend


@pytest.fixture(params=_backend_params(["cuda-sim", "cuda"]))
def accelerator(request):
    """The CUDA kernels, simulated or on a GPU, for comparisons against their CPU twins (Backend.both:
    torch.ops.segfast_sim against torch.ops.segfast, the CPU kernels left in place)."""
    if request.param.name == "cuda":
        assert segfast.build_info()["cuda"], "this segfast build has no CUDA kernels (build against a CUDA torch)"
    return request.param


# stock PyTorch for each fused activation, as act(z, negative_slope)
ACTIVATION_REFERENCES = {
    "none": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": F.leaky_relu,
    "silu": lambda z, slope: F.silu(z),
    "gelu": lambda z, slope: F.gelu(z),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
}


def dynamo_graph_targets(fn, *args) -> list[str]:
    """The functions and ops in the graph dynamo traces from fn(*args) (fullgraph), by name."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True)(*args)
    return targets


# ------------------------------------------------------------- comparisons with the CPU twin

# a different summation order: a few ulps of the accumulation type, relative to the values' scale
TWIN_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2}
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def dtype_id(value) -> str:
    """Readable test ids ("float32", "channels_last") so that -k can select them."""
    return str(value).removeprefix("torch.")


def seeded_randn(*shape, dtype=torch.float32, layout=torch.contiguous_format, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return t.to(memory_format=layout) if t.dim() == 4 else t


def seeded_classes(shape, classes, seed=1, dtype=torch.int64, ignore_index=None, ignored=0.0):
    """Class indices in [0, classes), a fraction `ignored` of them ignore_index."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, shape, generator=g)
    if ignore_index is not None and ignored:
        t[torch.rand(shape, generator=g) < ignored] = ignore_index
    return t.to(dtype)


def as_pixels(x):
    """(N, C, *spatial) as the kernels take it, (N, C, S) (a view, as the Python faces make it); (N, C)
    rows become (N, C, 1)."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)


def as_pixel_targets(target):
    """(N, *spatial) class indices as the kernels take them, (N, S)."""
    return target.flatten(1) if target.dim() > 1 else target.unsqueeze(1)


def assert_same_as_twin(ours, cpu, what=""):
    """Equal structure; tensors equal exactly (integers) or to the dtype's summation tolerance."""
    if isinstance(cpu, (tuple, list)):
        assert len(ours) == len(cpu)
        for i, (a, b) in enumerate(zip(ours, cpu)):
            assert_same_as_twin(a, b, f"{what}[{i}]")
        return
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype, (
        f"{what}: {ours.shape} {ours.dtype} vs {cpu.shape} {cpu.dtype}"
    )
    if not cpu.is_floating_point():
        assert torch.equal(ours, cpu), f"{what}: integers differ"
        return
    scale = max(1.0, cpu.double().nan_to_num(0, 0, 0).abs().max().item()) if cpu.numel() else 1.0
    tolerance = TWIN_TOLERANCE[cpu.dtype]
    torch.testing.assert_close(ours, cpu, rtol=tolerance, atol=tolerance * scale, equal_nan=True, msg=what)


def assert_fused_act_same_as_twin(accelerator, op, x, weight, bias, window, activation, slope):
    """conv2d_act / linear_act forward, then backward from the tensor forward saved (the
    pre-activation or the output), against the CPU twin."""
    ours, cpu = accelerator.both(op, x, weight, bias, *window, activation, slope)
    assert_same_as_twin(ours, cpu, "forward")
    out, preact = cpu
    channels_last = out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)
    grad = seeded_randn(*out.shape, dtype=out.dtype, layout=LAYOUTS[channels_last], seed=4)
    backward = (grad, preact if preact.numel() else out, x, weight, *window, activation, slope, [True, True, True])
    assert_same_as_twin(*accelerator.both(f"{op}_backward", *backward), "backward")


# ---------------------------------------------------------------- comparisons with float64

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
