import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ACTIVATION_REFERENCES,
    SavedBytes,
    assert_close_to_reference,
    assert_fused_act_same_as_twin,
    dtype_id,
    dynamo_graph_targets,
    seeded_randn,
    skip_unless_supported,
)

import segfast
from segfast.bench.profiling import FreshOutputs

ACTS = ACTIVATION_REFERENCES
SHAPES = [(7,), (5, 7), (2, 3, 7), (0, 7), (300, 7)]  # unbatched, batch, extra dims, empty, > one row block


def _tensors(input_shape, out_features, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ref = [
        torch.randn(input_shape, generator=g, dtype=torch.float64).to(device),
        torch.randn(out_features, input_shape[-1], generator=g, dtype=torch.float64).to(device)
        / input_shape[-1] ** 0.5,
        torch.randn(out_features, generator=g, dtype=torch.float64).to(device) if bias else None,
    ]
    low = [None if t is None else t.to(dtype).requires_grad_() for t in ref]
    return [None if t is None else t.requires_grad_() for t in ref], low


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_forward_and_backward(device, bias, shape, activation, dtype):
    skip_unless_supported(device, dtype)
    (x64, w64, b64), (x, w, b) = _tensors(shape, 6, dtype, bias, device=device.device)

    def stock(x, w, b):
        return ACTS[activation](F.linear(x, w, b), 0.1)

    ours = segfast.ops.linear_act(x, w, b, activation, 0.1)
    theirs, ref = stock(x, w, b), stock(x64, w64, b64)
    assert_close_to_reference(ours, theirs, ref, "forward")
    grad = torch.randn_like(ref)
    if activation in ("relu", "leaky_relu"):  # no gradient where rounding may flip the kink
        margin = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
        grad = grad * (F.linear(x64, w64, b64).abs() > margin)
    wrt = [t for t in (x, w, b) if t is not None]
    wrt64 = [t for t in (x64, w64, b64) if t is not None]
    for name, a, s, r in zip(
        ("input", "weight", "bias"),
        torch.autograd.grad(ours, wrt, grad.to(dtype)),
        torch.autograd.grad(theirs, wrt, grad.to(dtype)),
        torch.autograd.grad(ref, wrt64, grad),
    ):
        assert_close_to_reference(a, s, r, f"grad {name}")


@pytest.mark.parametrize("bias_shape", [(1,), ()])
def test_one_element_bias_broadcasts_like_f_linear(bias_shape):
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    b = torch.randn(bias_shape, dtype=torch.float64, requires_grad=True)
    ours, ref = segfast.ops.linear_act(x, w, b, "silu"), F.silu(F.linear(x, w, b))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), b)[0], torch.autograd.grad(ref.sum(), b)[0])


def test_none_is_f_linear_bitwise():
    (x, w, b), _ = _tensors((4, 9), 5, torch.float64)
    assert torch.equal(segfast.ops.linear_act(x, w, b, "none"), F.linear(x, w, b))


@pytest.mark.parametrize("activation", list(ACTS))
def test_gradcheck(device, activation):
    (x, w, b), _ = _tensors((3, 4), 2, torch.float64, device=device.device)
    assert torch.autograd.gradcheck(lambda x, w, b: segfast.ops.linear_act(x, w, b, activation, 0.2), (x, w, b))


@pytest.mark.parametrize("activation, saves_output", [("relu", True), ("sigmoid", True), ("gelu", False)])
def test_saves_one_activation_sized_tensor_and_allocates_only_gradients(activation, saves_output):
    _, (x, w, b) = _tensors((64, 32), 16, torch.float32)
    with SavedBytes(exclude=[x, w, b]) as saved:
        out = segfast.ops.linear_act(x, w, b, activation)
    assert saved.total == out.numel() * out.element_size()
    assert (out.untyped_storage().data_ptr() in saved.storages) == saves_output
    grad = torch.ones_like(out)
    with FreshOutputs() as fresh:
        torch.autograd.grad(out, (x, w, b), grad)
    assert {op for op, size, _, _ in fresh.outputs if size.numel() > 16} == {"segfast.linear_act_backward.default"}


def test_bias_gradient_deterministic_across_thread_counts():
    _, (x, w, b) = _tensors((1000, 24), 8, torch.float32)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(segfast.ops.linear_act(x, w, b, "silu").sum(), b)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*grads)


@pytest.mark.parametrize("activation", ["relu", "gelu", "none"])
def test_opcheck(device, activation):
    x = torch.randn(3, 5, 4, device=device.device, requires_grad=True)
    w, b = torch.randn(6, 4, device=device.device, requires_grad=True), torch.randn(6, device=device.device)
    torch.library.opcheck(torch.ops.segfast.linear_act.default, (x, w, b, activation, 0.01))
    torch.library.opcheck(torch.ops.segfast.linear_act.default, (x, w, None, activation, 0.01))


def test_torch_compile_fullgraph_and_module_state_dict():
    stock = torch.nn.Linear(8, 4)
    ours = segfast.nn.LinearAct(8, 4, activation="gelu")
    assert set(ours.state_dict()) == set(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), F.gelu(stock(x)))
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x))
    torch.testing.assert_close(
        torch.autograd.grad(compiled(x).sum(), ours.weight)[0], torch.autograd.grad(ours(x).sum(), ours.weight)[0]
    )


@pytest.mark.parametrize("activation", list(ACTIVATION_REFERENCES))
@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_compile_gives_inductor_the_stock_composition_for_inference(activation, needs_grad):
    # as conv2d_act: F.linear + the activation where no gradient is computed, else segfast's op
    layer = segfast.nn.LinearAct(8, 4, activation=activation, negative_slope=0.2)
    x = torch.randn(5, 8)
    with torch.set_grad_enabled(needs_grad):
        targets = dynamo_graph_targets(layer, x)
        assert ("segfast.linear_act.default" in targets) == needs_grad, targets
        torch._dynamo.reset()
        out = torch.compile(layer, fullgraph=True)(x)
    expected = ACTIVATION_REFERENCES[activation](F.linear(x, layer.weight, layer.bias), 0.2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: segfast.ops.linear_act(torch.randn(2, 3), torch.randn(4, 5)), ValueError, "input has 3 features"),
        (lambda: segfast.ops.linear_act(torch.randn(2, 3), torch.randn(4, 3, 1)), ValueError, "weight must be 2-D"),
        (
            lambda: segfast.ops.linear_act(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)),
            ValueError,
            "bias must have shape",
        ),
        (
            lambda: segfast.ops.linear_act(torch.randn(2, 3), torch.randn(4, 3).double()),
            TypeError,
            "weight dtype torch.float64 differs",
        ),
        (lambda: segfast.ops.linear_act(torch.tensor(1.0), torch.randn(4, 1)), ValueError, "at least one dimension"),
        (
            lambda: segfast.ops.linear_act(torch.randn(2, 3), torch.randn(4, 3), activation="tanh"),
            ValueError,
            "activation must be one of",
        ),
        (lambda: segfast.ops.linear_act(torch.randn(2, 3).half(), torch.randn(4, 3).half()), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("silu", 0.0)])
def test_twin_linear_act(accelerator, dtype, activation, slope):
    x = seeded_randn(700, 40, dtype=dtype)  # rows over several row blocks of the columns kernel
    weight, bias = seeded_randn(50, 40, dtype=dtype, seed=2), seeded_randn(50, dtype=dtype, seed=3)
    assert_fused_act_same_as_twin(accelerator, "linear_act", x, weight, bias, (), activation, slope)
