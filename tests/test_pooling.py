import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    SavedBytes,
    assert_close_to_reference,
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    every_window_reaches_the_input,
    seeded_randn,
    skip_unless_supported,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import segfast

# the device fixture is set up once per test, for all of its examples
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def pool_args(draw, with_dilation):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if with_dilation else (1, 1)
    ceil = draw(st.booleans())
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    out = segfast.ops.pooling._pooled_size
    assume(out(h, k[0], s[0], p[0], d[0], ceil) > 0 and out(w, k[1], s[1], p[1], d[1], ceil) > 0)
    return (draw(st.integers(1, 2)), draw(st.integers(1, 5)), h, w), k, s, p, d, ceil


def _input(shape, layout, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).to(device, memory_format=layout).requires_grad_()


@EXAMPLES
@given(args=pool_args(with_dilation=True), layout=st.sampled_from(LAYOUTS))
def test_max_pool2d_matches_torch_exactly(device, args, layout):
    shape, k, s, p, d, ceil = args
    assume(all(every_window_reaches_the_input(shape[2 + i], k[i], s[i], p[i], d[i], ceil) for i in range(2)))
    x = _input(shape, layout, device=device.device)
    ours, ours_idx = segfast.ops.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours_idx, ref_idx)
    assert ours.is_contiguous(memory_format=layout)
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(segfast.ops.max_pool2d(x, k, s, p, d, ceil), x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-14, atol=1e-14)  # overlapping windows: summation order


@EXAMPLES
@given(
    args=pool_args(with_dilation=False),
    layout=st.sampled_from(LAYOUTS),
    count_include_pad=st.booleans(),
    divisor=st.sampled_from([None, 1, 3, -2]),
)
def test_avg_pool2d_matches_torch(device, args, layout, count_include_pad, divisor):
    shape, k, s, p, _, ceil = args
    x = _input(shape, layout, device=device.device)
    ours = segfast.ops.avg_pool2d(x, k, s, p, ceil, count_include_pad, divisor)
    ref = F.avg_pool2d(x, k, s, p, ceil, count_include_pad, divisor)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    assert ours.is_contiguous(memory_format=layout)
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_low_precision_within_twice_stock_error(device, op, layout, dtype):
    skip_unless_supported(device, dtype)
    x64 = _input((2, 8, 15, 17), layout, device=device.device)
    x = x64.detach().to(dtype).requires_grad_()
    args = dict(kernel_size=3, stride=2, padding=1)
    ours, stock, ref = (getattr(segfast.ops, op)(x, **args), getattr(F, op)(x, **args), getattr(F, op)(x64, **args))
    assert_close_to_reference(ours, stock, ref, f"{op} forward")
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, x, grad.to(dtype))
    (g_stock,) = torch.autograd.grad(stock, x, grad.to(dtype))
    (g_ref,) = torch.autograd.grad(ref, x64, grad)
    assert_close_to_reference(g_ours, g_stock, g_ref, f"{op} backward")


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 1, 4, 4), (1, 3, 1, 5), (2, 3, 4, 1), (1, 1, 1, 1), (3, 2, 5, 4)])
@pytest.mark.parametrize("view", ["contiguous", "channels_last", "transposed"])
def test_output_layout_and_fake_follow_torch(shape, view):
    x = torch.randn(shape)
    x = {
        "contiguous": x,
        "channels_last": x.to(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
    }[view].requires_grad_()
    k = (min(2, shape[2]), min(2, shape[3]))
    for ours, stock in (
        (segfast.ops.max_pool2d(x, k, 1), F.max_pool2d(x, k, 1)),
        (segfast.ops.avg_pool2d(x, k, 1), F.avg_pool2d(x, k, 1)),
    ):
        torch.testing.assert_close(ours, stock)
        if ours.numel() > 1:
            assert ours.stride() == stock.stride()
    torch.library.opcheck(
        torch.ops.segfast.max_pool2d.default,
        (x, list(k), [1, 1], [0, 0], [1, 1], False, False),
        test_utils=("test_faketensor",),
    )


def test_max_pool2d_nan_propagates_like_torch(device):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device.device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2:4, 2:4] = float("nan")
    x[0, 1, 0, 0] = float("-inf")
    x.requires_grad_()
    ours, ours_idx = segfast.ops.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert torch.equal(ours_idx, ref_idx)


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (2, 3), (5, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_by_two_stride_two_path_matches_torch(device, size, ceil_mode, dtype, layout):
    # 2x2 / stride 2 pooling takes its own one-pass kernels (NCHW forward and backward, channels_last
    # max backward); odd sizes leave a last row / column out of every window, ties and NaN keep
    # torch's first-wins rule
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (2, 3, *size), generator=g).to(dtype)  # many ties
    x[0, 0, 0, 1] = float("nan")
    x = x.to(device.device, memory_format=layout).requires_grad_()
    grad_seed = torch.Generator().manual_seed(2)
    for divisor in (None, 3):
        ours = segfast.ops.avg_pool2d(x, 2, ceil_mode=ceil_mode, divisor_override=divisor)
        ref = F.avg_pool2d(x, 2, ceil_mode=ceil_mode, divisor_override=divisor)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        grad = torch.randn(ref.shape, generator=grad_seed).to(device.device, dtype)
        torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])
    ours, ours_idx = segfast.ops.max_pool2d(x, 2, ceil_mode=ceil_mode, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, ceil_mode=ceil_mode, return_indices=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours_idx, ref_idx)
    grad = torch.randn(ref.shape, generator=grad_seed).to(device.device, dtype)
    (g_ours,) = torch.autograd.grad(segfast.ops.max_pool2d(x, 2, ceil_mode=ceil_mode), x, grad)
    torch.testing.assert_close(g_ours, torch.autograd.grad(ref, x, grad)[0], rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_of_only_padding(device, layout):
    x = _input((1, 3, 1, 5), layout, device=device.device)
    ours, ours_idx = segfast.ops.max_pool2d(x, 2, 1, 1, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x.detach(), 2, 1, 1, 2, return_indices=True)
    torch.testing.assert_close(ours, ref)  # -inf, as torch
    assert torch.equal(ours_idx, ref_idx)
    (grad,) = torch.autograd.grad(segfast.ops.max_pool2d(x, 2, 1, 1, 2).sum(), x)
    assert torch.isfinite(grad).all() and grad.sum() == 0


def test_unbatched_input():
    x = torch.randn(3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(segfast.ops.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(segfast.ops.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1))


def test_large_window_uses_int32_argmax_and_stays_exact(device):
    x = _input((1, 2, 20, 20), torch.contiguous_format, device=device.device)
    out = segfast.ops.max_pool2d(x, 17, 1)  # 289 taps > 256
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(F.max_pool2d(x, 17, 1).sum(), x)
    torch.testing.assert_close(g, g_ref)
    _, argmax = torch.ops.segfast.max_pool2d(x, [17, 17], [1, 1], [0, 0], [1, 1], False, False)
    assert argmax.dtype == torch.int32


def test_empty_batch_returns_empty_like_torch(device):
    x = torch.randn(0, 3, 8, 8, device=device.device)
    assert segfast.ops.max_pool2d(x, 2).shape == F.max_pool2d(x, 2).shape == (0, 3, 4, 4)
    assert segfast.ops.avg_pool2d(x, 2).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool2d_saves_one_byte_per_output(layout):
    x = _input((2, 4, 16, 16), layout, dtype=torch.float32)
    with SavedBytes(exclude=[x]) as ours:
        out = segfast.ops.max_pool2d(x, 2)
    with SavedBytes(exclude=[x]) as stock:
        F.max_pool2d(x, 2)
    assert ours.total == out.numel()  # uint8 argmax, nothing else
    assert stock.total == 8 * ours.total  # torch keeps int64 indices
    with SavedBytes() as avg:
        segfast.ops.avg_pool2d(x, 2)
    assert avg.total == 0


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_gradcheck(device, op):
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, device=device.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: getattr(segfast.ops, op)(t, 3, 2, 1, ceil_mode=True), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, layout):
    x = torch.randn(2, 3, 9, 8, device=device.device).to(memory_format=layout).requires_grad_()
    for return_indices in (False, True):
        torch.library.opcheck(
            torch.ops.segfast.max_pool2d.default, (x, [3, 2], [2, 1], [1, 0], [1, 2], True, return_indices)
        )
    torch.library.opcheck(torch.ops.segfast.avg_pool2d.default, (x, [3, 2], [2, 1], [1, 0], True, False, None))
    torch.library.opcheck(torch.ops.segfast.avg_pool2d.default, (x, [2, 2], [2, 2], [0, 0], False, True, 3))


def test_torch_compile_fullgraph():
    def f(x):
        return segfast.ops.avg_pool2d(segfast.ops.max_pool2d(x, 2), 3, 1, 1).sum()

    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: segfast.ops.max_pool2d(torch.randn(2, 8, 8), 0), ValueError, "kernel_size must be >= 1"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 2, 8, 8), 2, stride=0), ValueError, "stride must be >= 1"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 2, 8, 8), 3, padding=2), ValueError, "at most half"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 2, 8, 8), 2, padding=-1), ValueError, "padding must be >= 0"),
        (lambda: segfast.ops.max_pool2d(torch.randn(8, 8), 2), ValueError, "must be 3-D or 4-D"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 1, 2, 8, 8), 2), ValueError, "must be 3-D or 4-D"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 2, 2, 2), 3), ValueError, "too small"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 0, 4, 4), 2), ValueError, "non-empty channel"),
        (lambda: segfast.ops.max_pool2d(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2), TypeError, "dtype"),
        (lambda: segfast.ops.max_pool2d(torch.randn(1, 2, 4, 4), (2, 2, 2)), TypeError, "kernel_size"),
        (lambda: segfast.ops.avg_pool2d(torch.randn(1, 2, 4, 4), 2, divisor_override=0), ValueError, "non-zero"),
        (lambda: segfast.ops.max_pool2d([1, 2], 2), TypeError, "must be a Tensor"),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_modules_mirror_torch():
    x = torch.randn(2, 3, 11, 11)
    for ours, stock in [
        (segfast.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (segfast.nn.MaxPool2d(2, return_indices=True), torch.nn.MaxPool2d(2, return_indices=True)),
        (segfast.nn.AvgPool2d(3, 2, 1, count_include_pad=False), torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    ]:
        torch.testing.assert_close(ours(x), stock(x))


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    grad = torch.randn(1, 2, 4, 4, device="cuda")
    argmax = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    cases = [
        lambda: torch.ops.segfast.max_pool2d_backward(grad, argmax, [1, 2, 8, 8], [2, 2], [2, 2], [0, 0], [1, 1], False)
    ]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
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
def test_twin_max_pool2d(accelerator, dtype, layout, kernel, stride, padding, dilation, ceil_mode, return_indices):
    x = seeded_randn(2, 3, 37, 41, dtype=dtype, layout=layout)
    x[0, 1, 5, 5] = math.nan  # a NaN wins its windows, as in torch
    window = (kernel, stride, padding, dilation, ceil_mode)
    ours, cpu = accelerator.both("max_pool2d", x, *window, return_indices)
    assert_same_as_twin(ours, cpu, "forward")
    grad = seeded_randn(*cpu[0].shape, dtype=dtype, layout=layout, seed=2)
    assert_same_as_twin(*accelerator.both("max_pool2d_backward", grad, cpu[1], list(x.shape), *window), "backward")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, count_include_pad, divisor_override",
    [
        ((3, 3), (2, 2), (1, 1), False, True, None),
        ((2, 3), (1, 2), (1, 1), True, False, None),
        ((4, 4), (3, 3), (2, 2), True, True, 5),
    ],
    ids=["3x3s2", "ceil-exclude-pad", "divisor"],
)
def test_twin_avg_pool2d(
    accelerator, dtype, layout, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    x = seeded_randn(2, 3, 37, 41, dtype=dtype, layout=layout)
    window = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    ours, cpu = accelerator.both("avg_pool2d", x, *window)
    assert_same_as_twin(ours, cpu, "forward")
    grad = seeded_randn(*cpu.shape, dtype=dtype, layout=layout, seed=2)
    assert_same_as_twin(*accelerator.both("avg_pool2d_backward", grad, list(x.shape), *window), "backward")
