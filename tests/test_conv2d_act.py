import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ACTIVATION_REFERENCES,
    LAYOUTS,
    SavedBytes,
    assert_close_to_reference,
    assert_fused_act_same_as_twin,
    assert_grads_close_to_reference,
    assert_mixed_devices_refused,
    dtype_id,
    dynamo_graph_targets,
    seeded_randn,
    skip_unless_supported,
)

import segfast
from segfast.bench.dispatch import CHANNELS_LAST, DIRECT, FORCED, VENDOR, forcing
from segfast.bench.profiling import FreshOutputs

ACTS = ACTIVATION_REFERENCES

# (input shape, weight shape, conv kwargs): groups, dilation, asymmetric stride/padding, strings
GEOMETRIES = [
    ((2, 4, 9, 11), (6, 4, 3, 3), dict(padding=1)),
    ((2, 4, 9, 11), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    ((1, 3, 12, 10), (8, 3, 3, 3), dict(stride=2, dilation=2)),  # first-layer shape: channels_last core
    ((2, 6, 8, 8), (6, 1, 3, 3), dict(padding="same", groups=6)),  # depthwise
    ((2, 4, 7, 9), (5, 4, 4, 2), dict(padding="same", dilation=(1, 3))),  # even kernel: asymmetric pad
    ((2, 4, 7, 9), (5, 4, 3, 3), dict(padding="valid")),
    ((4, 7, 7), (5, 4, 1, 1), dict()),  # unbatched (C, H, W), 1x1
]


def _tensors(input_shape, weight_shape, dtype, layout=torch.contiguous_format, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(weight_shape, generator=g, dtype=torch.float64).to(device) / weight_shape[1] ** 0.5
    b = torch.randn(weight_shape[0], generator=g, dtype=torch.float64).to(device) if bias else None
    if x.dim() == 4:
        x = x.to(memory_format=layout)
    ref = [t.requires_grad_() for t in (x, w, b) if t is not None]
    low = [t.detach().to(dtype).requires_grad_() for t in ref]
    if not bias:
        ref.append(None), low.append(None)
    return ref, low


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
def test_matches_torch_forward_and_backward(device, layout, geometry, activation, dtype):
    skip_unless_supported(device, dtype)
    input_shape, weight_shape, kwargs = GEOMETRIES[geometry]
    (x64, w64, b64), (x, w, b) = _tensors(input_shape, weight_shape, dtype, layout, device=device.device)
    slope = 0.1

    def stock(x, w, b):
        return ACTS[activation](F.conv2d(x, w, b, **kwargs), slope)

    ours = segfast.ops.conv2d_act(x, w, b, **kwargs, activation=activation, negative_slope=slope)
    theirs, ref = stock(x, w, b), stock(x64, w64, b64)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, ref)
    assert_close_to_reference(ours, theirs, ref, "forward")
    grad = torch.randn_like(ref)
    if activation in ("relu", "leaky_relu"):
        # where z rounds to the other side of the kink the derivative flips in any implementation;
        # give those outputs no gradient so that the comparison measures rounding, not coin flips
        margin = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
        grad = grad * (F.conv2d(x64, w64, b64, **kwargs).abs() > margin)
    inputs = ((x, w, b), (x, w, b), (x64, w64, b64))
    assert_grads_close_to_reference(("input", "weight", "bias"), (ours, theirs, ref), inputs, grad)


@pytest.mark.parametrize("path", [VENDOR, CHANNELS_LAST, DIRECT])
@pytest.mark.parametrize("input_grad", [False, True], ids=["first-layer", "input-grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "silu", "sigmoid", "leaky_relu"])
@pytest.mark.parametrize("kernel, padding", [((3, 3), 1), ((7, 7), 3), ((1, 3), (0, 2)), ((5, 2), 0)])
def test_few_input_channels_on_every_cpu_path(kernel, padding, activation, dtype, input_grad, path):
    # a network's first layer (RGB in, its input needs no gradient), forced onto each path the CPU
    # dispatch table can choose (segfast's direct kernel, oneDNN channels_last or NCHW)
    (x64, w64, b64), (x, w, b) = _tensors((2, 3, 13, 70), (6, 3, *kernel), dtype)
    if not input_grad:
        x64, x = x64.detach(), x.detach()

    def stock(x, w, b):
        return ACTS[activation](F.conv2d(x, w, b, padding=padding), 0.1)

    with forcing(FORCED[path]):
        ours = segfast.ops.conv2d_act(x, w, b, padding=padding, activation=activation, negative_slope=0.1)
        theirs, ref = stock(x, w, b), stock(x64, w64, b64)
        assert_close_to_reference(ours, theirs, ref, "forward")
        grad = torch.randn_like(ref)
        if activation in ("relu", "leaky_relu"):
            margin = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
            grad = grad * (F.conv2d(x64, w64, b64, padding=padding).abs() > margin)
        names, inputs = ("input", "weight", "bias"), ((x, w, b), (x, w, b), (x64, w64, b64))
        if not input_grad:
            names, inputs = names[1:], tuple(i[1:] for i in inputs)
        assert_grads_close_to_reference(names, (ours, theirs, ref), inputs, grad)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_shape, weight_shape, kwargs", GEOMETRIES[:6])
def test_channels_last_forward_path(input_shape, weight_shape, kwargs, dtype, activation):
    # an NCHW caller's forward forced onto the channels_last core (dispatch choice
    # channels_last_forward): the output NCHW as F.conv2d's, values and gradients within the 2x rule
    (x64, w64, b64), (x, w, b) = _tensors(input_shape, weight_shape, dtype)

    def stock(x, w, b):
        return ACTS[activation](F.conv2d(x, w, b, **kwargs), 0.0)

    with forcing(FORCED[CHANNELS_LAST]):
        ours = segfast.ops.conv2d_act(x, w, b, **kwargs, activation=activation)
        theirs, ref = stock(x, w, b), stock(x64, w64, b64)
        assert ours.is_contiguous()
        assert_close_to_reference(ours, theirs, ref, "forward")
        grad = torch.randn_like(ref)
        if activation == "relu":
            margin = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
            grad = grad * (F.conv2d(x64, w64, b64, **kwargs).abs() > margin)
        assert_grads_close_to_reference(
            ("input", "weight", "bias"), (ours, theirs, ref), ((x, w, b),) * 2 + ((x64, w64, b64),), grad
        )


@pytest.mark.parametrize("path", [VENDOR, CHANNELS_LAST, DIRECT])
def test_few_input_channels_gradcheck(path):
    (x, w, b), _ = _tensors((2, 3, 6, 7), (4, 3, 3, 3), torch.float64)
    x = x.detach()
    with forcing(FORCED[path]):
        assert torch.autograd.gradcheck(
            lambda w, b: segfast.ops.conv2d_act(x, w, b, padding=1, activation="silu"), (w, b)
        )


def test_none_is_bitwise_f_conv2d():
    for weight_shape, kwargs in (((4, 8, 3, 3), dict(padding=1)), ((4, 4, 3, 3), dict(stride=2, groups=2, dilation=2))):
        (x, w, b), _ = _tensors((2, 8, 10, 10), weight_shape, torch.float64)
        ours = segfast.ops.conv2d_act(x, w, b, **kwargs, activation="none")
        assert torch.equal(ours, F.conv2d(x, w, b, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False])
def test_none_backward_with_grad_in_the_other_layout(layout, dtype, bias):
    # a channels_last model's logits made NCHW send NCHW gradients into a channels_last head: the
    # layout change and the bias gradient run as one pass
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    (x64, w64, b64), (x, w, b) = _tensors((2, 16, 9, 7), (21, 16, 1, 1), dtype, layout, bias=bias)
    ours = segfast.ops.conv2d_act(x, w, b, activation="none")
    theirs, ref = F.conv2d(x, w, b), F.conv2d(x64, w64, b64)
    grad = seeded_randn(*ref.shape, dtype=torch.float64, layout=other, seed=3)
    wrt = [(t, u, v) if bias else (t, u) for t, u, v in ((x, w, b), (x, w, b), (x64, w64, b64))]
    names = ("input", "weight", "bias")[: len(wrt[0])]
    assert_grads_close_to_reference(names, (ours, theirs, ref), wrt, grad)
    (gx,) = torch.autograd.grad(segfast.ops.conv2d_act(x, w, b, activation="none"), x, grad.to(dtype))
    assert gx.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("in_channels", [3, 32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_layout_follows_f_conv2d(layout, in_channels):
    _, (x, w, b) = _tensors((2, in_channels, 9, 9), (8, in_channels, 3, 3), torch.float32, layout)
    ours = segfast.ops.conv2d_act(x, w, b, padding=1)
    stock = F.relu(F.conv2d(x, w, b, padding=1))
    assert ours.is_contiguous(memory_format=layout)
    assert ours.stride() == stock.stride()
    (gx,) = torch.autograd.grad(ours.sum(), x)
    assert gx.is_contiguous(memory_format=layout)


def test_no_bias_and_leaky_relu_negative_slope(device):
    (x64, w64, _), (x, w, _) = _tensors((2, 3, 8, 8), (4, 3, 3, 3), torch.float64, bias=False, device=device.device)
    ours = segfast.ops.conv2d_act(x, w, None, padding=1, activation="leaky_relu", negative_slope=-0.5)
    ref = F.leaky_relu(F.conv2d(x64, w64, None, padding=1), -0.5)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x64)[0])


@pytest.mark.parametrize("activation", list(ACTS))
def test_gradcheck(device, activation):
    (x, w, b), _ = _tensors((1, 2, 5, 6), (3, 2, 3, 2), torch.float64, device=device.device)
    # keep pre-activations away from relu's kink, where finite differences are meaningless
    assert torch.autograd.gradcheck(
        lambda x, w, b: segfast.ops.conv2d_act(
            x, w, b, stride=(1, 2), padding=1, activation=activation, negative_slope=0.2
        ),
        (x, w, b),
        atol=1e-6,
    )


@pytest.mark.parametrize("in_channels, groups", [(3, 1), (8, 1), (8, 2)])  # a first layer, a middle one, grouped
def test_nan_reaches_its_receptive_field(in_channels, groups):
    x = torch.randn(1, in_channels, 9, 9, dtype=torch.float64)
    x[0, 0, 4, 4] = float("nan")
    w = torch.randn(4, in_channels // groups, 3, 3, dtype=torch.float64)
    out = segfast.ops.conv2d_act(x, w, None, padding=1, groups=groups, activation="relu")
    nan_channels = 4 // groups  # the output channels of the group that reads input channel 0
    assert out[0, :nan_channels, 3:6, 3:6].isnan().all()


def test_empty_batch_returns_empty_like_torch():
    x, w = torch.randn(0, 3, 8, 8), torch.randn(4, 3, 3, 3)
    assert segfast.ops.conv2d_act(x, w).shape == F.conv2d(x, w).shape == (0, 4, 6, 6)


@pytest.mark.parametrize(
    "activation, saved",
    [
        ("relu", "output"),
        ("leaky_relu", "output"),
        ("sigmoid", "output"),
        ("silu", "preact"),
        ("gelu", "preact"),
        ("none", None),
    ],
)
def test_saves_one_activation_sized_tensor(activation, saved):
    _, (x, w, b) = _tensors((2, 4, 16, 16), (8, 4, 3, 3), torch.float32)
    with SavedBytes(exclude=[x, w, b]) as counter:
        out = segfast.ops.conv2d_act(x, w, b, padding=1, activation=activation)
    output_bytes = out.numel() * out.element_size()
    assert counter.total == (0 if saved is None else output_bytes)
    if saved == "output":  # the op's own output, not a copy
        assert out.untyped_storage().data_ptr() in counter.storages


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_backward_allocates_only_gradients(activation):
    _, (x, w, b) = _tensors((2, 8, 10, 10), (4, 8, 3, 3), torch.float32)
    out = segfast.ops.conv2d_act(x, w, b, padding=1, activation=activation)
    grad = torch.ones_like(out)
    with FreshOutputs() as fresh:
        torch.autograd.grad(out, (x, w, b), grad)
    ops = {op for op, size, _, _ in fresh.outputs if size.numel() > 4}
    assert ops == {"segfast.conv2d_act_backward.default"}  # no zero-filled grad for the pre-activation


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", ["relu", "gelu", "none"])
def test_opcheck(device, activation, layout):
    x = torch.randn(2, 3, 7, 8, device=device.device).to(memory_format=layout).requires_grad_()
    w = torch.randn(4, 3, 3, 3, device=device.device, requires_grad=True)
    b = torch.randn(4, device=device.device, requires_grad=True)
    torch.library.opcheck(torch.ops.segfast.conv2d_act.default, (x, w, b, [1, 2], [1, 1], [1, 1], 1, activation, 0.01))
    torch.library.opcheck(
        torch.ops.segfast.conv2d_act.default, (x, w, None, [1, 1], [0, 0], [2, 1], 1, activation, 0.01)
    )


def test_torch_compile_fullgraph():
    model = torch.nn.Sequential(
        segfast.nn.Conv2dAct(3, 8, 3, padding=1), segfast.nn.Conv2dAct(8, 4, 3, padding="same", activation="silu")
    )
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    grads_compiled = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    grads_eager = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# how a call is made: (parameters require grad, grad mode on)
COMPILE_MODES = {"frozen": (False, True), "no_grad": (True, False), "training": (True, True)}


@pytest.mark.parametrize("activation", list(ACTIVATION_REFERENCES))
@pytest.mark.parametrize("mode", list(COMPILE_MODES))
def test_compile_gives_inductor_the_stock_composition_for_inference(activation, mode):
    # with no gradient to compute, torch.compile sees F.conv2d + the activation (inductor chooses
    # the layout and fuses); with one, segfast's op, for its fused backward
    params_grad, grad_mode = COMPILE_MODES[mode]
    conv = segfast.nn.Conv2dAct(8, 8, 3, padding="same", activation=activation, negative_slope=0.2)
    conv.requires_grad_(params_grad)
    x = torch.randn(2, 8, 10, 10)
    with torch.set_grad_enabled(grad_mode):
        targets = dynamo_graph_targets(conv, x)
        ours = "segfast.conv2d_act.default" in targets
        stock = any("conv2d" in t and "segfast" not in t for t in targets)
        assert ours == (mode == "training") and stock != ours, targets
        torch._dynamo.reset()
        out = torch.compile(conv, fullgraph=True)(x)
    expected = ACTIVATION_REFERENCES[activation](F.conv2d(x, conv.weight, conv.bias, padding=1), 0.2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(lambda t: segfast.ops.conv2d_act(t, conv.weight, activation="tanh"))(x)


@pytest.mark.parametrize("in_channels", [3, 8])
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_keeps_the_op_for_inference_where_the_direct_kernel_may_run(in_channels, layout, dynamic):
    # the first layer's direct kernel beats oneDNN (and so inductor) where the table takes it
    conv = segfast.nn.Conv2dAct(in_channels, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, in_channels, 16, 16).contiguous(memory_format=layout)
    targets = dynamo_graph_targets(conv, x)
    torch._dynamo.reset()
    out = torch.compile(conv, fullgraph=True, dynamic=dynamic)(x)
    direct = in_channels <= 4 and layout == torch.contiguous_format
    assert ("segfast.conv2d_act.default" in targets) == direct, targets
    torch.testing.assert_close(out, F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), rtol=1e-5, atol=1e-5)


def test_module_state_dict_loads_both_ways():
    stock = torch.nn.Conv2d(3, 5, 3, padding=1, groups=1)
    ours = segfast.nn.Conv2dAct(3, 5, 3, padding=1, activation="none")
    assert set(ours.state_dict()) == set(stock.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), stock(x))
    stock.load_state_dict(segfast.nn.Conv2dAct(3, 5, 3, padding=1).state_dict())
    assert "activation='none'" in repr(ours)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: segfast.ops.conv2d_act(torch.randn(3, 3), torch.randn(4, 3, 3, 3)),
            ValueError,
            "input must be 3-D or 4-D",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3)),
            ValueError,
            "weight must be 4-D",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, dtype=torch.float64)),
            TypeError,
            "weight dtype torch.float64 differs from input",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 5, 8, 8), torch.randn(4, 3, 3, 3)),
            ValueError,
            "input has 5 channels",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 4, 8, 8), torch.randn(3, 2, 3, 3), groups=2),
            ValueError,
            "not divisible by groups",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5)),
            ValueError,
            "bias must have shape",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=0),
            ValueError,
            "stride must be >= 1",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=-1),
            ValueError,
            "padding must be >= 0",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding="same", stride=2),
            ValueError,
            "needs stride 1",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)),
            ValueError,
            "exceeds the padded input",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), activation="tanh"),
            ValueError,
            "activation must be one of",
        ),
        (
            lambda: segfast.ops.conv2d_act(
                torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), negative_slope=float("nan")
            ),
            ValueError,
            "negative_slope must be a finite float",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half()),
            TypeError,
            "input dtype must be one of",
        ),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 0, 8, 8), torch.randn(4, 0, 3, 3)),
            ValueError,
            "non-empty channel",
        ),
        (lambda: segfast.nn.Conv2dAct(3, 4, 3, padding_mode="reflect"), ValueError, "padding_mode"),
        (
            lambda: segfast.ops.conv2d_act(torch.randn(1, 3, 8, 8), torch.randn(0, 3, 3, 3)),
            ValueError,
            "weight must have output channels",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), (3, 0)])
@pytest.mark.parametrize("activation", ["relu", "silu", "none"])
@pytest.mark.parametrize("channels", [(32, 64), (64, 48)])
def test_implicit_gemm_matches_stock(device, monkeypatch, dtype, kernel, padding, activation, channels):
    """The opt-in tensor-core convolution (SEGFAST_CUDA_CONV=igemm); the simulation does not run its
    WMMA fragments (docs/cuda-sim.md), so a GPU only."""
    if device.name != "cuda":
        pytest.skip("the implicit-GEMM convolution runs on a GPU only")
    monkeypatch.setenv("SEGFAST_CUDA_CONV", "igemm")
    c_in, c_out = channels
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, c_in, 13, 10, generator=g, dtype=torch.float64).cuda().to(memory_format=torch.channels_last)
    w64 = 0.1 * torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64).cuda()
    w64 = w64.to(memory_format=torch.channels_last)
    b64 = torch.randn(c_out, generator=g, dtype=torch.float64).cuda()
    ref = [t.requires_grad_() for t in (x64, w64, b64)]
    low = [t.detach().to(dtype).requires_grad_() for t in ref]
    act = ACTS[activation]

    def stock(x, w, b):
        return act(F.conv2d(x, w, b, padding=padding), 0.01)

    ours = segfast.ops.conv2d_act(*low, padding=padding, activation=activation)
    outputs = (ours, stock(*low), stock(*ref))
    assert_close_to_reference(*outputs, "igemm forward")
    grad = torch.randn_like(outputs[2])
    assert_grads_close_to_reference(("input", "weight", "bias"), outputs, (low, low, ref), grad)


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    x = torch.randn(1, 2, 6, 6, device="cuda")
    cases = [
        lambda: torch.ops.segfast.conv2d_act(x, torch.randn(3, 2, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0),
        lambda: torch.ops.segfast.linear_act(torch.randn(4, 3, device="cuda"), torch.randn(5, 3), None, "relu", 0.0),
    ]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", -0.2), ("gelu", 0.0), ("sigmoid", 0.0)])
def test_twin_conv2d_act(accelerator, dtype, layout, activation, slope):
    # the CUDA bias + activation pass and activation backward (planes kernel for NCHW, columns for
    # channels_last) around the vendor convolution
    x = seeded_randn(2, 4, 30, 33, dtype=dtype, layout=layout)
    weight = seeded_randn(6, 4, 3, 3, dtype=dtype, layout=layout, seed=2)
    bias = seeded_randn(6, dtype=dtype, seed=3)
    assert_fused_act_same_as_twin(
        accelerator, "conv2d_act", x, weight, bias, ([1, 1], [1, 1], [1, 1], 1), activation, slope
    )
