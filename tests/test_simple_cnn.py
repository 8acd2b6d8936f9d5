import pytest
import torch

import segfast
from segfast.__main__ import main
from segfast.data import DigitsClassification
from segfast.models import SimpleCNN


def test_backends_share_parameters_and_agree():
    ours, stock = SimpleCNN(), SimpleCNN(backend="torch")
    assert set(ours.state_dict()) == set(stock.state_dict())
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(
        torch.autograd.grad(ours(x).logsumexp(1).sum(), list(ours.parameters())),
        torch.autograd.grad(stock(x).logsumexp(1).sum(), list(stock.parameters())),
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_segfast_backend_runs_on_segfast_ops():
    model = SimpleCNN()
    assert isinstance(model.conv1, segfast.nn.Conv2dAct) and isinstance(model.fc1, segfast.nn.LinearAct)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert SimpleCNN(in_channels=3, num_classes=4, image_size=16)(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_digits_split_is_deterministic_and_disjoint():
    train, test = DigitsClassification("train"), DigitsClassification("test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label.dtype == torch.int64
    assert torch.equal(DigitsClassification("test").tensors[0], test.tensors[0])
    train_rows = {tuple(t.flatten().tolist()) for t in train.tensors[0][:200]}
    assert not train_rows & {tuple(t.flatten().tolist()) for t in test.tensors[0]}


def test_train_and_eval_commands(tmp_path, capsys):
    checkpoint = tmp_path / "cnn.pt"
    assert (
        main([*"train --task classify --model simple-cnn --data digits --epochs 4 --out".split(), str(checkpoint)]) == 0
    )
    trained = torch.load(checkpoint, weights_only=True)
    assert trained["test_accuracy"] > 0.9  # 4 epochs; the default 30 reach ~98%
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--backend", "torch"]) == 0
    assert f"test accuracy {100 * trained['test_accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: SimpleCNN(backend="jax"), "backend must be one of"),
        (lambda: SimpleCNN(image_size=8), "image_size must be at least 10"),
        (lambda: DigitsClassification("validation"), "split must be one of"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
