"""confusion_matrix (fused argmax + bincount) and the metrics built on it."""

import pytest
import torch

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
def test_matches_argmax_and_bincount(dtype, layout, target_dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 17, 13, generator=g).to(dtype).to(memory_format=layout)
    logits[0, :, 0, 0] = 1.0  # ties: the first maximum wins
    logits[1, 3, 2, 2] = float("nan")  # NaN: the first NaN wins, as torch.argmax
    target = torch.randint(0, 6, (3, 17, 13), generator=g)
    target[:, ::4] = 255
    ours = segfast.ops.confusion_matrix(logits, target.to(target_dtype), ignore_index=255)
    expected = _reference(logits.argmax(1), target, 6, 255)
    assert torch.equal(ours, expected)
    assert torch.equal(segfast.ops.confusion_matrix(logits.argmax(1), target.to(target_dtype), 6, 255), expected)


def test_bad_input_raises_clear_errors():
    logits = torch.randn(2, 3, 4)
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


def test_opcheck_and_compile():
    logits, target = torch.randn(2, 4, 10), torch.randint(0, 4, (2, 10))
    torch.library.opcheck(torch.ops.segfast.confusion_matrix.default, (logits, target, 4, -100))
    compiled = torch.compile(lambda x, t: segfast.ops.confusion_matrix(x, t), fullgraph=True)
    assert torch.equal(compiled(logits, target), segfast.ops.confusion_matrix(logits, target))
