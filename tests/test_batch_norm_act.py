"""batch_norm_act against F.batch_norm + activation (+ residual) in float64: values, gradients and
running statistics over several steps, every mode and layout; the module; the op's contracts."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ACTIVATION_REFERENCES,
    LAYOUTS,
    assert_close_to_reference,
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    seeded_randn,
    skip_unless_supported,
)

import segfast

ACTS = ["none", "relu", "leaky_relu", "silu", "gelu", "sigmoid"]
SHAPES = [(6, 5), (4, 3, 7), (3, 4, 5, 6)]


def reference(x, rm, rv, w, b, training, momentum, eps, activation, slope, residual):
    z = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return ACTIVATION_REFERENCES[activation](z, slope)


def _assert_same(ours, ref, running, leaves):
    """ours == ref, each (ours, reference) running statistic, and the gradients of leaves through both."""
    torch.testing.assert_close(ours, ref)
    for ours_stat, ref_stat in running:
        torch.testing.assert_close(ours_stat, ref_stat)
    grad = torch.randn_like(ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g_ours, g_ref)


def _inputs(
    shape, dtype=torch.float64, layout=torch.contiguous_format, seed=0, affine=True, residual=False, device="cpu"
):
    x, w, b, r, stats = _cpu_inputs(shape, dtype, layout, seed, affine, residual)
    return *(None if t is None else t.to(device) for t in (x, w, b, r)), tuple(t.to(device) for t in stats)


def _cpu_inputs(shape, dtype, layout, seed, affine, residual):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64) + 2).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=layout)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    if r is not None and r.dim() == 4:
        r = r.contiguous(memory_format=layout)
    stats = (torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return x, w, b, r, stats


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_batch_norm_then_activation_float64(device, shape, activation, training, layout, residual):
    if layout == torch.channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b, r, (rm0, rv0) = _inputs(shape, layout=layout, residual=residual, device=device.device)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    ours_rm, ours_rv, ref_rm, ref_rv = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    ours = segfast.ops.batch_norm_act(x, ours_rm, ours_rv, w, b, training, 0.3, 1e-5, activation, 0.2, r)
    ref = reference(x, ref_rm, ref_rv, w, b, training, 0.3, 1e-5, activation, 0.2, r)
    assert ours.is_contiguous(memory_format=layout)
    _assert_same(ours, ref, [(ours_rm, ref_rm), (ours_rv, ref_rv)], leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_low_precision_within_twice_stock_error(device, dtype, layout):
    skip_unless_supported(device, dtype)
    x64, w64, b64, _, (rm, rv) = _inputs((4, 8, 9, 10), layout=layout, device=device.device)
    low = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    # the float64 reference of the same (rounded) inputs: the statistics' gradients are so sensitive to
    # input rounding that a reference of the unrounded inputs would measure the rounding, not the op
    ref = [t.to(dtype).double().requires_grad_() for t in (x64, w64, b64)]

    def run(fn, x, w, b):
        stats = x.dtype  # stock batch_norm wants the statistics in the parameters' dtype
        return fn(x, rm.to(stats), rv.to(stats), w, b, True, 0.1, 1e-5, "relu", 0.0, None)

    ours, stock = run(segfast.ops.batch_norm_act, *low), run(reference, *low)
    exact = run(reference, *ref)
    assert_close_to_reference(ours, stock, exact, "output")
    grad = torch.randn_like(exact)
    for name, a, s, e in zip(
        ("input", "weight", "bias"),
        torch.autograd.grad(ours, low, grad.to(dtype)),
        torch.autograd.grad(stock, low, grad.to(dtype)),
        torch.autograd.grad(exact, ref, grad),
    ):
        assert_close_to_reference(a, s, e, name)


def test_module_over_steps_equals_batchnorm2d_and_relu_and_loads_its_weights():
    torch.manual_seed(0)
    for momentum in (0.1, None):  # None: the cumulative average, counted by num_batches_tracked
        stock = torch.nn.Sequential(torch.nn.BatchNorm2d(6, momentum=momentum), torch.nn.ReLU()).double()
        ours = segfast.nn.BatchNormAct2d(6, momentum=momentum).double()
        ours.load_state_dict(stock[0].state_dict())
        assert ours.state_dict().keys() == stock[0].state_dict().keys()
        for _ in range(3):
            x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 1
            torch.testing.assert_close(ours(x), stock(x))
        for name, value in stock[0].state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], value, msg=name)
        ours.eval(), stock.eval()
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(ours(x), stock(x))
        stock[0].load_state_dict(ours.state_dict())  # and back


def test_no_running_statistics_and_no_affine():
    x, _, _, _, _ = _inputs((3, 4, 5, 6))
    torch.testing.assert_close(
        segfast.ops.batch_norm_act(x, None, None, training=True, activation="silu"),
        F.silu(F.batch_norm(x, None, None, training=True)),
    )
    module = segfast.nn.BatchNormAct2d(4, affine=False, track_running_stats=False).double()
    torch.testing.assert_close(module(x), F.relu(F.batch_norm(x, None, None, training=True)))


def test_deterministic_and_thread_count_independent():
    x, w, b, _, (rm, rv) = _inputs((8, 16, 20, 20), dtype=torch.float32, layout=torch.channels_last)
    x.requires_grad_()

    def run():
        out = segfast.ops.batch_norm_act(x, rm.float().clone(), rv.float().clone(), w, b, True)
        return out, torch.autograd.grad(out, x, torch.ones_like(out))[0]

    threads = torch.get_num_threads()
    first = run()
    torch.set_num_threads(1)
    try:
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(first, single):
        assert torch.equal(a, b_)


def test_saves_one_activation_sized_tensor():
    from conftest import SavedBytes

    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    with SavedBytes([x, w, b]) as saved:
        segfast.ops.batch_norm_act(x, torch.zeros(8), torch.ones(8), w, b, True)
    assert saved.total <= 2 * 8 * 4  # the input is the caller's; new state: mean and invstd


def test_gradcheck_opcheck_compile(device):
    x, w, b, r, (rm, rv) = _inputs((2, 3, 4, 4), residual=True, device=device.device)
    args = [t.requires_grad_() for t in (x, w, b, r)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: segfast.ops.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "silu", 0.01, r), args
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: segfast.ops.batch_norm_act(x, rm, rv, w, b, False, 0.1, 1e-5, "leaky_relu", 0.1, r), args
    )
    op = torch.ops.segfast.batch_norm_act.default
    torch.library.opcheck(op, (x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, "relu", 0.0, r))
    torch.library.opcheck(op, (x, w, b, rm.clone(), rv.clone(), False, 0.1, 1e-5, "gelu", 0.0, None))
    torch.library.opcheck(
        op,
        (
            x.detach().contiguous(memory_format=torch.channels_last),
            None,
            None,
            None,
            None,
            True,
            0.1,
            1e-5,
            "sigmoid",
            0.0,
            None,
        ),
    )

    def f(x, w, b):
        return segfast.ops.batch_norm_act(x, None, None, w, b, True).square().sum()

    if device.name == "cuda-sim":
        return  # the graph calls the same ops as eager (skip_on_simulation, after the checks above)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    torch.testing.assert_close(
        torch.autograd.grad(compiled(x, w, b), [x, w, b]), torch.autograd.grad(f(x, w, b), [x, w, b])
    )


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4), torch.zeros(4), torch.ones(4)),
            ValueError,
            r"running_mean must have shape \(3,\)",
        ),
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(1, 3), None, None, training=True),
            ValueError,
            "more than 1 value per channel",
        ),
        (lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4), None, None, training=False), ValueError, "eval mode"),
        (
            lambda: segfast.ops.batch_norm_act(
                torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
            ),
            TypeError,
            "floating point",
        ),
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4), None, None, training=True, residual=torch.ones(3)),
            ValueError,
            "residual must have input's shape",
        ),
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4), None, None, training=True, activation="tanh"),
            ValueError,
            "activation must be one of",
        ),
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4).long(), None, None, training=True),
            TypeError,
            "dtype",
        ),
        (
            lambda: segfast.ops.batch_norm_act(torch.randn(2, 3, 4), None, None, training=True, inplace=True),
            ValueError,
            "inplace=True recovers the normalised input by inverting the activation",
        ),
        (
            lambda: segfast.ops.batch_norm_act(
                torch.randn(2, 3, 4),
                None,
                None,
                training=True,
                activation="leaky_relu",
                negative_slope=0.0,
                inplace=True,
            ),
            ValueError,
            "negative_slope > 0",
        ),
        (
            lambda: segfast.ops.batch_norm_act(
                torch.randn(2, 3, 4),
                None,
                None,
                torch.tensor([1.0, 0.0, 2.0]),
                None,
                True,
                activation="none",
                inplace=True,
            ),
            ValueError,
            "weight has zeros",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_positional_mistake_is_a_clear_type_error():
    with pytest.raises(TypeError, match="running_mean must be a Tensor or None, got bool"):
        segfast.ops.batch_norm_act(torch.randn(2, 3, 4), True, None)


# ------------------------------------------------------------------------------------ InPlace-ABN


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation, slope", [("none", 0.0), ("leaky_relu", 0.2), ("leaky_relu", 3.0)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_inplace_matches_batch_norm_then_activation_float64(
    device, shape, activation, slope, training, layout, residual, affine
):
    if layout == torch.channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b, r, (rm0, rv0) = _inputs(shape, layout=layout, residual=residual, affine=affine, device=device.device)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    ours_rm, ours_rv, ref_rm, ref_rv = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    ref = reference(x, ref_rm, ref_rv, w, b, training, 0.3, 1e-5, activation, slope, r)
    overwritten = x * 1  # a non-leaf the op may overwrite
    ours = segfast.ops.batch_norm_act(
        overwritten, ours_rm, ours_rv, w, b, training, 0.3, 1e-5, activation, slope, r, inplace=True
    )
    assert ours is overwritten and ours.is_contiguous(memory_format=layout)
    _assert_same(ours, ref, [(ours_rm, ref_rm), (ours_rv, ref_rv)], leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_low_precision_error(dtype):
    # what inverting a rounded output costs: float32 within 2x stock's error; bfloat16's recovered
    # pre-activation carries the output's rounding into the statistics' gradient, bounded here
    x64, w64, b64, _, _ = _inputs((4, 8, 9, 10))
    low = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    ref = [t.to(dtype).double().requires_grad_() for t in (x64, w64, b64)]

    def run(fn, x, w, b, **kw):
        return fn(x, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.1, None, **kw)

    ours = run(segfast.ops.batch_norm_act, low[0] * 1, *low[1:], inplace=True)
    stock, exact = run(reference, *low), run(reference, *ref)
    assert_close_to_reference(ours, stock, exact, "output")
    grad = torch.randn_like(exact)
    grads = zip(
        ("input", "weight", "bias"),
        torch.autograd.grad(ours, low, grad.to(dtype)),
        torch.autograd.grad(stock, low, grad.to(dtype)),
        torch.autograd.grad(exact, ref, grad),
    )
    for name, a, s, e in grads:
        if dtype == torch.float32:
            assert_close_to_reference(a, s, e, name)
        else:
            scale = e.abs().max().item()
            assert (a.double() - e).abs().max().item() <= 0.05 * scale, name


def test_inplace_saves_nothing_activation_sized_of_its_own():
    from conftest import SavedBytes

    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    h = x * 2  # the tensor the op overwrites
    with SavedBytes([x, w, b, h]) as saved:
        segfast.ops.batch_norm_act(h, None, None, w, b, True, activation="leaky_relu", inplace=True)
    assert saved.total <= 2 * 8 * 4  # the output is h's storage; new state: mean and invstd


def test_inplace_autograd_rules_of_in_place_ops():
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        segfast.ops.batch_norm_act(x, None, None, training=True, activation="none", inplace=True)
    h = x.exp()  # exp saves its output: overwriting it must make backward refuse
    segfast.ops.batch_norm_act(h, None, None, training=True, activation="none", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()
    with torch.no_grad():  # no graph: the version still moves
        y = torch.randn(2, 3, 4)
        version = y._version
        segfast.ops.batch_norm_act(y, None, None, training=True, activation="none", inplace=True)
        assert y._version > version


def test_inplace_gradcheck_opcheck_compile(device):
    x, w, b, r, (rm, rv) = _inputs((2, 3, 4, 4), residual=True, device=device.device)
    args = [t.requires_grad_() for t in (x, w, b, r)]

    def f(x, w, b, r, training=True):
        stats = (None, None) if training else (rm, rv)
        return segfast.ops.batch_norm_act(x * 1, *stats, w, b, training, 0.1, 1e-5, "leaky_relu", 0.1, r, inplace=True)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda *a: f(*a, training=False), args)
    op = torch.ops.segfast.batch_norm_act_.default
    torch.library.opcheck(op, (x.detach().clone(), w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, "none", 0.0, r))
    torch.library.opcheck(op, (x.detach().clone(), None, None, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1, None))

    def loss(x, w, b):
        return segfast.ops.batch_norm_act(x * 2, None, None, w, b, True, activation="leaky_relu", inplace=True).sum()

    if device.name == "cuda-sim":
        return  # the graph calls the same ops as eager (skip_on_simulation, after the checks above)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), loss(x, w, b))
    torch.testing.assert_close(
        torch.autograd.grad(compiled(x, w, b), [x, w, b]), torch.autograd.grad(loss(x, w, b), [x, w, b])
    )


# ------------------------------------------------------------------------------- synchronised variant


def _sync_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        batch, c = 4 * world, 6
        model = torch.nn.Sequential(segfast.nn.BatchNormAct2d(c, activation="leaky_relu", negative_slope=0.1))
        model = model.double()
        with torch.no_grad():
            model[0].weight.uniform_(0.5, 1.5, generator=g)
            model[0].bias.normal_(generator=g)
        single = segfast.nn.BatchNormAct2d(c, activation="leaky_relu", negative_slope=0.1).double()
        single.load_state_dict(model[0].state_dict())
        synced = segfast.nn.SyncBatchNormAct2d.convert_sync_batchnorm(model)[0]
        assert type(synced) is segfast.nn.SyncBatchNormAct2d and synced.weight.dtype == torch.float64
        report = {}
        for step in range(3):  # several steps: the running statistics follow the global batch
            x = torch.randn(batch, c, 5, 7, generator=g, dtype=torch.float64) * 2 + 1
            r = torch.randn(batch, c, 5, 7, generator=g, dtype=torch.float64)
            grad = torch.randn(batch, c, 5, 7, generator=g, dtype=torch.float64)
            part = slice(rank * 4, rank * 4 + 4)
            xs, rs = x[part].clone().requires_grad_(), r[part].clone().requires_grad_()
            out = synced(xs, rs)
            (out * grad[part]).sum().backward()
            xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
            ref = single(xa, ra)
            (ref * grad).sum().backward()
            # parameter gradients are each process's share (DDP sums / averages them): summed here
            param_grads = torch.stack([synced.weight.grad, synced.bias.grad])
            dist.all_reduce(param_grads)
            for name, ours, expected in (
                ("output", out, ref[part]),
                ("grad_input", xs.grad, xa.grad[part]),
                ("grad_residual", rs.grad, ra.grad[part]),
                ("grad_weight", param_grads[0], single.weight.grad),
                ("grad_bias", param_grads[1], single.bias.grad),
                ("running_mean", synced.running_mean, single.running_mean),
                ("running_var", synced.running_var, single.running_var),
            ):
                report[f"{name} step {step}"] = (ours.detach() - expected.detach()).abs().max().item()
            for m in (synced, single):
                m.weight.grad = m.bias.grad = None
        synced.eval(), single.eval()
        x = torch.randn(3, c, 4, 4, generator=g, dtype=torch.float64)
        report["eval output"] = (synced(x) - single(x)).abs().max().item()
        torch.save(report, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_synchronised_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_sync_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        report = torch.load(tmp_path / f"{rank}.pt")
        assert len(report) == 22
        for name, difference in report.items():
            assert difference < 1e-10, f"rank {rank}: {name} differs by {difference}"


def test_synchronised_variant_needs_a_process_group():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="process group"):
        segfast.ops.sync_batch_norm_act(x, None, None, torch.ones(3), torch.zeros(3))
    module = segfast.nn.SyncBatchNormAct2d(3)  # no process group: plain BatchNormAct2d
    torch.testing.assert_close(module(x), F.relu(F.batch_norm(x, None, None, training=True)))


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    x = torch.randn(2, 3, 4, 4, device="cuda")
    cases = [
        lambda: torch.ops.segfast.batch_norm_act(
            x, torch.ones(3), None, None, None, True, 0.1, 1e-5, "relu", 0.0, None
        ),
        lambda: torch.ops.segfast.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0, x.cpu()),
    ]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", 0.1), ("silu", 0.0)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_twin_batch_norm_act(accelerator, dtype, layout, activation, slope, training, residual):
    x = seeded_randn(4, 3, 20, 21, dtype=dtype, layout=layout, scale=2)  # 1680 values a channel
    weight, bias = seeded_randn(3, seed=2) + 1.5, seeded_randn(3, seed=3)
    running_mean, running_var = seeded_randn(3, seed=4), torch.rand(3, dtype=torch.float32) + 0.5
    r = seeded_randn(4, 3, 20, 21, dtype=dtype, layout=layout, seed=5) if residual else None
    args = (weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, slope, r)
    ours, cpu = accelerator.both("batch_norm_act", x, *args)
    assert_same_as_twin(ours, cpu, "forward")
    out, mean, invstd = cpu
    grad = seeded_randn(*x.shape, dtype=dtype, layout=layout, seed=6)
    params = (weight, bias, mean, invstd, r, training, activation, slope)
    mask = [True, residual, True, True]
    assert_same_as_twin(*accelerator.both("batch_norm_act_backward", grad, x, *params, False, mask), "backward")
    if activation != "leaky_relu":
        return
    # InPlace-ABN: the output overwrites the input; backward inverts the activation
    ours_x, cpu_x = x.clone().to(accelerator.device), x.clone()
    device_args = [a.to(accelerator.device) if isinstance(a, torch.Tensor) else a for a in args]
    statistics = accelerator.ops.batch_norm_act_(ours_x, *device_args)
    assert_same_as_twin([t.cpu() for t in statistics], torch.ops.segfast.batch_norm_act_(cpu_x, *args), "statistics")
    assert_same_as_twin(ours_x.cpu(), cpu_x, "inplace output")
    backward = (grad, out, *params, True, mask)
    assert_same_as_twin(*accelerator.both("batch_norm_act_backward", *backward), "backward from the output")


def test_twin_batch_norm_act_updates_running_statistics(accelerator):
    x = seeded_randn(4, 3, 20, 21)
    results = []
    for ops, device in ((accelerator.ops, accelerator.device), (torch.ops.segfast, torch.device("cpu"))):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        ops.batch_norm_act(x.to(device), None, None, rm, rv, True, 0.3, 1e-5, "relu", 0.0, None)
        results.append((rm.cpu(), rv.cpu()))
    assert_same_as_twin(*results, "running statistics")
