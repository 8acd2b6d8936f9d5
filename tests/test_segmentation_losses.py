"""Dice, focal and Dice+CE losses against straightforward PyTorch references in float64."""

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
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    seeded_classes,
    seeded_randn,
    skip_on_simulation,
    skip_unless_supported,
)

import segfast

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # float16: CUDA only


def reference_dice(
    x,
    t,
    ignore_index=-100,
    include_background=True,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    squared_pred=False,
    weight=None,
    batch=False,
    reduction="mean",
):
    """MONAI's DiceLoss(softmax=True, to_onehot_y=True) with ignored pixels left out, in plain torch."""
    valid = (t != ignore_index).unsqueeze(1).to(x.dtype)
    p = torch.softmax(x, 1) * valid
    y = F.one_hot(torch.where(t == ignore_index, 0, t), x.shape[1]).movedim(-1, 1).to(x.dtype) * valid
    dims = tuple(range(2, x.dim()))
    inter, pred, truth = (p * y).sum(dims), (p * p if squared_pred else p).sum(dims), y.sum(dims)
    if batch:
        inter, pred, truth = inter.sum(0, keepdim=True), pred.sum(0, keepdim=True), truth.sum(0, keepdim=True)
    loss = 1 - (2 * inter + smooth_nr) / (pred + truth + smooth_dr)
    if weight is not None:
        loss = loss * weight
    if not include_background:
        loss = loss[:, 1:]
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def reference_focal(x, t, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean"):
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)
    log_pt = torch.log_softmax(x, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    a = 1.0 if alpha is None else alpha[safe]
    loss = torch.where(valid, -a * (1 - log_pt.exp()) ** gamma * log_pt, torch.zeros_like(log_pt))
    return loss.sum() / valid.sum() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _case(shape=(3, 5, 7, 6), ignore_index=-100, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    t.view(-1)[::4] = ignore_index
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    return x.to(device), t.to(device), w.to(device)


def _compare(ours_fn, ref_fn, x64, dtype):
    low, ref = x64.to(dtype).requires_grad_(), x64.clone().requires_grad_()
    ours, stock, reference = ours_fn(low), ref_fn(low), ref_fn(ref)
    assert_close_to_reference(ours, stock, reference, "loss")
    grad = torch.randn_like(reference)
    assert_close_to_reference(
        torch.autograd.grad(ours, low, grad.to(dtype))[0],
        torch.autograd.grad(stock, low, grad.to(dtype))[0],
        torch.autograd.grad(reference, ref, grad)[0],
        "grad",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(include_background=False),
        dict(squared_pred=True, batch=True),
        dict(weighted=True, smooth_nr=0.0, smooth_dr=1e-3),
    ],
)
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_dice_matches_reference(device, dtype, reduction, options, ignore_index):
    skip_unless_supported(device, dtype)
    x, t, w = _case(ignore_index=ignore_index, device=device.device)
    options = dict(options, reduction=reduction, ignore_index=ignore_index)
    if options.pop("weighted", False):
        options["weight"] = w

    def with_weight(fn):
        return lambda z: fn(
            z, t, **{k: (v.to(z.dtype) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
        )

    _compare(with_weight(segfast.ops.dice_loss), with_weight(reference_dice), x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_matches_reference(device, dtype, reduction, gamma, weighted):
    skip_unless_supported(device, dtype)
    x, t, w = _case(device=device.device)

    def run(fn):
        return lambda z: fn(z, t, gamma=gamma, alpha=w.to(z.dtype) if weighted else None, reduction=reduction)

    _compare(run(segfast.ops.focal_loss), run(reference_focal), x, dtype)


def test_focal_with_gamma_zero_is_cross_entropy():
    x, t, _ = _case()
    torch.testing.assert_close(segfast.ops.focal_loss(x, t, gamma=0.0), F.cross_entropy(x, t))


def test_dice_ce_combines_both():
    x, t, w = _case()
    loss = segfast.nn.DiceCELoss(lambda_dice=0.7, lambda_ce=0.3, weight=w, ignore_index=-100)(x, t)
    expected = 0.7 * reference_dice(x, t, weight=w) + 0.3 * F.cross_entropy(x, t, weight=w)
    torch.testing.assert_close(loss, expected)


def test_class_weights_as_numbers_and_sequences_read_as_monai_reads_them():
    x, t, _ = _case(shape=(2, 4, 5, 5))
    # focal alpha a: 1 - a for the background class 0, a for every other class (softmax focal loss)
    expected = reference_focal(x, t, alpha=torch.tensor([0.75, 0.25, 0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(segfast.nn.FocalLoss(alpha=0.25).double()(x, t), expected)
    torch.testing.assert_close(segfast.ops.focal_loss(x, t, alpha=0.25), expected)
    torch.testing.assert_close(segfast.nn.FocalLoss(alpha=[0.75, 0.25, 0.25, 0.25]).double()(x, t), expected)
    # Dice weight: a sequence per class, one number for every class
    w = [1.0, 2.0, 0.5, 3.0]
    expected = reference_dice(x, t, weight=torch.tensor(w, dtype=torch.float64))
    torch.testing.assert_close(segfast.nn.DiceLoss(weight=w).double()(x, t), expected)
    torch.testing.assert_close(segfast.nn.DiceLoss(weight=2.0).double()(x, t), 2 * reference_dice(x, t))
    torch.testing.assert_close(
        segfast.nn.DiceCELoss(weight=w).double()(x, t),
        reference_dice(x, t, weight=torch.tensor(w, dtype=torch.float64))
        + F.cross_entropy(x, t, weight=torch.tensor(w, dtype=torch.float64)),
    )
    state = segfast.nn.FocalLoss(alpha=[0.1, 0.2, 0.3, 0.4]).state_dict()
    assert torch.equal(state["alpha"], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        segfast.ops.focal_loss(x, t, alpha=[0.5, 0.5])
    with pytest.raises(TypeError, match="must be a number, a sequence"):
        segfast.nn.DiceLoss(weight="heavy")


@pytest.mark.parametrize("loss", [segfast.ops.dice_loss, segfast.ops.focal_loss])
def test_one_channel_softmax_is_refused(loss):
    """Softmax over one channel is 1 everywhere: MONAI warns, segfast refuses instead of returning 0."""
    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="one channel"):
        loss(x, t)


def test_bfloat16_at_512_does_not_overflow():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 512, 512, generator=g)
    t = torch.randint(0, 3, (2, 512, 512), generator=g)
    ours = segfast.ops.dice_loss(x.bfloat16(), t)
    assert torch.isfinite(ours) and abs(ours.float() - reference_dice(x.double(), t).float()) < 1e-2


def test_gradcheck_opcheck_compile(device):
    x, t, w = _case((2, 3, 4, 3), device=device.device)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: segfast.ops.dice_loss(z, t, squared_pred=True, reduction="none"), (x,))
    assert torch.autograd.gradcheck(lambda z: segfast.ops.focal_loss(z, t, gamma=1.5, alpha=w), (x,))
    xs, ts = x.detach().float().reshape(2, 3, 12).requires_grad_(), t.reshape(2, 12)
    torch.library.opcheck(torch.ops.segfast.dice_sums.default, (xs, ts, -100, False))
    torch.library.opcheck(torch.ops.segfast.focal_loss.default, (xs, ts, None, 2.0, "mean", -100))
    skip_on_simulation(device)
    loss_fn = segfast.nn.DiceCELoss()
    compiled = torch.compile(lambda z: loss_fn(z, t), fullgraph=True)
    xf = x.detach().float().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(compiled(xf), xf)[0], torch.autograd.grad(loss_fn(xf, t), xf)[0])


def test_saved_state_is_small():
    x = torch.randn(2, 21, 16, 16, requires_grad=True)
    t = torch.randint(0, 21, (2, 16, 16))
    with SavedBytes(exclude=[x, t]) as dice:
        segfast.ops.dice_loss(x, t)
    assert dice.total <= 3 * 2 * 21 * 4 + 256  # the per-(sample, class) sums at most
    with SavedBytes(exclude=[x, t]) as focal:
        segfast.ops.focal_loss(x, t)
    assert focal.total <= 4 * 2 * 16 * 16 + 64  # one float per pixel


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: segfast.ops.dice_loss(torch.randn(2, 3, 4), torch.full((2, 4), 3)), IndexError, "target class 3"),
        (
            lambda: segfast.ops.focal_loss(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)),
            ValueError,
            "target must have shape",
        ),
        (
            lambda: segfast.ops.focal_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), gamma=-1),
            ValueError,
            "gamma",
        ),
        (
            lambda: segfast.ops.dice_loss(
                torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), weight=torch.ones(2)
            ),
            ValueError,
            "weight must have shape",
        ),
        (lambda: segfast.ops.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 4)), TypeError, "target dtype"),
        (
            lambda: segfast.ops.dice_loss(torch.randn(0, 3, 4), torch.zeros(0, 4, dtype=torch.long)),
            ValueError,
            "empty batch",
        ),
        (  # the kernels keep class indices as int32 (0 pixels: no memory behind the 2^31 classes)
            lambda: torch.ops.segfast.dice_sums(
                torch.empty(1, 2**31, 0), torch.empty(1, 0, dtype=torch.long), -100, False
            ),
            ValueError,
            r"at most 2\^31 - 1 classes",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_class_index_raises_and_the_device_survives(device):
    x = torch.randn(1, 3, 8, device=device.device)
    for fn in (segfast.ops.dice_loss, segfast.ops.focal_loss):
        with pytest.raises(IndexError, match=r"target class 3 at \(n=0, pixel=0\)"):
            fn(x, torch.full((1, 8), 3, device=device.device))
    if device.name == "cuda":
        torch.cuda.synchronize()  # no device-side assert ended the context


def test_masked_classes_at_minus_infinity(device):
    """A first logit of -inf (a masked class) gives a finite loss; the online log-sum-exp of the CUDA
    kernels starts from it (issue 15, defect 1)."""
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    x[:, 0] = float("-inf")
    t = torch.randint(1, 5, (3, 16))
    for name in ("dice_loss", "focal_loss"):
        op = getattr(segfast.ops, name)
        ours = op(x.to(device.device), t.to(device.device)).cpu()
        assert ours.isfinite(), name
        reference = {"dice_loss": reference_dice, "focal_loss": reference_focal}[name]
        torch.testing.assert_close(ours, reference(x, t), msg=name)


def test_focal_mean_with_every_pixel_ignored_has_zero_gradient(device):
    x = torch.randn(2, 3, 8, device=device.device, requires_grad=True)
    t = torch.full((2, 8), -100, device=device.device)
    (grad,) = torch.autograd.grad(segfast.ops.focal_loss(x, t), x)
    assert torch.equal(grad, torch.zeros_like(grad))  # issue 15, defect 2: was NaN


def test_dice_on_more_images_than_a_grid_row_holds(device):
    """(N, C) input with N > 65535: one launch (issue 15, defect 3: dim3(chunks, N) was invalid)."""
    x = torch.randn(70000, 3, dtype=torch.float64)
    t = torch.randint(0, 3, (70000,))
    ours = segfast.ops.dice_loss(x.to(device.device), t.to(device.device)).cpu()
    torch.testing.assert_close(
        ours, reference_dice(x.unsqueeze(2), t.unsqueeze(1))
    )  # (N, C, 1): the reference sums dims 2:


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, t: segfast.ops.dice_loss(x, t),
        lambda x, t: segfast.ops.dice_loss(x.reshape(40, 3, 20), t.reshape(40, 20), batch=True),  # rows kernel
        lambda x, t: segfast.ops.focal_loss(x, t, reduction="sum"),
    ],
    ids=["dice", "dice-rows", "focal"],
)
def test_bad_class_index_inside_a_cuda_graph_makes_the_loss_nan(device, loss):
    """Inside a capture the bad-index flag cannot be read (issue 15, defect 5): the loss is NaN
    instead of an IndexError; good input gives what it gives outside a capture."""
    if device.name == "cpu":
        pytest.skip("CUDA graphs capture CUDA kernels")
    x = torch.randn(2, 3, 400, device=device.device)
    good = torch.randint(0, 3, (2, 400), device=device.device)
    bad = good.clone()
    bad[1, 149] = 3
    call = CapturedCall(device, loss, x, good)
    torch.testing.assert_close(call.run(x, good), loss(x, good))
    assert call.run(x, bad).isnan()


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    x = torch.randn(2, 4, 8, device="cuda")
    t = torch.randint(0, 4, (2, 8), device="cuda")
    cases = [
        lambda: torch.ops.segfast.focal_loss(x, t, torch.ones(4), 2.0, "mean", -100),
        lambda: torch.ops.segfast.focal_loss(x, t.cpu(), None, 2.0, "mean", -100),
        lambda: torch.ops.segfast.dice_sums(x, t.cpu(), -100, False),
        lambda: torch.ops.segfast.dice_sums_backward(torch.ones(3, 2, 4), x, t, -100, False),
    ]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=dtype_id)
def test_twin_dice_sums(accelerator, dtype, layout, squared, target_dtype):
    x = seeded_randn(3, 4, 45, 50, dtype=dtype, layout=layout, scale=2)  # 2250 pixels a sample: several chunks
    target = seeded_classes((3, 45, 50), 4, dtype=target_dtype, ignore_index=255, ignored=0.1)
    x, target = as_pixels(x), as_pixel_targets(target)
    ours, cpu = accelerator.both("dice_sums", x, target, 255, squared)
    assert_same_as_twin(ours, cpu, "sums")
    grad_sums = seeded_randn(*cpu.shape, seed=6).to(cpu.dtype)
    assert_same_as_twin(*accelerator.both("dice_sums_backward", grad_sums, x, target, 255, squared), "grad")


def test_twin_dice_sums_rows_beyond_a_grid_dimension(accelerator):
    # (N, C) input with N > 65535: one sample per grid row would be an invalid launch
    x, target = as_pixels(seeded_randn(70000, 3)), as_pixel_targets(seeded_classes((70000,), 3))
    assert_same_as_twin(*accelerator.both("dice_sums", x, target, -100, False), "sums")


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [False, True])
def test_twin_focal_loss(accelerator, dtype, layout, reduction, alpha):
    x = seeded_randn(3, 4, 23, 29, dtype=dtype, layout=layout, scale=3)
    target = seeded_classes((3, 23, 29), 4, ignore_index=-1, ignored=0.2)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).to(dtype) if alpha else None
    x, target = as_pixels(x), as_pixel_targets(target)
    ours, cpu = accelerator.both("focal_loss", x, target, a, 2.0, reduction, -1)
    assert_same_as_twin(ours[0], cpu[0], "loss")
    grad_loss = seeded_randn(*cpu[0].shape, dtype=dtype, seed=3) if reduction == "none" else torch.ones_like(cpu[0])
    backward = (grad_loss, x, target, a, 2.0, cpu[1], cpu[2], reduction, -1)
    assert_same_as_twin(*accelerator.both("focal_loss_backward", *backward), "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_twin_focal_loss_every_pixel_ignored(accelerator, reduction):
    x, target = as_pixels(seeded_randn(2, 3, 20, 20)), torch.full((2, 400), -1)
    ours, cpu = accelerator.both("focal_loss", x, target, None, 2.0, reduction, -1)
    assert_same_as_twin(ours[0], cpu[0], "loss")
    backward = (torch.ones_like(cpu[0]), x, target, None, 2.0, cpu[1], cpu[2], reduction, -1)
    assert_same_as_twin(*accelerator.both("focal_loss_backward", *backward), "grad")


def test_twin_dice_and_focal_infinite_logits(accelerator):
    # -inf masks a class, the first one included (the online log-sum-exp starts from it)
    x = seeded_randn(2, 4, 16, 20, scale=3)
    x[:, 0, :4] = -math.inf
    x[:, 2, 4:6] = -math.inf
    target = seeded_classes((2, 16, 20), 4)
    target[:, :6] = 1
    x, target = as_pixels(x), as_pixel_targets(target)
    assert_same_as_twin(*accelerator.both("dice_sums", x, target, -100, False), "dice sums")
    grad_sums = torch.ones(3, 2, 4, dtype=x.dtype)
    assert_same_as_twin(*accelerator.both("dice_sums_backward", grad_sums, x, target, -100, False), "dice grad")
    ours, cpu = accelerator.both("focal_loss", x, target, None, 2.0, "sum", -100)
    assert_same_as_twin(ours[0], cpu[0], "focal loss")
    backward = (torch.ones_like(cpu[0]), x, target, None, 2.0, cpu[1], cpu[2], "sum", -100)
    assert_same_as_twin(*accelerator.both("focal_loss_backward", *backward), "focal grad")


def test_twin_dice_sums_without_classes(accelerator):
    # every class index not ignored is out of range, as on CPU
    x, target = torch.randn(2, 0, 300), torch.full((2, 300), -100)
    assert_same_as_twin(*accelerator.both("dice_sums", x, target, -100, False), "sums")
    target[1, 7] = 0
    for ops, device in ((accelerator.ops, accelerator.device), (torch.ops.segfast, "cpu")):
        with pytest.raises(IndexError, match=r"target class 0 at \(n=1, pixel=7\) is outside \[0, 0\)"):
            ops.dice_sums(x.to(device), target.to(device), -100, False)
