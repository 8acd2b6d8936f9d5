"""CUDA kernels against stock PyTorch on the same GPU (``pytest -m cuda``; skipped without a GPU).

float32 and float64 to tight tolerances, float16/bfloat16 with the rule "our error <= 2x stock's
error in the same dtype, both against a float64 reference"; gradients; opcheck and
torch.compile(fullgraph=True) on CUDA tensors; bitwise-deterministic cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ACTIVATION_REFERENCES, assert_close_to_reference, every_window_reaches_the_input

import segfast

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LOW = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _id(value) -> str:  # readable test ids ("float32", "channels_last") so that -k can select them
    return str(value).removeprefix("torch.")


@pytest.fixture(autouse=True, scope="module")
def _build_has_cuda():
    # a GPU with a build that has no CUDA kernels is a failure, not a skip
    assert segfast.build_info()["cuda"], "this segfast build has no CUDA kernels (build against a CUDA torch)"


def _randn(*shape, seed=0, layout=torch.contiguous_format, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(memory_format=layout) if t.dim() == 4 else t


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)


def _check_three_ways(ours_fn, stock_fn, inputs64, dtype, what, seed=1):
    """Runs ours and stock in `dtype` on CUDA and stock in float64, compares outputs and grads."""
    low = [None if t is None else t.to("cuda", dtype).requires_grad_() for t in inputs64]
    ref = [None if t is None else t.to("cuda").requires_grad_() for t in inputs64]
    ours, stock, reference = ours_fn(*low), stock_fn(*low), stock_fn(*ref)
    assert_close_to_reference(ours, stock, reference, f"{what} output")
    grad = _randn(*reference.shape, seed=seed).to("cuda")
    for name, g_ours, g_stock, g_ref in zip(
        ("input", "weight", "bias"),
        _grads(ours, low, grad.to(dtype)),
        _grads(stock, low, grad.to(dtype)),
        _grads(reference, ref, grad),
    ):
        assert_close_to_reference(g_ours, g_stock, g_ref, f"{what} grad {name}")
    return ours


# ------------------------------------------------------------------------------------ conv2d_act

CONV_GEOMETRIES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=0, dilation=1, groups=1),
    dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
]


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("activation", list(ACTIVATION_REFERENCES))
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_act_matches_stock(dtype, layout, activation, geometry, bias):
    kw = CONV_GEOMETRIES[geometry]
    x = _randn(2, 4, 11, 9, layout=layout)
    w = _randn(6, 4 // kw["groups"], 3, 3, seed=2, scale=0.3)
    b = _randn(6, seed=3) if bias else None
    slope = 0.1
    act = ACTIVATION_REFERENCES[activation]
    ours = _check_three_ways(
        lambda x, w, b: segfast.ops.conv2d_act(x, w, b, activation=activation, negative_slope=slope, **kw),
        lambda x, w, b: act(F.conv2d(x, w, b, **kw), slope),
        [x, w, b],
        dtype,
        "conv2d_act",
    )
    assert ours.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), (3, 0)])
@pytest.mark.parametrize("activation", ["relu", "silu", "none"])
@pytest.mark.parametrize("channels", [(32, 64), (64, 48)])
def test_conv2d_act_igemm_matches_stock(monkeypatch, dtype, kernel, padding, activation, channels):
    monkeypatch.setenv("SEGFAST_CUDA_CONV", "igemm")
    c_in, c_out = channels
    x = _randn(2, c_in, 13, 10, layout=torch.channels_last)
    w = _randn(c_out, c_in, kernel, kernel, seed=2, scale=0.1).to(memory_format=torch.channels_last)
    b = _randn(c_out, seed=3)
    act = ACTIVATION_REFERENCES[activation]
    _check_three_ways(
        lambda x, w, b: segfast.ops.conv2d_act(x, w, b, padding=padding, activation=activation),
        lambda x, w, b: act(F.conv2d(x, w, b, padding=padding), 0.01),
        [x, w, b],
        dtype,
        "igemm",
    )


# ------------------------------------------------------------------------------------ linear_act


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("activation", list(ACTIVATION_REFERENCES))
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (5,)])
def test_linear_act_matches_stock(dtype, activation, shape):
    act = ACTIVATION_REFERENCES[activation]
    _check_three_ways(
        lambda x, w, b: segfast.ops.linear_act(x, w, b, activation=activation, negative_slope=0.2),
        lambda x, w, b: act(F.linear(x, w, b), 0.2),
        [_randn(*shape), _randn(9, 5, seed=2), _randn(9, seed=3)],
        dtype,
        "linear_act",
    )


# --------------------------------------------------------------------------------------- pooling

POOL_GEOMETRIES = [
    dict(kernel_size=2, stride=2, padding=0, ceil_mode=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), ceil_mode=False),
]


@pytest.mark.parametrize("dtype", LOW + [torch.float64], ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("geometry", range(len(POOL_GEOMETRIES)))
@pytest.mark.parametrize("dilation", [1, 2])
def test_max_pool2d_matches_stock_bitwise(dtype, layout, geometry, dilation):
    kw = dict(POOL_GEOMETRIES[geometry], dilation=dilation)
    x = _randn(2, 5, 12, 11)
    x.view(-1)[::17] = float("nan")  # NaN wins, as in torch
    x = x.to("cuda", dtype).to(memory_format=layout)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours, ours_idx = segfast.ops.max_pool2d(a, return_indices=True, **kw)
    stock, stock_idx = F.max_pool2d(b, return_indices=True, **kw)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours_idx, stock_idx)
    assert ours.is_contiguous(memory_format=layout)
    grad = torch.randn_like(stock)
    (g_ours,) = torch.autograd.grad(segfast.ops.max_pool2d(a, **kw), a, grad)
    (g_stock,) = torch.autograd.grad(stock, b, grad)
    torch.testing.assert_close(
        g_ours.float(),
        g_stock.float(),
        rtol=1e-2 if dtype != torch.float32 else 1e-6,
        atol=1e-2 if dtype != torch.float32 else 1e-6,
    )


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("geometry", range(len(POOL_GEOMETRIES)))
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("divisor_override", [None, 3])
def test_avg_pool2d_matches_stock(dtype, layout, geometry, count_include_pad, divisor_override):
    kw = dict(POOL_GEOMETRIES[geometry], count_include_pad=count_include_pad, divisor_override=divisor_override)
    _check_three_ways(
        lambda x: segfast.ops.avg_pool2d(x, **kw),
        lambda x: F.avg_pool2d(x, **kw),
        [_randn(2, 5, 12, 11, layout=layout)],
        dtype,
        "avg_pool2d",
    )


@pytest.mark.parametrize("size", [1, 2, 5])
def test_max_pool2d_windows_of_padding_only(size):
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=2, ceil_mode=False)
    x = _randn(1, 2, size, size).to("cuda").requires_grad_()
    out = segfast.ops.max_pool2d(x, **kw)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out).nan_to_num())
    if every_window_reaches_the_input(size, 2, 1, 1, 2, False):
        torch.testing.assert_close(out, F.max_pool2d(x, **kw))
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------- cross_entropy


def _ce_case(shape, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    classes = shape[1]
    target = torch.randint(0, classes, shape[:1] + shape[2:], generator=g)
    target.view(-1)[::5] = ignore_index
    return logits, target, torch.rand(classes, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_cross_entropy_matches_stock(dtype, reduction, weighted, label_smoothing, layout):
    logits, target, weight = _ce_case((3, 7, 9, 8))
    logits = logits.to(memory_format=layout)
    target = target.cuda()
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)

    def run(fn):
        return lambda x: fn(x, target, weight=weight.to("cuda", x.dtype) if weighted else None, **kw)

    _check_three_ways(run(segfast.ops.cross_entropy), run(F.cross_entropy), [logits], dtype, "cross_entropy")


@pytest.mark.parametrize("dtype", LOW, ids=_id)
def test_cross_entropy_probability_targets(dtype):
    logits, _, _ = _ce_case((2, 5, 6, 7))
    prob = torch.softmax(_randn(2, 5, 6, 7, seed=4), 1).cuda()
    _check_three_ways(
        lambda x: segfast.ops.cross_entropy(x, prob.to(x.dtype), label_smoothing=0.2),
        lambda x: F.cross_entropy(x, prob.to(x.dtype), label_smoothing=0.2),
        [logits],
        dtype,
        "prob",
    )


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_cross_entropy_narrow_index_targets(target_dtype):
    logits, target, _ = _ce_case((2, 5, 6, 7), ignore_index=255)
    x = logits.cuda().float()
    ours = segfast.ops.cross_entropy(x, target.to("cuda", target_dtype), ignore_index=255)
    torch.testing.assert_close(ours, F.cross_entropy(x, target.cuda(), ignore_index=255))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_is_bitwise_deterministic(reduction):
    logits, target, weight = _ce_case((4, 19, 128, 96))
    x = logits.to("cuda", torch.bfloat16).requires_grad_()
    target, weight = target.cuda(), weight.to("cuda", torch.bfloat16)
    runs = []
    for _ in range(10):
        loss = segfast.ops.cross_entropy(x, target, weight=weight, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, x)
        runs.append((loss, grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("dtype", LOW, ids=_id)
def test_cross_entropy_grad_in_forward_matches_default(dtype):
    logits, target, weight = _ce_case((2, 7, 9, 8))
    a = logits.to("cuda", dtype).requires_grad_()
    b = logits.to("cuda", dtype).requires_grad_()
    kw = dict(target=target.cuda(), weight=weight.to("cuda", dtype), label_smoothing=0.1)
    plain = segfast.ops.cross_entropy(a, **kw)
    early = segfast.ops.cross_entropy(b, grad_in_forward=True, **kw)
    assert torch.equal(plain, early)
    assert torch.equal(torch.autograd.grad(plain, a)[0], torch.autograd.grad(early, b)[0])


def test_cross_entropy_bad_class_index_raises():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    target = torch.zeros(2, 3, 3, dtype=torch.long, device="cuda")
    target[1, 2, 0] = 4
    with pytest.raises(IndexError, match="target class 4 at"):
        segfast.ops.cross_entropy(x, target)
    torch.cuda.synchronize()  # the context survives: no device-side assert
    assert segfast.ops.cross_entropy(x, target.clamp(max=3)).isfinite()


# ------------------------------------------------------------------------- registration checks


def _opcheck_cases():
    x = torch.randn(2, 4, 6, 5, device="cuda", requires_grad=True)
    w = torch.randn(3, 4, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(3, device="cuda", requires_grad=True)
    logits = torch.randn(2, 4, 30, device="cuda", requires_grad=True)
    target = torch.randint(0, 4, (2, 30), device="cuda")
    return [
        (torch.ops.segfast.conv2d_act.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1, "silu", 0.01)),
        (
            torch.ops.segfast.linear_act.default,
            (
                torch.randn(5, 4, device="cuda", requires_grad=True),
                w[:, :, 0, 0].detach().requires_grad_(),
                b,
                "gelu",
                0.01,
            ),
        ),
        (torch.ops.segfast.max_pool2d.default, (x, [2, 2], [2, 2], [0, 0], [1, 1], False, False)),
        (torch.ops.segfast.avg_pool2d.default, (x, [3, 3], [2, 2], [1, 1], True, False, None)),
        (torch.ops.segfast.cross_entropy.default, (logits, target, None, "mean", -100, 0.1)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck_on_cuda(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_gradcheck_float64_on_cuda():
    x = torch.randn(1, 2, 5, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device="cuda", dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (1, 5, 4), device="cuda")
    assert torch.autograd.gradcheck(
        lambda x, w, b: segfast.ops.conv2d_act(x, w, b, padding=1, activation="gelu"), (x, w, b)
    )
    assert torch.autograd.gradcheck(lambda x: segfast.ops.avg_pool2d(x, 2, 1, 1, ceil_mode=True), (x,))
    assert torch.autograd.gradcheck(lambda x: segfast.ops.cross_entropy(x[:, :3], target, label_smoothing=0.1), (x,))


def test_compile_fullgraph_on_cuda():
    model = torch.nn.Sequential(segfast.nn.Conv2dAct(3, 8, 3, padding=1), segfast.nn.MaxPool2d(2)).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    target = torch.randint(0, 8, (2, 8, 8), device="cuda")

    def step(x):
        return segfast.ops.cross_entropy(model(x), target)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


# ------------------------------------------------------------------------------ confusion_matrix


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("classes", [5, 100])  # shared-memory and global-memory counters
def test_confusion_matrix_matches_cpu(dtype, classes):
    logits = torch.randn(3, classes, 33, 17, dtype=torch.float64).to(dtype)
    target = torch.randint(0, classes, (3, 33, 17))
    target[:, ::3] = 255
    expected = segfast.ops.confusion_matrix(logits.float(), target, ignore_index=255)
    got = segfast.ops.confusion_matrix(logits.cuda(), target.cuda(), ignore_index=255)
    assert torch.equal(got.cpu(), expected)


def test_confusion_matrix_bad_class_raises():
    with pytest.raises(IndexError, match="outside"):
        segfast.ops.confusion_matrix(torch.randn(1, 3, 4, device="cuda"), torch.full((1, 4), 3, device="cuda"))
    torch.cuda.synchronize()


# ------------------------------------------------------------------- segmentation losses, augment


@pytest.mark.parametrize("dtype", LOW, ids=_id)
@pytest.mark.parametrize("loss", ["dice", "focal"])
def test_segmentation_losses_match_cpu_float64(dtype, loss):
    from test_segmentation_losses import reference_dice, reference_focal

    logits, target, weight = _ce_case((2, 6, 17, 9))
    fn = {
        "dice": lambda x, t: segfast.ops.dice_loss(x, t, squared_pred=True, weight=weight.to(x), batch=True),
        "focal": lambda x, t: segfast.ops.focal_loss(x, t, gamma=2.0, alpha=weight.to(x)),
    }[loss]
    ref = {
        "dice": lambda x, t: reference_dice(x, t, squared_pred=True, weight=weight.to(x), batch=True),
        "focal": lambda x, t: reference_focal(x, t, gamma=2.0, alpha=weight.to(x)),
    }[loss]
    t = target.cuda()
    _check_three_ways(lambda x: fn(x, t), lambda x: ref(x, t), [logits], dtype, loss)


def test_segmentation_losses_bad_class_raises():
    x = torch.randn(1, 3, 8, device="cuda")
    for fn in (segfast.ops.dice_loss, segfast.ops.focal_loss):
        with pytest.raises(IndexError, match="target class 3"):
            fn(x, torch.full((1, 8), 3, device="cuda"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", LOW, ids=_id)
def test_affine_augment_matches_cpu(dtype):
    from segfast.augment import RandomAffine

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 29, 41, generator=g).to(dtype)
    mask = torch.randint(0, 9, (3, 29, 41), generator=g)
    theta = RandomAffine(rotate=45, flip=0.5, scale=(0.5, 2.0), translate=0.2).sample(3, (29, 41), g).theta
    cpu_image, cpu_mask = segfast.ops.affine_augment(image.float(), mask, theta, (31, 23))
    gpu_image, gpu_mask = segfast.ops.affine_augment(image.cuda(), mask.cuda(), theta, (31, 23))
    assert torch.equal(gpu_mask.cpu(), cpu_mask)  # float64 coordinates, no FMA: the same nearest pixel
    torch.testing.assert_close(
        gpu_image.cpu().float(),
        cpu_image,
        rtol=1e-2 if dtype != torch.float32 else 1e-5,
        atol=1e-2 if dtype != torch.float32 else 1e-6,
    )


def test_mixed_devices_are_refused_without_touching_the_context():
    """A direct torch.ops call with one argument left on the CPU is a ValueError, not an illegal
    memory access that ends the CUDA context (issue 15, defect 8)."""
    x = torch.randn(2, 4, 8, device="cuda")
    t = torch.randint(0, 4, (2, 8), device="cuda")
    cases = [
        lambda: torch.ops.segfast.cross_entropy(x, t, torch.ones(4), "mean", -100, 0.0),
        lambda: torch.ops.segfast.cross_entropy(x, torch.softmax(x, 1).cpu(), None, "mean", -100, 0.0),
        lambda: torch.ops.segfast.focal_loss(x, t, torch.ones(4), 2.0, "mean", -100),
        lambda: torch.ops.segfast.dice_sums(x, t.cpu(), -100, False),
        lambda: torch.ops.segfast.confusion_matrix(x, t.cpu(), 4, -100),
    ]
    for call in cases:
        with pytest.raises(ValueError, match="is on cpu but"):
            call()
    torch.cuda.synchronize()  # the context is alive
    assert torch.ops.segfast.dice_sums(x, t, -100, False).isfinite().all()


def test_masked_classes_at_minus_infinity_match_cpu():
    """A first logit of -inf (a masked class) gives the CPU's finite loss, not NaN; +inf gives NaN
    as torch does (issue 15, defect 1)."""
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    x[:, 0] = float("-inf")
    t = torch.randint(1, 5, (3, 16))
    for name in ("cross_entropy", "dice_loss", "focal_loss"):
        op = getattr(segfast.ops, name)
        cpu, gpu = op(x, t), op(x.cuda(), t.cuda()).cpu()
        assert cpu.isfinite() and gpu.isfinite(), name
        torch.testing.assert_close(gpu, cpu, msg=name)
    x[0, 2, 3] = float("inf")
    assert segfast.ops.cross_entropy(x.cuda(), t.cuda()).isnan()


def test_focal_mean_with_every_pixel_ignored_has_zero_gradient():
    x = torch.randn(2, 3, 8, device="cuda", requires_grad=True)
    t = torch.full((2, 8), -100, device="cuda")
    (grad,) = torch.autograd.grad(segfast.ops.focal_loss(x, t), x)
    assert torch.equal(grad, torch.zeros_like(grad))  # issue 15, defect 2: was NaN


def test_dice_on_more_images_than_a_grid_row_holds():
    """(N, C) input with N > 65535: one launch (issue 15, defect 3: dim3(chunks, N) was invalid)."""
    x = torch.randn(70000, 3, dtype=torch.float64)
    t = torch.randint(0, 3, (70000,))
    torch.testing.assert_close(segfast.ops.dice_loss(x.cuda(), t.cuda()).cpu(), segfast.ops.dice_loss(x, t))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu", "sigmoid"])
def test_batch_norm_act_matches_cpu_float64(layout, training, activation):
    x = _randn(3, 5, 6, 7, layout=layout, scale=2.0)
    r = _randn(3, 5, 6, 7, seed=1, layout=layout)
    w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b, r)]
        stats = [rm.to(device), rv.to(device)]
        out = segfast.ops.batch_norm_act(
            leaves[0], *stats, leaves[1], leaves[2], training, 0.2, 1e-5, activation, 0.01, leaves[3]
        )
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append([t.cpu() for t in (out, *grads, *stats)])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)
