"""fold_batchnorm and torch.export of segfast models."""

import pytest
import torch
from torch import nn

import segfast
from segfast.models import FCN, UNet


def _randomise_batchnorm(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: UNet(3, 5, base_width=8, depth=2),
        lambda: UNet(3, 5, base_width=8, depth=2, backend="torch", activation="silu"),
        lambda: FCN(3, 5, "16s", base_width=4, norm="batch"),
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.LeakyReLU(0.2),
            nn.Conv2d(6, 6, 3, bias=False),
            nn.BatchNorm2d(6),
            nn.MaxPool2d(2),
        ),
    ],
)
def test_folded_model_equals_the_original_in_eval(make):
    torch.manual_seed(0)
    model = _randomise_batchnorm(make())
    folded = segfast.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, segfast.nn.Conv2dAct) and m.activation != "none" for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy by default
    x = torch.randn(2, 3, 37, 35)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_refuses_training_mode():
    with pytest.raises(ValueError, match="training mode"):
        segfast.fold_batchnorm(UNet(1, 2, base_width=4, depth=1))


def test_folded_unet_exports_and_matches_eager():
    model = segfast.fold_batchnorm(_randomise_batchnorm(UNet(1, 11, base_width=8, depth=2)))
    x = torch.randn(2, 1, 32, 32)
    for grad_mode in (True, False):  # torch.compile's inference path does not apply to export
        with torch.set_grad_enabled(grad_mode):
            program = torch.export.export(model, (x,))
        assert any("segfast.conv2d_act" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


def test_export_command_and_predict_from_the_program(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    from segfast.__main__ import main
    from segfast.data import DigitsSegmentation

    checkpoint, program = tmp_path / "unet.pt", tmp_path / "unet.pt2"
    assert (
        main(
            [
                *"train --model unet --epochs 1 --max-steps 2 --batch-size 2".split(),
                *"--base-width 4 --depth 2 --quiet --out".split(),
                str(checkpoint),
            ]
        )
        == 0
    )
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(program)]) == 0
    difference = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert difference < 1e-4
    image = tmp_path / "digit.png"
    Image.fromarray((DigitsSegmentation("test", count=1).tensors[0][0, 0] * 255).byte().numpy()).save(image)
    masks = []
    for source in (checkpoint, program):
        out = tmp_path / f"{source.suffix[1:]}.png"
        assert main(["predict", "--checkpoint", str(source), "--image", str(image), "--out", str(out)]) == 0
        with Image.open(out) as written:
            masks.append(torch.tensor(list(written.getdata())))
    assert torch.equal(masks[0], masks[1])
