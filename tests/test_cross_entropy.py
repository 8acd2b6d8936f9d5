import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    CapturedCall,
    SavedBytes,
    as_pixel_targets,
    as_pixels,
    assert_close_to_reference,
    assert_grads_close_to_reference,
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    seeded_classes,
    seeded_randn,
    skip_on_simulation,
    skip_unless_supported,
)

import segfast
from segfast.bench.profiling import FreshOutputs

SHAPES = [(6, 5), (2, 5, 7, 3), (2, 4, 3, 2, 5), (5,)]  # (N, C), (N, C, H, W), 3-D volume, unbatched
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # float16: CUDA only


def _case(shape, classes_first=True, target_dtype=torch.int64, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    classes = shape[0] if len(shape) == 1 else shape[1]
    pixel_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, classes, pixel_shape, generator=g)
    if target.dim() > 0:
        target.view(-1)[::3] = ignore_index
    weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
    return logits, target.to(target_dtype), weight


def _compare(device, shape, dtype, kwargs, target_dtype=torch.int64, layout=None):
    skip_unless_supported(device, dtype)
    logits64, target, weight64 = _case(shape, target_dtype=target_dtype, ignore_index=kwargs.get("ignore_index", -100))
    logits64, target, weight64 = logits64.to(device.device), target.to(device.device), weight64.to(device.device)
    if layout is not None:
        logits64 = logits64.to(memory_format=layout)
    kwargs = dict(kwargs)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = weight64
    low = logits64.to(dtype).requires_grad_()
    ref_in = logits64.clone().requires_grad_()
    low_kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    stock_target = target.long()  # torch takes int64 (and uint8) only
    ours = segfast.ops.cross_entropy(low, target, **low_kwargs)
    stock = F.cross_entropy(low, stock_target, **low_kwargs)
    ref = F.cross_entropy(ref_in, stock_target, **kwargs)
    assert ours.shape == ref.shape
    assert_close_to_reference(ours, stock, ref, "loss")
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, low, grad.to(dtype))
    (g_stock,) = torch.autograd.grad(stock, low, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(ref, ref_in, grad)
    assert_close_to_reference(g_ours, g_stock, g_ref, "grad")
    return g_ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("shape", SHAPES)
def test_class_index_targets_match_torch(device, shape, label_smoothing, weighted, ignore_index, reduction, dtype):
    _compare(
        device,
        shape,
        dtype,
        dict(reduction=reduction, ignore_index=ignore_index, weighted=weighted, label_smoothing=label_smoothing),
    )


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_narrow_integer_targets(device, target_dtype):
    _compare(device, (2, 5, 6, 4), torch.float32, dict(ignore_index=3), target_dtype=target_dtype)


@pytest.mark.parametrize("classes", [6, 40])  # on CUDA: a thread per pixel; a warp per pixel
def test_channels_last_logits_are_read_in_place(device, classes):
    kwargs = dict(weighted=True, label_smoothing=0.1)
    grad = _compare(device, (2, classes, 5, 7), torch.float32, kwargs, layout=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_probability_targets_match_torch(device, shape, weighted, reduction, dtype):
    skip_unless_supported(device, dtype)
    g = torch.Generator().manual_seed(1)
    logits64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device.device)
    class_dim = 0 if len(shape) == 1 else 1
    probs64 = torch.rand(shape, generator=g, dtype=torch.float64).softmax(class_dim).to(device.device)
    weight = (
        torch.rand(shape[class_dim], generator=g, dtype=torch.float64).to(device.device) + 0.5 if weighted else None
    )
    low, probs = logits64.to(dtype).requires_grad_(), probs64.to(dtype).requires_grad_()
    ref_in, probs_ref = logits64.clone().requires_grad_(), probs64.clone().requires_grad_()
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    w_low = None if weight is None else weight.to(dtype)
    ours = segfast.ops.cross_entropy(low, probs, weight=w_low, **kwargs)
    stock = F.cross_entropy(low, probs, weight=w_low, **kwargs)
    ref = F.cross_entropy(ref_in, probs_ref, weight=weight, **kwargs)
    assert_close_to_reference(ours, stock, ref, "loss")
    grad = torch.randn_like(ref)
    inputs = ((low, probs), (low, probs), (ref_in, probs_ref))
    assert_grads_close_to_reference(("logits", "target"), (ours, stock, ref), inputs, grad)


@pytest.mark.parametrize("view", ["gapped", "expanded", "transposed"])
def test_non_dense_logits(device, view):
    base = torch.randn(6, 10, 3, dtype=torch.float64, device=device.device, requires_grad=True)
    logits = {
        "gapped": lambda: base[:, ::2],
        "expanded": lambda: base[:1, :5].expand(6, 5, 3),
        "transposed": lambda: base[:, :5].transpose(0, 2),
    }[view]()
    target = torch.randint(0, 5, logits.shape[:1] + logits.shape[2:], device=device.device)
    probs = torch.rand(logits.shape, dtype=torch.float64, device=device.device).softmax(1)
    for tgt in (target, probs):
        ours, ref = segfast.ops.cross_entropy(logits, tgt), F.cross_entropy(logits, tgt)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, base)[0], torch.autograd.grad(ref, base)[0])


def test_all_pixels_ignored_gives_torch_nan_and_zero_grad(device):
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device.device, requires_grad=True)
    target = torch.full((2, 4, 4), -100, device=device.device)
    ours = segfast.ops.cross_entropy(logits, target)
    assert ours.isnan() and F.cross_entropy(logits, target).isnan()
    (grad,) = torch.autograd.grad(ours, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_nan_and_inf_logits_propagate_like_torch(device):
    logits = torch.randn(4, 5, 3, dtype=torch.float64)
    logits[0, 1, 0] = float("nan")
    logits[1, :, 1] = float("-inf")
    logits[2, 2, 2] = float("inf")
    logits[3, 0, 0] = float("-inf")  # one masked class (the first: where the online log-sum-exp starts): finite loss
    target = torch.randint(0, 5, (4, 3))
    target[3, 0] = 1
    logits, target = logits.to(device.device), target.to(device.device)
    ours = segfast.ops.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, reduction="none"), equal_nan=True)


def test_unbatched_input_needs_a_0d_target():
    # torch takes a (1,) target here with some arguments and fails with others (label smoothing,
    # weights); segfast asks for the 0-D target every time
    with pytest.raises(ValueError, match=r"target must have shape \(\) for input \(4,\)"):
        segfast.ops.cross_entropy(torch.randn(4), torch.tensor([2]))
    with pytest.raises(TypeError, match="holds class probabilities and must be floating point"):
        segfast.ops.cross_entropy(torch.randn(1), torch.tensor([0]))


def test_many_classes_and_single_class(device):
    _compare(device, (3, 1000, 2, 2), torch.float32, dict(label_smoothing=0.05))
    _compare(device, (300, 1000), torch.float32, dict(weighted=True, reduction="none"))  # CUDA: a warp per row
    _compare(device, (4, 1, 5), torch.float64, dict())


def test_empty_batch():
    logits, target = torch.randn(0, 4, 3, 3), torch.zeros(0, 3, 3, dtype=torch.int64)
    assert segfast.ops.cross_entropy(logits, target, reduction="sum") == 0
    assert segfast.ops.cross_entropy(logits, target, reduction="none").shape == (0, 3, 3)
    with pytest.raises(ValueError, match="empty batch"):
        segfast.ops.cross_entropy(logits, target)


@pytest.mark.parametrize("probabilities", [False, True])
def test_saves_one_float_per_pixel_beyond_inputs(probabilities):
    logits = torch.randn(2, 21, 16, 16, requires_grad=True)
    target = torch.randn(2, 21, 16, 16).softmax(1) if probabilities else torch.randint(0, 21, (2, 16, 16))
    with SavedBytes(exclude=[logits, target]) as ours:
        segfast.ops.cross_entropy(logits, target)
    with SavedBytes(exclude=[logits, target]) as stock:
        F.cross_entropy(logits, target)
    pixels = 2 * 16 * 16
    assert ours.total <= 4 * pixels + 64  # float32 log-sum-exp per pixel (+ the scalar total weight)
    assert stock.total >= logits.numel() * 4  # torch keeps a log-softmax the size of the logits


def test_backward_allocates_only_the_gradient():
    logits = torch.randn(2, 21, 16, 16, requires_grad=True)
    target = torch.randint(0, 21, (2, 16, 16))
    loss = segfast.ops.cross_entropy(logits, target)
    with FreshOutputs() as fresh:
        torch.autograd.grad(loss, logits)
    big = [(op, tuple(size)) for op, size, _, _ in fresh.outputs if size.numel() > 1]
    assert big == [("segfast.cross_entropy_backward.default", (2, 21, 256))]


def test_deterministic_across_thread_counts():
    logits = torch.randn(4, 21, 64, 64, requires_grad=True)
    target = torch.randint(0, 21, (4, 64, 64))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = segfast.ops.cross_entropy(logits, target, label_smoothing=0.1)
            results.append((loss, *torch.autograd.grad(loss, logits)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_gradcheck(device):
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=device.device, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 3), device=device.device)
    target[0, 0, 0] = -100
    weight = torch.rand(4, dtype=torch.float64, device=device.device) + 0.5
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, reduction=reduction: segfast.ops.cross_entropy(
                x, target, weight, reduction=reduction, label_smoothing=0.2
            ),
            (logits,),
        )
    probs = torch.rand(2, 4, 3, 3, dtype=torch.float64, device=device.device).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: segfast.ops.cross_entropy(x, p, weight), (logits, probs))


def test_opcheck(device):
    logits = torch.randn(2, 5, 12, device=device.device, requires_grad=True)
    target = torch.randint(0, 5, (2, 12), device=device.device)
    weight = torch.rand(5, device=device.device)
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.segfast.cross_entropy.default, (logits, target, weight, reduction, -100, 0.1))
    probs = torch.rand(2, 5, 12, device=device.device).softmax(1)
    torch.library.opcheck(torch.ops.segfast.cross_entropy.default, (logits, probs, None, "mean", -100, 0.0))


def test_torch_compile_fullgraph(device):
    skip_on_simulation(device)

    def step(logits, target):
        return segfast.ops.cross_entropy(logits, target, ignore_index=0, label_smoothing=0.1)

    logits = torch.randn(2, 7, 8, 8, device=device.device, requires_grad=True)
    target = torch.randint(0, 7, (2, 8, 8), device=device.device)
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(logits, target), step(logits, target))
    torch.testing.assert_close(
        torch.autograd.grad(compiled(logits, target), logits)[0], torch.autograd.grad(step(logits, target), logits)[0]
    )


def test_module_and_legacy_arguments():
    logits, target = torch.randn(3, 4, 5, 5), torch.randint(0, 4, (3, 5, 5))
    weight = torch.rand(4)
    ours = segfast.nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.1)
    stock = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(ours(logits, target), stock(logits, target))
    torch.testing.assert_close(
        segfast.ops.cross_entropy(logits, target, size_average=False), F.cross_entropy(logits, target, reduction="sum")
    )
    torch.testing.assert_close(segfast.nn.L1Loss()(logits, logits + 1), torch.tensor(1.0))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3, 4), torch.tensor([[0, 1, 3, 0], [0, 0, 0, 0]])),
            IndexError,
            "target class 3 .* outside \\[0, 3\\)",
        ),
        (lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, -1])), IndexError, "target class -1"),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.int64)),
            ValueError,
            "target must have shape \\(2, 4\\)",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.int16)),
            TypeError,
            "target dtype must be one of",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.rand(2, 4)),
            ValueError,
            "probability target must have input's shape",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.rand(2, 3), ignore_index=1),
            ValueError,
            "ignore_index=1 is not supported",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.rand(2, 3, dtype=torch.float64)),
            TypeError,
            "target dtype torch.float64 differs",
        ),
        (
            lambda: segfast.ops.cross_entropy(
                torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), weight=torch.rand(4)
            ),
            ValueError,
            "weight must have shape \\(3,\\)",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: segfast.ops.cross_entropy(
                torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), label_smoothing=1.5
            ),
            ValueError,
            "label_smoothing must be a finite float in \\[0.0, 1.0\\]",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 3).half(), torch.zeros(2, dtype=torch.int64)),
            TypeError,
            "input dtype must be one of",
        ),
        (
            lambda: segfast.ops.cross_entropy(torch.randn(2, 0), torch.zeros(2, dtype=torch.int64)),
            ValueError,
            "no classes",
        ),
        (
            lambda: segfast.ops.cross_entropy(
                torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), weight=torch.rand(3, requires_grad=True)
            ),
            RuntimeError,
            "weight must not require grad",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_grad_in_forward_matches_the_default_mode(device, dtype, reduction, probabilities):
    skip_unless_supported(device, dtype)
    logits64, target, weight = (t.to(device.device) for t in _case((3, 6, 5, 4), ignore_index=-100))
    if probabilities:
        target = torch.randn(3, 6, 5, 4, dtype=torch.float64, device=device.device).softmax(1).to(dtype)
    kwargs = dict(reduction=reduction, label_smoothing=0.1, weight=weight.to(dtype))
    a = logits64.to(dtype).requires_grad_()
    b = logits64.to(dtype).requires_grad_()
    plain = segfast.ops.cross_entropy(a, target, **kwargs)
    early = segfast.ops.cross_entropy(b, target, grad_in_forward=True, **kwargs)
    torch.testing.assert_close(early, plain, rtol=0, atol=0)
    grad_loss = torch.tensor(0.7, dtype=dtype, device=device.device)
    (g_plain,) = torch.autograd.grad(plain, a, grad_loss)
    (g_early,) = torch.autograd.grad(early, b, grad_loss)
    # the same kernels; only where grad_loss is applied differs (one rounding)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(g_early, g_plain, rtol=tol, atol=tol)


def test_grad_in_forward_keeps_neither_logits_nor_lse():
    logits = torch.randn(2, 21, 16, 16, requires_grad=True)
    target = torch.randint(0, 21, (2, 16, 16))
    with SavedBytes(exclude=[target]) as saved:
        loss = segfast.nn.CrossEntropyLoss(grad_in_forward=True)(logits, target)
    assert saved.total == logits.numel() * 4  # the gradient alone
    assert logits.untyped_storage().data_ptr() not in saved.storages
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.autograd.grad(F.cross_entropy(logits, target), logits)[0])


def test_grad_in_forward_refuses_what_it_cannot_do():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        segfast.ops.cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), reduction="none", grad_in_forward=True)
    with pytest.raises(ValueError, match="target that requires grad"):
        segfast.ops.cross_entropy(logits, torch.rand(2, 3, 4, requires_grad=True), grad_in_forward=True)


def test_grad_in_forward_opcheck_and_compile():
    logits = torch.randn(2, 5, 12, requires_grad=True)
    target = torch.randint(0, 5, (2, 12))
    torch.library.opcheck(torch.ops.segfast.cross_entropy_with_grad.default, (logits, target, None, "mean", -100, 0.0))
    loss_fn = segfast.nn.CrossEntropyLoss(grad_in_forward=True)
    compiled = torch.compile(lambda x: loss_fn(x, target), fullgraph=True)
    torch.testing.assert_close(
        torch.autograd.grad(compiled(logits), logits)[0], torch.autograd.grad(loss_fn(logits, target), logits)[0]
    )


def test_compile_with_dynamic_shapes():
    # cross_entropy_loss checks shapes as SymInts: under dynamic shapes they become guards, not errors
    compiled = torch.compile(segfast.ops.cross_entropy, fullgraph=True, dynamic=True)
    for shape in [(2, 5, 4, 4), (3, 5, 6, 2), (4, 5)]:
        logits = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        target = torch.randint(0, 5, (shape[0], *shape[2:]))
        loss = compiled(logits, target, label_smoothing=0.1)
        expected = F.cross_entropy(logits, target, label_smoothing=0.1)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bitwise_deterministic(device, reduction):
    logits, target, weight = _case((4, 19, 32, 24))
    x = logits.to(device.device, torch.float32).requires_grad_()
    target, weight = target.to(device.device), weight.to(device.device, torch.float32)
    runs = []
    for _ in range(5):
        loss = segfast.ops.cross_entropy(x, target, weight=weight, reduction=reduction)
        runs.append((loss, *torch.autograd.grad(loss, x)))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_bad_class_index_raises_and_the_device_survives(device):
    x = torch.randn(2, 4, 3, 3, device=device.device)
    target = torch.zeros(2, 3, 3, dtype=torch.long, device=device.device)
    target[1, 2, 0] = 4
    with pytest.raises(IndexError, match=r"target class 4 at \(n=1, pixel=6\)"):
        segfast.ops.cross_entropy(x, target)
    if device.name == "cuda":
        torch.cuda.synchronize()  # no device-side assert ended the context
    assert segfast.ops.cross_entropy(x, target.clamp(max=3)).isfinite()


@pytest.mark.parametrize("classes", [3, 40])  # a thread, a warp per pixel
def test_bad_class_index_inside_a_cuda_graph_makes_the_loss_nan(device, classes):
    """Inside a capture the bad-index flag cannot be read (issue 15, defect 5): the bad pixel's loss
    is NaN instead of an IndexError; good input gives what it gives outside a capture."""
    if device.name == "cpu":
        pytest.skip("CUDA graphs capture CUDA kernels")
    x = torch.randn(2, 400, classes, device=device.device).transpose(1, 2)  # classes contiguous
    good = torch.randint(0, classes, (2, 400), device=device.device)
    bad = good.clone()
    bad[1, 149] = classes
    for reduction in ("mean", "none"):
        call = CapturedCall(device, lambda x, t, r=reduction: segfast.ops.cross_entropy(x, t, reduction=r), x, good)
        torch.testing.assert_close(call.run(x, good), segfast.ops.cross_entropy(x, good, reduction=reduction))
        marked = call.run(x, bad)
        assert marked.isnan().any() and (marked.isnan().sum() == 1 or reduction == "mean"), reduction
        if reduction == "none":
            assert marked[1, 149].isnan()


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    x = torch.randn(2, 4, 8, device="cuda")
    t = torch.randint(0, 4, (2, 8), device="cuda")
    cases = [
        lambda: torch.ops.segfast.cross_entropy(x, t, torch.ones(4), "mean", -100, 0.0),
        lambda: torch.ops.segfast.cross_entropy(x, torch.softmax(x, 1).cpu(), None, "mean", -100, 0.0),
        lambda: torch.ops.segfast.cross_entropy(x, t.cpu(), None, "mean", -100, 0.0),
    ]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


def _twin_cross_entropy(accelerator, x, target, weight, reduction, ignore_index, smoothing):
    """Forward and backward on the same arguments; x and target as the caller has them (probability
    targets have x's shape)."""
    x, target = as_pixels(x), as_pixels(target) if target.is_floating_point() else as_pixel_targets(target)
    ours, cpu = accelerator.both("cross_entropy", x, target, weight, reduction, ignore_index, smoothing)
    assert_same_as_twin(ours[0], cpu[0], "loss")
    grad_loss = (
        seeded_randn(*cpu[0].shape, dtype=cpu[0].dtype, seed=3) if reduction == "none" else torch.ones_like(cpu[0])
    )
    _, lse, total_weight = cpu
    backward = (grad_loss, x, target, weight, lse, total_weight, reduction, ignore_index, smoothing)
    assert_same_as_twin(*accelerator.both("cross_entropy_backward", *backward), "grad")


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=dtype_id)
def test_twin_class_targets(accelerator, dtype, layout, reduction, target_dtype):
    x = seeded_randn(3, 5, 23, 29, dtype=dtype, layout=layout, scale=3)  # 2001 pixels: 8 blocks
    target = seeded_classes((3, 23, 29), 5, dtype=target_dtype, ignore_index=255, ignored=0.2)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype) + 0.5
    _twin_cross_entropy(accelerator, x, target, weight, reduction, 255, 0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_twin_probability_targets(accelerator, reduction):
    x = seeded_randn(2, 4, 19, 17, scale=3)
    target = torch.softmax(seeded_randn(2, 4, 19, 17, seed=5), 1)
    _twin_cross_entropy(accelerator, x, target, None, reduction, -100, 0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_twin_rows_with_many_classes(accelerator, reduction, weighted):
    # (N, C) logits with contiguous classes: a warp per row (issue 15, defect 4), 1000 classes = 31.25 per lane
    x = seeded_randn(300, 1000, scale=3)
    weight = torch.rand(1000, generator=torch.Generator().manual_seed(4)) + 0.5 if weighted else None
    target = seeded_classes((300,), 1000, ignore_index=-100, ignored=0.1)
    _twin_cross_entropy(accelerator, x, target, weight, reduction, -100, 0.1)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("classes", [32, 45])
def test_twin_warp_per_pixel_channels_last(accelerator, dtype, classes):
    # channels_last with >= 32 classes: a warp per pixel, lanes past the last class idle
    x = seeded_randn(2, classes, 9, 11, dtype=dtype, layout=torch.channels_last, scale=3)
    x[0, 0, :2] = -math.inf  # the first class masked: lane 0's part starts from -inf
    target = seeded_classes((2, 9, 11), classes, ignore_index=255, ignored=0.2)
    target[0, :2] = 1
    _twin_cross_entropy(accelerator, x, target, None, "none", 255, 0.0)
    _twin_cross_entropy(accelerator, x, target, None, "mean", 255, 0.1)
    probabilities = torch.softmax(seeded_randn(2, classes, 9, 11, seed=5), 1).to(dtype)
    _twin_cross_entropy(accelerator, x, probabilities.to(memory_format=torch.channels_last), None, "sum", -100, 0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_twin_every_pixel_ignored(accelerator, reduction):
    x = seeded_randn(2, 3, 20, 20)
    _twin_cross_entropy(accelerator, x, torch.full((2, 20, 20), -100), None, reduction, -100, 0.0)


def test_twin_infinite_logits(accelerator):
    # -inf masks a class (first class included: the online log-sum-exp must start from it); +inf
    # makes the pixel's loss NaN in torch
    x = seeded_randn(2, 4, 16, 20, scale=3)
    x[:, 0, :4] = -math.inf
    x[:, 2, 4:6] = -math.inf
    x[0, 1, 10, 10] = math.inf
    target = seeded_classes((2, 16, 20), 4)
    target[:, :4] = 1  # not the masked class: a finite loss
    _twin_cross_entropy(accelerator, x, target, None, "none", -100, 0.0)
    _twin_cross_entropy(accelerator, x, target, None, "sum", -100, 0.1)


def test_twin_bad_class_index_raises(accelerator):
    x = seeded_randn(2, 3, 20, 20)
    target = seeded_classes((2, 20, 20), 3)
    target[1, 7, 9] = 3
    for ops, device in ((accelerator.ops, accelerator.device), (torch.ops.segfast, "cpu")):
        with pytest.raises(IndexError, match=r"target class 3 at \(n=1, pixel=149\) is outside \[0, 3\)"):
            ops.cross_entropy(as_pixels(x).to(device), as_pixel_targets(target).to(device), None, "mean", -100, 0.0)


def test_follows_the_current_stream_and_device(device):
    """The kernels launch on the caller's current stream, and on the logits' device (a second GPU
    where the machine has one)."""
    if device.name != "cuda":
        pytest.skip("streams and devices are a GPU's")
    logits, target, weight = _case((4, 19, 32, 24))
    expected = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    for index in range(min(torch.cuda.device_count(), 2)):
        x = logits.to(f"cuda:{index}").requires_grad_()
        t, w = target.to(f"cuda:{index}"), weight.to(f"cuda:{index}")
        side = torch.cuda.Stream(device=index)
        side.wait_stream(torch.cuda.current_stream(index))
        with torch.cuda.stream(side):
            loss = segfast.ops.cross_entropy(x, t, weight=w, label_smoothing=0.1)
            (grad,) = torch.autograd.grad(loss, x)
        side.synchronize()
        torch.testing.assert_close(loss.cpu(), expected)
        assert grad.device == x.device and grad.isfinite().all()
