"""segfast.convert: the converted model computes what the original did, and says what it changed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import segfast
from segfast.models import SimpleCNN


def _same_outputs_and_grads(original, converted, x):
    torch.manual_seed(0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = original(a), converted(b)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_a)
    torch.testing.assert_close(
        torch.autograd.grad(out_b, b, grad)[0], torch.autograd.grad(out_a, a, grad)[0], rtol=1e-5, atol=1e-6
    )
    params_a, params_b = dict(original.named_parameters()), dict(converted.named_parameters())
    assert params_a.keys() == params_b.keys()


def _sequential_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.LeakyReLU(0.2),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 1),
        nn.GELU(approximate="tanh"),  # approximate gelu: not fused
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.SiLU(),  # reflect padding: not fused
        nn.Conv2d(8, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),  # BatchNorm in between: not fused
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.Sigmoid(),
        nn.Linear(16, 5),
    )


def test_sequential_pairs_pools_and_report():
    model = _sequential_net().eval()
    converted, report = segfast.convert(model)
    assert not report.traced and type(converted) is nn.Sequential
    kinds = [type(m).__name__ for m in converted]
    assert kinds[:5] == ["Conv2dAct", "Identity", "Conv2dAct", "Identity", "MaxPool2d"]
    assert isinstance(converted[4], segfast.nn.MaxPool2d) and isinstance(converted[12], segfast.nn.AvgPool2d)
    assert isinstance(converted[14], segfast.nn.LinearAct) and converted[14].activation == "sigmoid"
    assert converted[2].negative_slope == 0.2
    kept = "\n".join(report.kept)
    for name in ("5: Conv2d", "7: Conv2d: padding_mode='reflect'", "9: Conv2d", "16: Linear"):
        assert name in kept
    assert converted.state_dict().keys() == model.state_dict().keys()
    assert type(model[0]) is nn.Conv2d  # not in place by default
    _same_outputs_and_grads(model, converted, torch.randn(2, 3, 16, 16))
    assert "converted" in str(report)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.skip = nn.Conv2d(6, 6, 1)
        self.shared = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.relu(self.conv(x))
        y = self.skip(x)  # used twice: by relu and by the sum, so not fused
        x = torch.relu(y) + y
        x = self.act(self.shared(x)) + self.shared(x)  # called twice: not fused
        return F.leaky_relu(self.fc(x.mean((2, 3))), 0.3)


def test_fx_pass_fuses_pairs_outside_sequentials():
    model = FunctionalNet()
    converted, report = segfast.convert(model)
    assert report.traced and isinstance(converted, fx.GraphModule)
    assert isinstance(converted.conv, segfast.nn.Conv2dAct) and converted.conv.activation == "relu"
    assert isinstance(converted.fc, segfast.nn.LinearAct) and converted.fc.negative_slope == 0.3
    assert type(converted.skip) is nn.Conv2d and type(converted.shared) is nn.Conv2d
    _same_outputs_and_grads(model, converted, torch.randn(2, 3, 9, 9))
    converted.load_state_dict(model.state_dict())  # same keys both ways


def test_simple_cnn_torch_backend_converts_to_the_segfast_layers():
    torch.manual_seed(0)
    model = SimpleCNN(backend="torch")
    converted, report = segfast.convert(model)
    fused = {
        name for name, m in converted.named_modules() if isinstance(m, (segfast.nn.Conv2dAct, segfast.nn.LinearAct))
    }
    assert fused == {"conv1", "conv2", "fc1"}
    assert isinstance(converted.pool, segfast.nn.MaxPool2d)
    assert any(entry.startswith("fc2: Linear") for entry in report.kept)
    _same_outputs_and_grads(model, converted, torch.randn(4, 1, 28, 28))
    # and the stock model's weights run in segfast's own SimpleCNN
    native = SimpleCNN(backend="segfast")
    native.load_state_dict(converted.state_dict())
    torch.testing.assert_close(native(torch.ones(1, 1, 28, 28)), model(torch.ones(1, 1, 28, 28)))


def test_untraceable_model_keeps_its_sequential_fusions():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
            self.head = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            x = self.body(x)
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = F.relu(self.head(x))
            return x

    model = Branchy()
    converted, report = segfast.convert(model)
    assert not report.traced and isinstance(converted.body[0], segfast.nn.Conv2dAct)
    assert any("not traceable" in entry for entry in report.kept)
    _same_outputs_and_grads(model, converted, torch.randn(1, 1, 6, 6))


def test_loss_and_inplace():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
            self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=1, label_smoothing=0.1)

        def forward(self, x, target):
            return self.loss(self.features(x), target)

    model = WithLoss()
    converted, report = segfast.convert(model, inplace=True, fx_trace=False)
    assert converted is model and isinstance(model.loss, segfast.nn.CrossEntropyLoss)
    assert model.loss.ignore_index == 1 and model.loss.label_smoothing == 0.1
    x, target = torch.randn(2, 1, 5, 5), torch.randint(0, 3, (2, 5, 5))
    reference = F.cross_entropy(
        F.relu(F.conv2d(x, model.features[0].weight, model.features[0].bias, padding=1)),
        target,
        weight=torch.tensor([1.0, 2.0, 0.5]),
        ignore_index=1,
        label_smoothing=0.1,
    )
    torch.testing.assert_close(model(x, target), reference)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        segfast.convert(lambda x: x)


@pytest.mark.parametrize("factory", ["fcn_resnet50", "maskrcnn_resnet50_fpn"])
def test_torchvision_models_when_installed(factory):
    models = pytest.importorskip(
        "torchvision.models.segmentation" if factory.startswith("fcn") else "torchvision.models.detection"
    )
    torch.manual_seed(0)
    model = getattr(models, factory)(weights=None, weights_backbone=None).eval()
    if factory.startswith("mask"):
        model = model.roi_heads.mask_head  # the mask head: Conv2d + ReLU pairs in a Sequential
        x = torch.randn(2, 256, 14, 14)
    else:
        x = torch.randn(1, 3, 64, 64)
    converted, report = segfast.convert(model)
    assert report.converted
    with torch.no_grad():
        expected, got = model(x), converted(x)
    if isinstance(expected, dict):
        expected, got = expected["out"], got["out"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class ConvBatchNormReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.block(torch.relu(self.bn(self.conv(x))))


def test_report_names_the_batchnorm_between_a_convolution_and_its_activation():
    _, report = segfast.convert(ConvBatchNormReLU())
    kept = "\n".join(report.kept)
    assert "conv: Conv2d: its output goes to BatchNorm2d (bn)" in kept  # found by the fx pass
    assert "block.0: Conv2d: its output goes to BatchNormAct2d (block.1)" in kept  # fused in its Sequential
    assert "fold_batchnorm" in kept


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (conv-bn-relu, conv-bn, += identity, relu)."""

    def __init__(self, channels, downsample=False):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = (
            nn.Sequential(nn.Conv2d(channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
            if downsample
            else None
        )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(8)
        self.layer2 = BasicBlock(8, downsample=True)

    def forward(self, x):
        return self.layer2(self.layer1(self.stem(x)))


def _bn_state(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_activation_and_residual_blocks_are_fused(training):
    torch.manual_seed(0)
    model = _bn_state(TinyResNet()).double().train(training)
    converted, report = segfast.convert(model)
    fused = [n for n, m in converted.named_modules() if isinstance(m, segfast.nn.BatchNormAct2d)]
    # stem (Sequential), bn1 of both blocks, and bn2 + residual + relu of both blocks (fx)
    assert sorted(fused) == ["layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "stem.1"], report
    assert "layer2.downsample.1: BatchNorm2d: no activation" in "\n".join(report.kept)
    assert converted.state_dict().keys() == model.state_dict().keys()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(converted(x), reference(x))
    grads = torch.autograd.grad(converted(x).square().sum(), [x, *converted.parameters()])
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *reference.parameters()])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    for (name, ours), theirs in zip(converted.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)  # running statistics updated alike


@pytest.mark.parametrize("architecture", ["Unet", "FPN"])
def test_smp_models_when_installed(architecture):
    """segmentation_models_pytorch's U-Net and FPN on a ResNet-18 encoder: outputs and gradients
    equal the original's in training mode (float64). FPN's forward does not trace with torch.fx:
    its submodules (the encoder, the decoder's blocks) are converted one by one and still answer
    as the originals (FPN reads encoder.output_stride); a deep copy keeps that."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = getattr(smp, architecture)("resnet18", encoder_weights=None, classes=5).double().train()
    for m in model.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0  # equal outputs need the same (no) dropout mask
    converted, report = segfast.convert(model)
    fused = [line for line in report.converted if "BatchNormAct2d" in line]
    assert len(fused) >= 17 and any("residual" in line for line in fused), report
    if architecture == "FPN":
        assert any("(whole model): not traceable" in line and "one by one" in line for line in report.kept)
        assert converted.encoder.output_stride == model.encoder.output_stride
        converted = copy.deepcopy(converted)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected, got = model(x), converted(x)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    grads = {name: p.grad for name, p in converted.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
