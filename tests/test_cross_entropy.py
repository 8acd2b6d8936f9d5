import pytest
import torch
import torch.nn.functional as F
from conftest import SavedBytes, assert_close_to_reference, assert_grads_close_to_reference

import segfast
from segfast.bench.profiling import FreshOutputs

SHAPES = [(6, 5), (2, 5, 7, 3), (2, 4, 3, 2, 5), (5,)]  # (N, C), (N, C, H, W), 3-D volume, unbatched
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


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


def _compare(shape, dtype, kwargs, target_dtype=torch.int64, layout=None):
    logits64, target, weight64 = _case(shape, target_dtype=target_dtype, ignore_index=kwargs.get("ignore_index", -100))
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
def test_class_index_targets_match_torch(shape, label_smoothing, weighted, ignore_index, reduction, dtype):
    _compare(
        shape,
        dtype,
        dict(reduction=reduction, ignore_index=ignore_index, weighted=weighted, label_smoothing=label_smoothing),
    )


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_narrow_integer_targets(target_dtype):
    _compare((2, 5, 6, 4), torch.float32, dict(ignore_index=3), target_dtype=target_dtype)


def test_channels_last_logits_are_read_in_place():
    grad = _compare((2, 6, 5, 7), torch.float32, dict(weighted=True, label_smoothing=0.1), layout=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_probability_targets_match_torch(shape, weighted, reduction, dtype):
    g = torch.Generator().manual_seed(1)
    logits64 = torch.randn(shape, generator=g, dtype=torch.float64)
    class_dim = 0 if len(shape) == 1 else 1
    probs64 = torch.rand(shape, generator=g, dtype=torch.float64).softmax(class_dim)
    weight = torch.rand(shape[class_dim], generator=g, dtype=torch.float64) + 0.5 if weighted else None
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
def test_non_dense_logits(view):
    base = torch.randn(6, 10, 3, dtype=torch.float64, requires_grad=True)
    logits = {
        "gapped": lambda: base[:, ::2],
        "expanded": lambda: base[:1, :5].expand(6, 5, 3),
        "transposed": lambda: base[:, :5].transpose(0, 2),
    }[view]()
    target = torch.randint(0, 5, logits.shape[:1] + logits.shape[2:])
    probs = torch.rand(logits.shape, dtype=torch.float64).softmax(1)
    for tgt in (target, probs):
        ours, ref = segfast.ops.cross_entropy(logits, tgt), F.cross_entropy(logits, tgt)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, base)[0], torch.autograd.grad(ref, base)[0])


def test_all_pixels_ignored_gives_torch_nan_and_zero_grad():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((2, 4, 4), -100)
    ours = segfast.ops.cross_entropy(logits, target)
    assert ours.isnan() and F.cross_entropy(logits, target).isnan()
    (grad,) = torch.autograd.grad(ours, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_nan_and_inf_logits_propagate_like_torch():
    logits = torch.randn(4, 5, 3, dtype=torch.float64)
    logits[0, 1, 0] = float("nan")
    logits[1, :, 1] = float("-inf")
    logits[2, 2, 2] = float("inf")
    logits[3, 0, 0] = float("-inf")  # one masked class: finite loss
    target = torch.randint(0, 5, (4, 3))
    target[3, 0] = 1
    ours = segfast.ops.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, reduction="none"), equal_nan=True)


def test_unbatched_input_needs_a_0d_target():
    # torch takes a (1,) target here with some arguments and fails with others (label smoothing,
    # weights); segfast asks for the 0-D target every time
    with pytest.raises(ValueError, match=r"target must have shape \(\) for input \(4,\)"):
        segfast.ops.cross_entropy(torch.randn(4), torch.tensor([2]))
    with pytest.raises(TypeError, match="holds class probabilities and must be floating point"):
        segfast.ops.cross_entropy(torch.randn(1), torch.tensor([0]))


def test_many_classes_and_single_class():
    _compare((3, 1000, 2, 2), torch.float32, dict(label_smoothing=0.05))
    _compare((4, 1, 5), torch.float64, dict())


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


def test_gradcheck():
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 3))
    target[0, 0, 0] = -100
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, reduction=reduction: segfast.ops.cross_entropy(
                x, target, weight, reduction=reduction, label_smoothing=0.2
            ),
            (logits,),
        )
    probs = torch.rand(2, 4, 3, 3, dtype=torch.float64).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: segfast.ops.cross_entropy(x, p, weight), (logits, probs))


def test_opcheck():
    logits = torch.randn(2, 5, 12, requires_grad=True)
    target = torch.randint(0, 5, (2, 12))
    weight = torch.rand(5)
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.segfast.cross_entropy.default, (logits, target, weight, reduction, -100, 0.1))
    probs = torch.rand(2, 5, 12).softmax(1)
    torch.library.opcheck(torch.ops.segfast.cross_entropy.default, (logits, probs, None, "mean", -100, 0.0))


def test_torch_compile_fullgraph():
    def step(logits, target):
        return segfast.ops.cross_entropy(logits, target, ignore_index=0, label_smoothing=0.1)

    logits = torch.randn(2, 7, 8, 8, requires_grad=True)
    target = torch.randint(0, 7, (2, 8, 8))
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
def test_grad_in_forward_matches_the_default_mode(dtype, reduction, probabilities):
    logits64, target, weight = _case((3, 6, 5, 4), ignore_index=-100)
    if probabilities:
        target = torch.randn(3, 6, 5, 4, dtype=torch.float64).softmax(1).to(dtype)
    kwargs = dict(reduction=reduction, label_smoothing=0.1, weight=weight.to(dtype))
    a = logits64.to(dtype).requires_grad_()
    b = logits64.to(dtype).requires_grad_()
    plain = segfast.ops.cross_entropy(a, target, **kwargs)
    early = segfast.ops.cross_entropy(b, target, grad_in_forward=True, **kwargs)
    torch.testing.assert_close(early, plain, rtol=0, atol=0)
    grad_loss = torch.tensor(0.7, dtype=dtype)
    (g_plain,) = torch.autograd.grad(plain, a, grad_loss)
    (g_early,) = torch.autograd.grad(early, b, grad_loss)
    # the same kernels; only where grad_loss is applied differs (one rounding)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
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
