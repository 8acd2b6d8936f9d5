"""segfast.explain: Grad-CAM against its definition written out, the maps' ranges, the overlays;
segfast.metrics.CalibrationError against a per-pixel loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from segfast.explain import decoder_block, explain, grad_cam, overlay
from segfast.metrics import CalibrationError
from segfast.models import FCN, UNet


def _tiny_unet(backend="segfast"):
    torch.manual_seed(0)
    return UNet(1, 4, base_width=4, depth=2, norm="batch", backend=backend).eval()


@pytest.mark.parametrize("backend", ["segfast", "torch"])
def test_grad_cam_is_its_definition(backend):
    model, image = _tiny_unet(backend), torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    layer = decoder_block(model)
    assert layer is model.up[-1]
    ours = grad_cam(model, layer, image, 2)
    # written out: activations and gradient of the region's summed class-2 logits
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(a=o))
    logits = model(image)
    handle.remove()
    region = logits.argmax(1, keepdim=True) == 2
    region = region if region.any() else torch.ones_like(region)
    (grad,) = torch.autograd.grad((logits[:, 2:3] * region).sum(), store["a"])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[0, 0].detach()
    expected = cam / cam.max() if cam.max() > 0 else cam
    assert ours.shape == (16, 16) and torch.allclose(ours, expected, atol=1e-6)
    assert 0 <= ours.min() and ours.max() <= 1


def test_explain_maps_and_overlay():
    model, image = _tiny_unet(), torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(2))
    maps = explain(model, image)
    logits = model(image[None]).detach()
    p = logits.softmax(1)[0]
    assert torch.equal(maps.mask, logits.argmax(1)[0])
    assert torch.allclose(maps.confidence, p.amax(0), atol=1e-6)
    assert torch.allclose(maps.entropy, torch.special.entr(p).sum(0) / math.log(4), atol=1e-6)
    counts = torch.bincount(maps.mask.flatten(), minlength=4)
    if counts[1:].any():
        assert maps.saliency_class == int(counts[1:].argmax()) + 1
    assert explain(model, image, class_index=3).saliency_class == 3
    with pytest.raises(ValueError, match="class 4 is not in"):
        explain(model, image, class_index=4)
    with pytest.raises(ValueError, match="no decoder block known"):
        decoder_block(torch.nn.Conv2d(1, 1, 1))
    fcn = FCN(3, 5, base_width=4).eval()
    assert decoder_block(fcn) is fcn.fc7 and explain(fcn, torch.rand(3, 32, 32)).saliency.shape == (32, 32)
    picture = overlay(image, maps.entropy)
    assert picture.shape == (16, 16, 3) and picture.dtype == torch.uint8
    cold, hot = overlay(torch.zeros(1, 1, 1), torch.zeros(1, 1)), overlay(torch.zeros(1, 1, 1), torch.ones(1, 1))
    assert cold[0, 0, 2] > cold[0, 0, 0] and hot[0, 0, 0] > hot[0, 0, 2]  # blue for 0, yellow-red for 1


def test_calibration_error_against_a_pixel_loop():
    g = torch.Generator().manual_seed(0)
    logits, target = 2 * torch.randn(3, 5, 9, 7, generator=g), torch.randint(0, 5, (3, 9, 7), generator=g)
    target[0, :2] = 255
    metric = CalibrationError(bins=10, ignore_index=255)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    p = logits.double().softmax(1)
    confidence, prediction = p.amax(1), p.argmax(1)
    bins = [[0, 0.0, 0.0] for _ in range(10)]
    for conf, pred, t in zip(confidence.flatten().tolist(), prediction.flatten().tolist(), target.flatten().tolist()):
        if t == 255:
            continue
        b = min(max(math.ceil(conf * 10) - 1, 0), 9)  # (b/10, (b+1)/10]
        bins[b][0] += 1
        bins[b][1] += conf
        bins[b][2] += pred == t
    total = sum(b[0] for b in bins)
    expected = sum(abs(b[2] - b[1]) for b in bins) / total
    assert metric.compute() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(CalibrationError().compute())
    with pytest.raises(ValueError, match="target must have shape"):
        metric.update(logits, target[:, :3])
    with pytest.raises(ValueError, match="bins must be a positive int"):
        CalibrationError(bins=0)
