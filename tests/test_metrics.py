"""confusion_matrix (fused argmax + bincount) and the metrics built on it."""

import pytest
import torch
from conftest import (
    LAYOUTS,
    CapturedCall,
    as_pixel_targets,
    as_pixels,
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    seeded_classes,
    seeded_randn,
    skip_on_simulation,
)

import segfast
from segfast.metrics import SegmentationMetrics


def _reference(pred, target, classes, ignore_index):
    keep = target != ignore_index
    return torch.bincount(target[keep].long() * classes + pred[keep].long(), minlength=classes * classes).view(
        classes, classes
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("classes", [6, 70])  # on CUDA: counters in shared memory; in the result
def test_matches_argmax_and_bincount(device, dtype, layout, target_dtype, classes):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, classes, 17, 13, generator=g).to(dtype).to(device.device, memory_format=layout)
    logits[0, :, 0, 0] = 1.0  # ties: the first maximum wins
    logits[1, 3, 2, 2] = float("nan")  # NaN: the first NaN wins, as torch.argmax
    target = torch.randint(0, classes if target_dtype != torch.uint8 else 6, (3, 17, 13), generator=g).to(device.device)
    target[:, ::4] = 255
    ours = segfast.ops.confusion_matrix(logits, target.to(target_dtype), ignore_index=255)
    expected = _reference(logits.argmax(1), target, classes, 255)
    assert torch.equal(ours, expected)
    assert torch.equal(segfast.ops.confusion_matrix(logits.argmax(1), target.to(target_dtype), classes, 255), expected)


def test_bad_input_raises_clear_errors(device):
    logits = torch.randn(2, 3, 4, device=device.device)
    with pytest.raises(IndexError, match="target class 3 at"):
        segfast.ops.confusion_matrix(logits, torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]], device=device.device))
    with pytest.raises(IndexError, match="predicted class 7"):
        segfast.ops.confusion_matrix(
            torch.full((1, 2), 7, device=device.device), torch.zeros(1, 2, dtype=torch.long, device=device.device), 3
        )
    if device.name == "cuda":
        torch.cuda.synchronize()  # no device-side assert ended the context
    logits = logits.cpu()
    with pytest.raises(IndexError, match="target class 3 at"):
        segfast.ops.confusion_matrix(logits, torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="target must have shape"):
        segfast.ops.confusion_matrix(logits, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes is required"):
        segfast.ops.confusion_matrix(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(IndexError, match="predicted class 7"):
        segfast.ops.confusion_matrix(torch.full((1, 2), 7), torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="target dtype"):
        segfast.ops.confusion_matrix(logits, torch.zeros(2, 4))


def test_metrics_figures():
    metrics = SegmentationMetrics(3, ignore_index=9)
    target = torch.tensor([[0, 0, 1, 1, 9, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]])
    metrics.update(pred, target)
    out = metrics.compute()
    # class 0: tp 1 fp 1 fn 1 -> 1/3; class 1: tp 2 fp 1 fn 0 -> 2/3; class 2: tp 0 fp 0 fn 1 -> 0
    assert out["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert out["miou"] == pytest.approx(1 / 3)
    assert out["dice"] == pytest.approx([0.5, 0.8, 0.0])
    assert out["pixel_accuracy"] == pytest.approx(3 / 5) and out["pixels"] == 5


def test_absent_class_is_nan_and_left_out_of_the_mean():
    metrics = SegmentationMetrics(3)
    metrics.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    out = metrics.compute()
    assert out["miou"] == 1.0 and out["iou"][2] != out["iou"][2]


def test_opcheck_and_compile(device):
    logits, target = torch.randn(2, 4, 10, device=device.device), torch.randint(0, 4, (2, 10), device=device.device)
    torch.library.opcheck(torch.ops.segfast.confusion_matrix.default, (logits, target, 4, -100))
    skip_on_simulation(device)
    compiled = torch.compile(lambda x, t: segfast.ops.confusion_matrix(x, t), fullgraph=True)
    assert torch.equal(compiled(logits, target), segfast.ops.confusion_matrix(logits, target))


def test_bad_class_index_inside_a_cuda_graph_marks_the_matrix(device):
    """Inside a capture the bad-index flag cannot be read (issue 15, defect 5): a bad index fills
    the matrix with -1 instead of raising; good input counts as outside a capture."""
    if device.name == "cpu":
        pytest.skip("CUDA graphs capture CUDA kernels")
    logits = torch.randn(2, 3, 400, device=device.device)
    good = torch.randint(0, 3, (2, 400), device=device.device)
    bad = good.clone()
    bad[1, 149] = 3
    call = CapturedCall(device, lambda x, t: segfast.ops.confusion_matrix(x, t), logits, good)
    assert torch.equal(call.run(logits, good), segfast.ops.confusion_matrix(logits, good))
    assert (call.run(logits, bad) == -1).all()


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    x = torch.randn(2, 4, 8, device="cuda")
    t = torch.randint(0, 4, (2, 8))
    cases = [lambda: torch.ops.segfast.confusion_matrix(x, t, 4, -100)]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("layout", LAYOUTS, ids=dtype_id)
@pytest.mark.parametrize("classes", [3, 30, 64, 70])  # 8, 4 and 1 copies a block in shared memory; global
def test_twin_confusion_matrix_from_logits(accelerator, layout, classes):
    x = seeded_randn(2, classes, 30, 31, layout=layout)  # 1860 pixels: the simulation's 4 blocks stride
    target = seeded_classes((2, 30, 31), classes, ignore_index=255, ignored=0.1, dtype=torch.uint8)
    assert_same_as_twin(*accelerator.both("confusion_matrix", as_pixels(x), as_pixel_targets(target), classes, 255))


def test_twin_confusion_matrix_from_predicted_classes(accelerator):
    pred = seeded_classes((3, 40, 41), 6, seed=7)
    target = seeded_classes((3, 40, 41), 6, ignore_index=-1, ignored=0.1)
    assert_same_as_twin(*accelerator.both("confusion_matrix", as_pixel_targets(pred), as_pixel_targets(target), 6, -1))


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_binary_and_multilabel_metrics_count_each_class(mode):
    g = torch.Generator().manual_seed(0)
    classes = 1 if mode == "binary" else 3
    logits = torch.randn(4, classes, 9, 11, generator=g)
    target = torch.randint(0, 2, (4, classes, 9, 11), generator=g)
    target[:, :, ::4] = 255
    metrics = SegmentationMetrics(classes, ignore_index=255, mode=mode, threshold=0.3)
    metrics.update(logits[:2], target[:2].squeeze(1) if mode == "binary" else target[:2])
    metrics.update(logits[2:].sigmoid(), target[2:])  # probabilities: the same threshold, no second sigmoid
    out = metrics.compute()
    predicted, counted = logits.sigmoid() > 0.3, target != 255
    for c in range(classes):
        p, t, k = predicted[:, c], target[:, c] == 1, counted[:, c]
        tp, fp, fn = (p & t & k).sum().item(), (p & ~t & k).sum().item(), (~p & t & k).sum().item()
        assert out["iou"][c] == pytest.approx(tp / (tp + fp + fn))
        assert out["dice"][c] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["pixels"] == counted.sum().item()
    assert out["pixel_accuracy"] == pytest.approx(((predicted == (target == 1)) & counted).sum().item() / out["pixels"])
    with pytest.raises(ValueError, match="targets must be 0, 1 or ignore_index"):
        metrics.update(logits, torch.full_like(target, 2))
