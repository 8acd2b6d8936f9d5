"""Binary and multi-label (sigmoid) Dice, Dice + BCE and focal losses against float64 references:
MONAI's DiceLoss(sigmoid=True), F.binary_cross_entropy_with_logits and torchvision's
sigmoid_focal_loss, written out in plain torch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    SavedBytes,
    as_pixels,
    assert_close_to_reference,
    assert_same_as_twin,
    dtype_id,
    seeded_randn,
    skip_on_simulation,
    skip_unless_supported,
)

import segfast

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]  # float16: CUDA only


def _valid_and_target(x, y, ignore_index):
    valid = y != ignore_index
    return valid.to(x.dtype), torch.where(valid, y, 0).to(x.dtype)


def reference_dice(x, y, ignore_index=-100, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5,
                   squared_pred=False, weight=None, batch=False, reduction="mean"):  # fmt: skip
    """MONAI's DiceLoss(sigmoid=True) with the elements whose target is ignore_index left out."""
    valid, y = _valid_and_target(x, y, ignore_index)
    p = torch.sigmoid(x) * valid
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


def reference_bce(x, y, ignore_index=-100):
    valid, y = _valid_and_target(x, y, ignore_index)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    return torch.where(valid != 0, bce, 0).sum() / valid.sum()


def reference_focal(x, y, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss, alpha per class (broadcast over dim 1), ignored elements 0."""
    valid, y = _valid_and_target(x, y, ignore_index)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        a = alpha.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
        loss = (a * y + (1 - a) * (1 - y)) * loss
    loss = torch.where(valid != 0, loss, 0)  # left out, also where the logit is infinite
    return loss.sum() / valid.sum() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _case(mode, shape=(3, 4, 7, 6), target_kind="int", ignore_index=-100, seed=0, device="cpu"):
    """Logits, the target as the op takes it, and the target as a float64 tensor of the logits'
    shape for the references."""
    if mode == "binary":
        shape = (shape[0], 1, *shape[2:])
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    if target_kind == "soft":
        y = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, shape, generator=g).to(torch.float64)
    if target_kind != "bool":
        y.view(-1)[::5] = ignore_index
    target = {"int": y.long(), "uint8": y.clamp(min=0).to(torch.uint8), "bool": y.bool(), "soft": y}[target_kind]
    if target_kind == "uint8":
        y = target.double()
    if target_kind == "bool":
        y = target.double()
    if mode == "binary":
        target = target.squeeze(1)  # (N, d1, ...): the usual binary mask
    return x.to(device), target.to(device), y.to(device)


def _compare(ours_fn, ref_fn, x64, dtype):
    low, ref = x64.to(dtype).requires_grad_(), x64.clone().requires_grad_()
    ours, stock, reference = ours_fn(low), ref_fn(low), ref_fn(ref)
    assert_close_to_reference(ours, stock, reference, "loss")
    grad = torch.randn_like(reference)
    g_ref = torch.autograd.grad(reference, ref, grad)[0]
    g_stock = torch.autograd.grad(stock, low, grad.to(dtype))[0]
    # torch's autograd of focal's (1 - p_t)^gamma, gamma < 1, is 0 * inf = NaN where p rounds to
    # exactly y (segfast gives the limit, 0): there ours is held to the reference and the floor alone
    g_stock = torch.where(g_stock.isnan() & ~g_ref.isnan(), g_ref.to(dtype), g_stock)
    assert_close_to_reference(torch.autograd.grad(ours, low, grad.to(dtype))[0], g_stock, g_ref, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [{}, dict(include_background=False), dict(squared_pred=True, batch=True), dict(weighted=True, smooth_nr=0.0)],
    ids=["default", "no-background", "squared-batch", "weighted"],
)
@pytest.mark.parametrize("target_kind", ["int", "uint8", "bool", "soft"])
def test_dice_matches_reference(device, dtype, mode, reduction, options, target_kind):
    skip_unless_supported(device, dtype)
    if mode == "binary" and "include_background" in options:
        pytest.skip("binary has one channel")
    x, target, y = _case(mode, target_kind=target_kind, ignore_index=255 if target_kind == "uint8" else -100,
                         device=device.device)  # fmt: skip
    ignore_index = 255 if target_kind == "uint8" else -100
    options = dict(options, reduction=reduction, ignore_index=ignore_index)
    weight = None
    if options.pop("weighted", False):
        weight = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
        weight = weight.to(device.device)

    def ours(z):
        return segfast.ops.dice_loss(z, target, mode=mode, weight=weight, **options)

    def ref(z):
        w = None if weight is None else weight.reshape(1, -1).to(z.dtype)
        return reference_dice(z, y.to(z.dtype), weight=w, **options)

    _compare(ours, ref, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("target_kind", ["int", "soft"])
def test_dice_bce_matches_reference(device, dtype, mode, target_kind):
    skip_unless_supported(device, dtype)
    x, target, y = _case(mode, target_kind=target_kind, device=device.device)

    def ours(z):
        return segfast.ops.dice_bce_loss(z, target, mode=mode, lambda_dice=0.7, lambda_bce=0.3)

    def ref(z):
        return 0.7 * reference_dice(z, y.to(z.dtype)) + 0.3 * reference_bce(z, y.to(z.dtype))

    _compare(ours, ref, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [None, 0.25, "per-class"])
@pytest.mark.parametrize("target_kind", ["int", "soft"])
def test_focal_matches_torchvision_formula(device, dtype, mode, reduction, gamma, alpha, target_kind):
    skip_unless_supported(device, dtype)
    x, target, y = _case(mode, target_kind=target_kind, device=device.device)
    classes = x.shape[1]
    if alpha == "per-class":
        alpha = torch.linspace(0.1, 0.9, classes, dtype=torch.float64, device=device.device)
    alpha_vector = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float64).expand(classes)

    def ours(z):
        return segfast.ops.focal_loss(z, target, mode=mode, gamma=gamma, alpha=alpha, reduction=reduction)

    def ref(z):
        return reference_focal(z, y.to(z.dtype), gamma, alpha_vector, reduction=reduction)

    _compare(ours, ref, x, dtype)


def test_binary_target_with_or_without_the_channel_dim(device):
    x, target, _ = _case("binary", device=device.device)
    for loss in (segfast.ops.dice_loss, segfast.ops.focal_loss):
        torch.testing.assert_close(loss(x, target, mode="binary"), loss(x, target.unsqueeze(1), mode="binary"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
def test_channels_last_and_non_dense_targets(device, layout):
    x, target, y = _case("multilabel", shape=(2, 5, 6, 7), device=device.device)
    x = x.to(memory_format=layout).requires_grad_()
    target = target.transpose(2, 3).contiguous().transpose(2, 3)  # other strides than the logits'
    for ours, ref in (
        (segfast.ops.dice_bce_loss(x, target, mode="multilabel"), reference_dice(x, y) + reference_bce(x, y)),
        (segfast.ops.focal_loss(x, target, mode="multilabel"), reference_focal(x, y)),
    ):
        torch.testing.assert_close(ours, ref)
        (g,) = torch.autograd.grad(ours, x)
        torch.testing.assert_close(g, torch.autograd.grad(ref, x)[0])
        assert g.is_contiguous(memory_format=layout)


def test_nan_and_infinite_logits(device):
    x, target, y = _case("multilabel", device=device.device)
    x[0, 0, 0, 0] = float("inf")
    x[0, 1, 0, 1] = float("-inf")
    x[1, 2, 3, 3] = 80.0  # exp(-80) is below float32's normal range: BCE and p stay exact
    focal = segfast.ops.focal_loss(x, target, mode="multilabel", reduction="none")
    for ours, ref in (
        (segfast.ops.dice_bce_loss(x, target, mode="multilabel"), reference_dice(x, y) + reference_bce(x, y)),
        (focal, reference_focal(x, y, reduction="none")),
    ):
        torch.testing.assert_close(ours, ref, equal_nan=True)
    x[2, 1, 1, 1] = float("nan")
    assert segfast.ops.dice_bce_loss(x, target, mode="multilabel").isnan()


def test_every_element_ignored(device):
    x, target, _ = _case("multilabel", device=device.device)
    target.fill_(-100)
    x.requires_grad_()
    assert segfast.ops.focal_loss(x, target, mode="multilabel").isnan()  # 0 / 0, as a mean over nothing
    (grad,) = torch.autograd.grad(segfast.ops.focal_loss(x, target, mode="multilabel", reduction="sum"), x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_bad_input_raises_clear_errors(device):
    x, target, _ = _case("multilabel", device=device.device)
    target[1, 2, 3, 4] = 2
    with pytest.raises(IndexError, match=r"target class 2 at \(n=1, pixel=106\) is outside \[0, 2\)"):
        segfast.ops.dice_loss(x, target, mode="multilabel")
    with pytest.raises(IndexError, match="target class 2"):
        segfast.ops.focal_loss(x, target, mode="multilabel")
    if device.name == "cuda":
        torch.cuda.synchronize()  # no device-side assert ended the context
    x = x.cpu()
    with pytest.raises(ValueError, match="mode='binary' takes \\(N, 1, ...\\) logits"):
        segfast.ops.dice_loss(x, target.cpu(), mode="binary")
    with pytest.raises(ValueError, match="mode must be 'multiclass', 'binary' or 'multilabel'"):
        segfast.ops.focal_loss(x, target.cpu(), mode="sigmoid")
    with pytest.raises(ValueError, match="target must have the logits' shape"):
        segfast.ops.dice_bce_loss(x, target.cpu()[:, :2], mode="multilabel")
    with pytest.raises(ValueError, match="pass mode='binary'"):  # softmax of one channel: refused, not 0
        segfast.ops.dice_loss(x[:, :1], torch.zeros(3, 7, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        segfast.ops.focal_loss(x, target.cpu().clamp(max=1), mode="multilabel", alpha=[0.5, 0.5])


def test_modules():
    x, target, y = _case("binary")
    torch.testing.assert_close(segfast.nn.DiceBCELoss()(x, target), reference_dice(x, y) + reference_bce(x, y))
    torch.testing.assert_close(segfast.nn.DiceLoss(mode="binary")(x, target), reference_dice(x, y))
    loss = segfast.nn.FocalLoss(mode="binary", alpha=0.25).double()
    torch.testing.assert_close(loss(x, target), reference_focal(x, y, alpha=torch.tensor([0.25], dtype=torch.float64)))


def test_saves_nothing_of_its_own():
    x, target, _ = _case("multilabel", shape=(2, 6, 32, 32))
    x = x.float().requires_grad_()
    for loss in (segfast.ops.dice_bce_loss, segfast.ops.focal_loss):
        with SavedBytes(exclude=[x, target]) as saved:
            loss(x, target, mode="multilabel")
        # the per-(sample, class) sums and the Python math on them, nothing logits-sized (48 KiB)
        assert saved.total <= 2048, (loss.__name__, saved.total)


def test_deterministic_across_thread_counts():
    x, target, _ = _case("multilabel", shape=(2, 3, 128, 96))
    x = x.float().requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = segfast.ops.dice_bce_loss(x, target, mode="multilabel")
            results.append((loss, *torch.autograd.grad(loss, x)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_gradcheck_opcheck_compile(device):
    x, target, _ = _case("multilabel", shape=(2, 3, 4, 3), device=device.device)
    x.requires_grad_()
    soft = torch.rand_like(x).detach()
    for t in (target, soft):
        assert torch.autograd.gradcheck(
            lambda z, t=t: segfast.ops.dice_bce_loss(z, t, mode="multilabel", squared_pred=True), (x,)
        )
        for gamma in (1.5, 3.0):  # pow, and the CPU's fused loop for small integer gammas
            assert torch.autograd.gradcheck(
                lambda z, t=t, gamma=gamma: segfast.ops.focal_loss(
                    z, t, mode="multilabel", gamma=gamma, alpha=0.3, reduction="none"
                ),
                (x,),
            )
    xs, ts = x.detach().float().reshape(2, 3, 12).requires_grad_(), target.reshape(2, 3, 12)
    torch.library.opcheck(torch.ops.segfast.sigmoid_sums.default, (xs, ts, -100, False))
    torch.library.opcheck(torch.ops.segfast.sigmoid_sums.default, (xs, torch.rand_like(xs), -100, True))
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.segfast.sigmoid_focal_loss.default, (xs, ts, None, 2.0, reduction, -100))
    skip_on_simulation(device)
    loss_fn = segfast.nn.DiceBCELoss(mode="multilabel")
    compiled = torch.compile(lambda z: loss_fn(z, target), fullgraph=True)
    xf = x.detach().float().requires_grad_()
    torch.testing.assert_close(
        torch.autograd.grad(compiled(xf), xf)[0], torch.autograd.grad(loss_fn(xf, target), xf)[0]
    )


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.uint8, "soft"], ids=dtype_id)
def test_twin_sigmoid_sums(accelerator, dtype, layout, squared, target_dtype):
    x = seeded_randn(3, 4, 45, 50, dtype=dtype, layout=layout, scale=3)  # 2250 pixels a sample: several blocks
    g = torch.Generator().manual_seed(5)
    if target_dtype == "soft":
        target = torch.rand(3, 4, 45, 50, generator=g).to(dtype)
    else:
        target = torch.randint(0, 2, (3, 4, 45, 50), generator=g).to(target_dtype)
        target[:, :, ::7] = 255
    x, target = as_pixels(x), as_pixels(target)
    ours, cpu = accelerator.both("sigmoid_sums", x, target, 255, squared)
    assert_same_as_twin(ours, cpu, "sums")
    grad_sums = seeded_randn(*cpu.shape, seed=6).to(cpu.dtype)
    assert_same_as_twin(*accelerator.both("sigmoid_sums_backward", grad_sums, x, target, 255, squared), "grad")


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [False, True])
def test_twin_sigmoid_focal_loss(accelerator, dtype, layout, reduction, alpha):
    x = seeded_randn(3, 4, 23, 29, dtype=dtype, layout=layout, scale=3)
    target = torch.randint(0, 2, (3, 4, 23, 29), generator=torch.Generator().manual_seed(5))
    target[:, 1, ::3] = -1
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) if alpha else None
    x, target = as_pixels(x), as_pixels(target)
    ours, cpu = accelerator.both("sigmoid_focal_loss", x, target, a, 2.0, reduction, -1)
    assert_same_as_twin(ours, cpu, "loss")
    grad_loss = seeded_randn(*cpu[0].shape, dtype=dtype, seed=3) if reduction == "none" else torch.ones_like(cpu[0])
    backward = (grad_loss, x, target, a, 2.0, cpu[1], reduction, -1)
    assert_same_as_twin(*accelerator.both("sigmoid_focal_loss_backward", *backward), "grad")


def test_twin_bad_target_raises(accelerator):
    x = as_pixels(seeded_randn(2, 3, 20, 20))
    target = as_pixels(torch.randint(0, 2, (2, 3, 20, 20)))
    target[1, 2, 149] = 3
    for ops, device in ((accelerator.ops, accelerator.device), (torch.ops.segfast, "cpu")):
        with pytest.raises(IndexError, match=r"target class 3 at \(n=1, pixel=949\)"):
            ops.sigmoid_sums(x.to(device), target.to(device), -100, False)
