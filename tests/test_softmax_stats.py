"""softmax_stats (argmax, max probability, entropy in one read) against a float64 reference."""

import pytest
import torch
from conftest import (
    LAYOUTS,
    assert_close_to_reference,
    assert_same_as_twin,
    dtype_id,
    seeded_randn,
    skip_unless_supported,
)

import segfast


def _reference(logits):
    """(argmax, max probability, entropy) the stock way, in logits' dtype (float64: the reference)."""
    p = logits.softmax(1)
    return logits.argmax(1), p.amax(1), torch.special.entr(p).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("classes", [1, 5, 21, 70])
def test_matches_softmax_argmax_and_entropy(device, dtype, layout, classes):
    skip_unless_supported(device, dtype)
    logits = (4 * seeded_randn(3, classes, 17, 13)).to(dtype)
    logits[0, :, 0, 0] = 1.0  # a tie: the first maximum, entropy log C
    on_device = logits.to(device.device, memory_format=layout)
    argmax, max_prob, entropy = (t.cpu() for t in segfast.ops.softmax_stats(on_device))
    ref_argmax, ref_prob, ref_entropy = _reference(logits.double())
    stock_argmax, stock_prob, stock_entropy = _reference(logits.float() if dtype == torch.float16 else logits)
    assert argmax.dtype == torch.int64 and max_prob.dtype == dtype and entropy.dtype == dtype
    assert argmax.shape == max_prob.shape == entropy.shape == (3, 17, 13)
    assert torch.equal(argmax, stock_argmax)
    assert_close_to_reference(max_prob, stock_prob.to(dtype), ref_prob, "max_prob")
    assert_close_to_reference(entropy, stock_entropy.to(dtype), ref_entropy, "entropy")
    assert abs(entropy[0, 0, 0].item() - torch.log(torch.tensor(float(classes))).item()) < 2e-2


def test_infinities_and_nan_follow_torch(device):
    logits = torch.tensor(
        [
            [0.0, float("-inf"), 1.0],  # a class of probability 0: no 0 * inf in the entropy
            [float("-inf"), 2.0, float("-inf")],  # certain: probability 1, entropy 0
            [1.0, float("nan"), 3.0],  # NaN: argmax is the NaN's class, the statistics NaN
            [float("inf"), 0.0, 1.0],  # +inf: torch's softmax gives NaN
        ]
    ).t()[None]  # (1, 3 classes, 4 pixels)
    argmax, max_prob, entropy = (t.cpu() for t in segfast.ops.softmax_stats(logits.to(device.device)))
    ref_argmax, ref_prob, ref_entropy = _reference(logits.double())
    assert torch.equal(argmax, ref_argmax)
    assert torch.allclose(max_prob.double(), ref_prob, equal_nan=True, atol=1e-6)
    assert torch.allclose(entropy.double(), ref_entropy, equal_nan=True, atol=1e-6)
    assert max_prob[0, 1] == 1 and entropy[0, 1] == 0
    assert max_prob[0, 2].isnan() and entropy[0, 3].isnan()


def test_shapes_bad_input_grad_and_compile(device):
    x = seeded_randn(4, 6).to(device.device).requires_grad_()
    argmax, max_prob, entropy = segfast.ops.softmax_stats(x)  # (N, C): one pixel per sample
    assert argmax.shape == (4,) and not max_prob.requires_grad and not entropy.requires_grad
    empty = segfast.ops.softmax_stats(torch.empty(0, 3, 5, device=device.device))
    assert all(t.shape == (0, 5) for t in empty)
    with pytest.raises(ValueError, match=r"input must be \(N, C, d1, ...\) logits with C > 0"):
        segfast.ops.softmax_stats(torch.empty(2, 0, 4, device=device.device))
    with pytest.raises(TypeError, match="input dtype must be one of"):
        segfast.ops.softmax_stats(torch.zeros(2, 3, 4, dtype=torch.int64, device=device.device))
    torch.library.opcheck(torch.ops.segfast.softmax_stats.default, (seeded_randn(2, 5, 7).to(device.device),))
    if device.name != "cpu":
        return
    compiled = torch.compile(segfast.ops.softmax_stats, fullgraph=True)
    logits = seeded_randn(2, 5, 6, 7)
    for a, b in zip(compiled(logits), segfast.ops.softmax_stats(logits), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------- the CUDA kernel against its CPU twin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("classes", [3, 40])
def test_twin_softmax_stats(accelerator, dtype, classes):
    logits = (3 * seeded_randn(2, classes, 300)).to(dtype)
    logits[1, :, 5] = 0.5
    logits[0, 2, 7] = float("nan")
    assert_same_as_twin(*accelerator.both("softmax_stats", logits), "argmax, max_prob, entropy")
