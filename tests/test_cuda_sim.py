"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU SIMT simulation against their CPU twins.

``torch.ops.segfast_sim.<op>`` is the CUDA entry point of ``<op>`` — its checks, launch
configuration and kernels, compiled by the host compiler against csrc/cuda_sim/simt.h — on CPU
tensors (docs/cuda-sim.md). Each test calls it and the CPU kernel (``torch.ops.segfast.<op>``)
with the same arguments at sizes that span several blocks, and compares: integers and argmaxes
exactly, floats to the rounding of a different summation order. The vendor cores (the
convolution and GEMM inside conv2d_act / linear_act) are ATen's CPU ones here; the passes around
them are the CUDA kernels."""

from __future__ import annotations

import math
import platform

import pytest
import torch

import segfast  # noqa: F401  (registers torch.ops.segfast)

if platform.machine() not in ("x86_64", "AMD64"):  # CMakeLists.txt builds the simulation there only
    pytest.skip("the CUDA simulation's fibers are x86-64 code", allow_module_level=True)
import segfast._cuda_sim  # noqa: E402, F401  (registers torch.ops.segfast_sim; `make build` builds it)

CPU, SIM = torch.ops.segfast, torch.ops.segfast_sim
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# a different summation order: a few ulps of the accumulation type, relative to the values' scale
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _id(value) -> str:
    return str(value).removeprefix("torch.")


def _randn(*shape, dtype=torch.float32, layout=torch.contiguous_format, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return t.to(memory_format=layout) if t.dim() == 4 else t


def _classes(shape, classes, seed=1, dtype=torch.int64, ignore_index=None, ignored=0.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, shape, generator=g)
    if ignore_index is not None and ignored:
        t[torch.rand(shape, generator=g) < ignored] = ignore_index
    return t.to(dtype)


def _pixels(x):
    """(N, C, *spatial) as the ops take it, (N, C, S) (a view, as the Python faces make it); (N, C)
    rows become (N, C, 1)."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)


def _same(sim, cpu, what=""):
    """Equal structure; tensors equal exactly (integers) or to the dtype's summation tolerance."""
    if isinstance(cpu, (tuple, list)):
        assert len(sim) == len(cpu)
        for i, (a, b) in enumerate(zip(sim, cpu)):
            _same(a, b, f"{what}[{i}]")
        return
    assert sim.shape == cpu.shape and sim.dtype == cpu.dtype, (
        f"{what}: {sim.shape} {sim.dtype} vs {cpu.shape} {cpu.dtype}"
    )
    if not cpu.is_floating_point():
        assert torch.equal(sim, cpu), f"{what}: integers differ"
        return
    scale = max(1.0, cpu.double().nan_to_num(0, 0, 0).abs().max().item()) if cpu.numel() else 1.0
    torch.testing.assert_close(
        sim, cpu, rtol=TOLERANCE[cpu.dtype], atol=TOLERANCE[cpu.dtype] * scale, equal_nan=True, msg=what
    )


def _both(op, *args):
    """(simulated CUDA, CPU) results of op on the same arguments (cloned: some ops write them)."""

    def copies():
        return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    return getattr(SIM, op)(*copies()), getattr(CPU, op)(*copies())


# --------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, ceil_mode",
    [
        ((3, 3), (2, 2), (1, 1), (1, 1), False),
        ((2, 3), (1, 2), (0, 1), (2, 1), True),
        ((17, 17), (1, 1), (8, 8), (1, 1), False),
    ],
    ids=["3x3s2", "dilated-ceil", "289-taps"],
)
@pytest.mark.parametrize("return_indices", [False, True], ids=["argmax", "indices"])
def test_max_pool2d(dtype, layout, kernel, stride, padding, dilation, ceil_mode, return_indices):
    x = _randn(2, 3, 37, 41, dtype=dtype, layout=layout)
    x[0, 1, 5, 5] = math.nan  # a NaN wins its windows, as in torch
    window = (kernel, stride, padding, dilation, ceil_mode)
    sim, cpu = _both("max_pool2d", x, *window, return_indices)
    _same(sim, cpu, "forward")
    grad = _randn(*cpu[0].shape, dtype=dtype, layout=layout, seed=2)
    _same(*_both("max_pool2d_backward", grad, cpu[1], list(x.shape), *window), "backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, count_include_pad, divisor_override",
    [
        ((3, 3), (2, 2), (1, 1), False, True, None),
        ((2, 3), (1, 2), (1, 1), True, False, None),
        ((4, 4), (3, 3), (2, 2), True, True, 5),
    ],
    ids=["3x3s2", "ceil-exclude-pad", "divisor"],
)
def test_avg_pool2d(dtype, layout, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    x = _randn(2, 3, 37, 41, dtype=dtype, layout=layout)
    window = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    sim, cpu = _both("avg_pool2d", x, *window)
    _same(sim, cpu, "forward")
    grad = _randn(*cpu.shape, dtype=dtype, layout=layout, seed=2)
    _same(*_both("avg_pool2d_backward", grad, list(x.shape), *window), "backward")


# ---------------------------------------------------------------------------------- cross_entropy


def _targets(target):
    """(N, *spatial) class indices as the ops take them, (N, S)."""
    return target.flatten(1) if target.dim() > 1 else target.unsqueeze(1)


def _cross_entropy_both(x, target, weight, reduction, ignore_index, smoothing):
    """x and target as the caller has them; probability targets have x's shape."""
    x, target = _pixels(x), _pixels(target) if target.is_floating_point() else _targets(target)
    sim, cpu = _both("cross_entropy", x, target, weight, reduction, ignore_index, smoothing)
    _same(sim[0], cpu[0], "loss")
    grad_loss = _randn(*cpu[0].shape, dtype=cpu[0].dtype, seed=3) if reduction == "none" else torch.ones_like(cpu[0])
    _, lse, total_weight = cpu
    backward = (grad_loss, x, target, weight, lse, total_weight, reduction, ignore_index, smoothing)
    _same(*_both("cross_entropy_backward", *backward), "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=_id)
def test_cross_entropy_class_targets(dtype, layout, reduction, target_dtype):
    x = _randn(3, 5, 23, 29, dtype=dtype, layout=layout, scale=3)  # 2001 pixels: 8 blocks
    target = _classes((3, 23, 29), 5, dtype=target_dtype, ignore_index=255, ignored=0.2)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype) + 0.5
    _cross_entropy_both(x, target, weight, reduction, 255, 0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probability_targets(reduction):
    x = _randn(2, 4, 19, 17, scale=3)
    target = torch.softmax(_randn(2, 4, 19, 17, seed=5), 1)
    _cross_entropy_both(x, target, None, reduction, -100, 0.2)


def test_cross_entropy_rows_with_many_classes():
    # (N, C) logits: one pixel per row, the class loop is long
    x = _randn(300, 1000, scale=3)
    _cross_entropy_both(x, _classes((300,), 1000), None, "mean", -100, 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_every_pixel_ignored(reduction):
    x = _randn(2, 3, 20, 20)
    _cross_entropy_both(x, torch.full((2, 20, 20), -100), None, reduction, -100, 0.0)


def test_cross_entropy_infinite_logits():
    # -inf masks a class (first class included: the online log-sum-exp must start from it); +inf
    # makes the pixel's loss NaN in torch
    x = _randn(2, 4, 16, 20, scale=3)
    x[:, 0, :4] = -math.inf
    x[:, 2, 4:6] = -math.inf
    x[0, 1, 10, 10] = math.inf
    target = _classes((2, 16, 20), 4)
    target[:, :4] = 1  # not the masked class: a finite loss
    _cross_entropy_both(x, target, None, "none", -100, 0.0)
    _cross_entropy_both(x, target, None, "sum", -100, 0.1)


def test_cross_entropy_bad_class_index_raises():
    x = _randn(2, 3, 20, 20)
    target = _classes((2, 20, 20), 3)
    target[1, 7, 9] = 3
    for ops in (SIM, CPU):
        with pytest.raises(IndexError, match=r"target class 3 at \(n=1, pixel=149\) is outside \[0, 3\)"):
            ops.cross_entropy(_pixels(x), _targets(target), None, "mean", -100, 0.0)


# --------------------------------------------------------------------------------- dice and focal


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=_id)
def test_dice_sums(dtype, layout, squared, target_dtype):
    x = _randn(3, 4, 45, 50, dtype=dtype, layout=layout, scale=2)  # 2250 pixels a sample: several chunks
    target = _classes((3, 45, 50), 4, dtype=target_dtype, ignore_index=255, ignored=0.1)
    x, target = _pixels(x), _targets(target)
    sim, cpu = _both("dice_sums", x, target, 255, squared)
    _same(sim, cpu, "sums")
    grad_sums = _randn(*cpu.shape, seed=6).to(cpu.dtype)
    _same(*_both("dice_sums_backward", grad_sums, x, target, 255, squared), "grad")


def test_dice_sums_rows_beyond_a_grid_dimension():
    # (N, C) input with N > 65535: one sample per grid row would be an invalid launch
    x, target = _pixels(_randn(70000, 3)), _targets(_classes((70000,), 3))
    sim, cpu = _both("dice_sums", x, target, -100, False)
    _same(sim, cpu, "sums")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [False, True])
def test_focal_loss(dtype, layout, reduction, alpha):
    x = _randn(3, 4, 23, 29, dtype=dtype, layout=layout, scale=3)
    target = _classes((3, 23, 29), 4, ignore_index=-1, ignored=0.2)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).to(dtype) if alpha else None
    x, target = _pixels(x), _targets(target)
    sim, cpu = _both("focal_loss", x, target, a, 2.0, reduction, -1)
    _same(sim[0], cpu[0], "loss")
    grad_loss = _randn(*cpu[0].shape, dtype=dtype, seed=3) if reduction == "none" else torch.ones_like(cpu[0])
    backward = (grad_loss, x, target, a, 2.0, cpu[1], cpu[2], reduction, -1)
    _same(*_both("focal_loss_backward", *backward), "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_loss_every_pixel_ignored(reduction):
    x, target = _pixels(_randn(2, 3, 20, 20)), torch.full((2, 400), -1)
    sim, cpu = _both("focal_loss", x, target, None, 2.0, reduction, -1)
    _same(sim[0], cpu[0], "loss")
    grad_loss = torch.ones_like(cpu[0])
    _same(*_both("focal_loss_backward", grad_loss, x, target, None, 2.0, cpu[1], cpu[2], reduction, -1), "grad")


def test_dice_and_focal_infinite_logits():
    # -inf masks a class, the first one included (the online log-sum-exp starts from it)
    x = _randn(2, 4, 16, 20, scale=3)
    x[:, 0, :4] = -math.inf
    x[:, 2, 4:6] = -math.inf
    target = _classes((2, 16, 20), 4)
    target[:, :6] = 1
    x, target = _pixels(x), _targets(target)
    _same(*_both("dice_sums", x, target, -100, False), "dice sums")
    _same(*_both("dice_sums_backward", torch.ones(3, 2, 4, dtype=x.dtype), x, target, -100, False), "dice grad")
    sim, cpu = _both("focal_loss", x, target, None, 2.0, "sum", -100)
    _same(sim[0], cpu[0], "focal loss")
    backward = (torch.ones_like(cpu[0]), x, target, None, 2.0, cpu[1], cpu[2], "sum", -100)
    _same(*_both("focal_loss_backward", *backward), "focal grad")


def test_dice_sums_without_classes():
    # every class index not ignored is out of range, as on CPU
    x, target = torch.randn(2, 0, 300), torch.full((2, 300), -100)
    _same(*_both("dice_sums", x, target, -100, False), "sums")
    target[1, 7] = 0
    for ops in (SIM, CPU):
        with pytest.raises(IndexError, match=r"target class 0 at \(n=1, pixel=7\) is outside \[0, 0\)"):
            ops.dice_sums(x, target, -100, False)


# ---------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("classes", [3, 40])
def test_confusion_matrix_from_logits(layout, classes):
    x = _randn(2, classes, 30, 31, layout=layout)
    target = _classes((2, 30, 31), classes, ignore_index=255, ignored=0.1, dtype=torch.uint8)
    _same(*_both("confusion_matrix", _pixels(x), _targets(target), classes, 255), "matrix")


def test_confusion_matrix_from_predicted_classes():
    pred = _classes((3, 40, 41), 6, seed=7)
    target = _classes((3, 40, 41), 6, ignore_index=-1, ignored=0.1)
    _same(*_both("confusion_matrix", _targets(pred), _targets(target), 6, -1), "matrix")


# ---------------------------------------------------------------------------------------- augment


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64], ids=_id)
def test_affine_augment(dtype, mask_dtype):
    image = _randn(3, 3, 40, 44, dtype=dtype)
    mask = _classes((3, 40, 44), 5, dtype=mask_dtype)
    angle = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
    scale = torch.tensor([1.1, 0.8, 1.0], dtype=torch.float64)
    theta = torch.zeros(3, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos() / scale, -angle.sin() / scale
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin() / scale, angle.cos() / scale
    theta[:, 0, 2], theta[2, 0, 0] = 0.1, -1.0  # a shift; the third sample flipped
    _same(*_both("affine_augment", image, mask, theta, 35, 38, 255), "image, mask")


# --------------------------------------------------------------------------------- batch_norm_act


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", 0.1), ("silu", 0.0)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_act(dtype, layout, activation, slope, training, residual):
    x = _randn(4, 3, 20, 21, dtype=dtype, layout=layout, scale=2)  # 1680 values a channel
    weight, bias = _randn(3, seed=2) + 1.5, _randn(3, seed=3)
    running_mean, running_var = _randn(3, seed=4), torch.rand(3, dtype=torch.float32) + 0.5
    r = _randn(4, 3, 20, 21, dtype=dtype, layout=layout, seed=5) if residual else None
    args = (weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, slope, r)
    sim, cpu = _both("batch_norm_act", x, *args)
    _same(sim, cpu, "forward")
    out, mean, invstd = cpu
    grad = _randn(*x.shape, dtype=dtype, layout=layout, seed=6)
    params = (weight, bias, mean, invstd, r, training, activation, slope)
    mask = [True, residual, True, True]
    _same(*_both("batch_norm_act_backward", grad, x, *params, False, mask), "backward")
    if activation != "leaky_relu":
        return
    # InPlace-ABN: the output overwrites the input; backward inverts the activation
    sim_x, cpu_x = x.clone(), x.clone()
    _same(SIM.batch_norm_act_(sim_x, *args), CPU.batch_norm_act_(cpu_x, *args), "inplace statistics")
    _same(sim_x, cpu_x, "inplace output")
    _same(*_both("batch_norm_act_backward", grad, out, *params, True, mask), "backward from the output")


def test_batch_norm_act_updates_running_statistics():
    x = _randn(4, 3, 20, 21)
    stats = {ops: (torch.zeros(3), torch.ones(3)) for ops in (SIM, CPU)}
    for ops, (rm, rv) in stats.items():
        ops.batch_norm_act(x, None, None, rm, rv, True, 0.3, 1e-5, "relu", 0.0, None)
    _same(stats[SIM], stats[CPU], "running statistics")


# ------------------------------------------------------------------------ conv2d_act, linear_act


def _fused_act_both(op, x, weight, bias, window, activation, slope):
    """Forward, then backward from the tensor forward saved (the pre-activation or the output)."""
    sim, cpu = _both(op, x, weight, bias, *window, activation, slope)
    _same(sim, cpu, "forward")
    out, preact = cpu
    channels_last = out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)
    grad = _randn(*out.shape, dtype=out.dtype, layout=LAYOUTS[channels_last], seed=4)
    backward = (grad, preact if preact.numel() else out, x, weight, *window, activation, slope, [True, True, True])
    _same(*_both(f"{op}_backward", *backward), "backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", -0.2), ("gelu", 0.0), ("sigmoid", 0.0)])
def test_conv2d_act(dtype, layout, activation, slope):
    # the CUDA bias + activation pass and activation backward (planes kernel for NCHW, columns for
    # channels_last) around the vendor convolution
    x = _randn(2, 4, 30, 33, dtype=dtype, layout=layout)
    weight = _randn(6, 4, 3, 3, dtype=dtype, layout=layout, seed=2)
    bias = _randn(6, dtype=dtype, seed=3)
    _fused_act_both("conv2d_act", x, weight, bias, ([1, 1], [1, 1], [1, 1], 1), activation, slope)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("silu", 0.0)])
def test_linear_act(dtype, activation, slope):
    x = _randn(700, 40, dtype=dtype)  # rows over several row blocks of the columns kernel
    weight, bias = _randn(50, 40, dtype=dtype, seed=2), _randn(50, dtype=dtype, seed=3)
    _fused_act_both("linear_act", x, weight, bias, (), activation, slope)
