"""U-Net / FCN, the digits and folder data sets, and the segmentation workflow of the CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segfast
from segfast.__main__ import main
from segfast.data import DigitsSegmentation, FolderDataset
from segfast.models import FCN, UNet

TINY = ["--base-width", "4", "--depth", "2", "--quiet"]


@pytest.mark.parametrize(
    "make",
    [
        lambda backend: UNet(3, 5, base_width=4, depth=3, backend=backend),
        lambda backend: UNet(
            3, 5, base_width=4, depth=2, norm="none", upsample="bilinear", activation="silu", backend=backend
        ),
        lambda backend: UNet(3, 5, base_width=4, depth=2, norm="inplace_abn", activation="leaky_relu", backend=backend),
        lambda backend: FCN(3, 5, "8s", base_width=4, backend=backend),
        lambda backend: FCN(3, 5, "32s", base_width=4, norm="batch", convs_per_stage=(1, 1, 1, 1, 1), backend=backend),
    ],
)
def test_backends_share_names_and_outputs(make):
    # float64: the deep BatchNorm layers of these tiny models see 2-8 values per channel, where
    # float32 gradients of both backends are far from the exact ones (ill-conditioned, not wrong)
    torch.manual_seed(0)
    ours, stock = make("segfast").double(), make("torch").double()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 37, 41, dtype=torch.float64)  # odd sizes: the models pad / interpolate to fit
    out = ours(x)
    assert out.shape == (2, 5, 37, 41)
    torch.testing.assert_close(out, stock(x), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
    for g, ref in zip(grads, torch.autograd.grad(stock(x).square().sum(), list(stock.parameters()))):
        torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "make", [lambda **kw: UNet(3, 5, base_width=4, depth=2, **kw), lambda **kw: FCN(3, 5, base_width=4, **kw)]
)
def test_layout_channels_last_inside_nchw_outside(make):
    # segfast's models run in channels_last by default (an NCHW batch in, NCHW logits out); the
    # torch backend keeps the caller's layout unless asked
    x = torch.randn(2, 3, 32, 32)
    for kwargs, inside in (
        ({}, True),
        ({"channels_last": False}, False),
        ({"backend": "torch"}, False),
        ({"backend": "torch", "channels_last": True}, True),
    ):
        model = make(**kwargs)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == inside, kwargs
        out = model(x)
        assert out.shape == (2, 5, 32, 32) and out.is_contiguous(), kwargs


def test_model_argument_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(1, 2, norm="group")
    with pytest.raises(ValueError, match="smaller than 2\\*\\*depth"):
        UNet(1, 2, depth=4)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="inplace_abn.*needs 'leaky_relu'"):
        UNet(1, 2, norm="inplace_abn")
    with pytest.raises(ValueError, match="variant must be one of"):
        FCN(1, 2, "4s")


def test_convergence_parity_between_backends():
    """Liger-style: the same seed, data and optimizer give the same loss curve on both backends."""
    data = DigitsSegmentation("train", count=64, size=32)
    curves, initial = {}, None
    for backend in ("torch", "segfast"):
        torch.manual_seed(0)
        model = UNet(1, 11, base_width=8, depth=2, backend=backend)
        if initial is None:
            initial = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(initial)
        loss_fn = segfast.nn.CrossEntropyLoss() if backend == "segfast" else torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        curve = []
        for step in range(24):
            images, masks = data.tensors[0][step % 8 * 8 :][:8], data.tensors[1][step % 8 * 8 :][:8]
            optimizer.zero_grad()
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[backend] = torch.tensor(curve)
    assert curves["segfast"][-1] < curves["segfast"][0]
    torch.testing.assert_close(curves["segfast"], curves["torch"], rtol=2e-3, atol=2e-4)


def test_digits_segmentation_is_deterministic_and_labelled():
    a, b = DigitsSegmentation("val", count=20), DigitsSegmentation("val", count=20)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    image, mask = a[0]
    assert image.shape == (1, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    masks = a.tensors[1]
    assert masks.min() == 0 and masks.max() <= 10 and (masks > 0).any()
    # strokes are labelled where the image has ink, background where it has none
    assert (a.tensors[0][:, 0][masks > 0] > 0.35).all()
    assert not torch.equal(DigitsSegmentation("test", count=20).tensors[0], a.tensors[0])
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsSegmentation("dev")


def _write_folder(root, masks):
    Image = pytest.importorskip("PIL.Image")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    for i, mask in enumerate(masks):
        Image.fromarray((torch.rand(*mask.shape) * 255).byte().numpy(), mode="L").save(root / "img" / f"{i}.png")
        Image.fromarray(mask.byte().numpy(), mode="L").save(root / "mask" / f"{i}.png")
    return root / "img", root / "mask"


def test_folder_dataset_and_its_errors(tmp_path):
    images, masks = _write_folder(tmp_path, [torch.randint(0, 3, (9, 7)), torch.full((9, 7), 255)])
    data = FolderDataset(images, masks, num_classes=3)
    image, mask = data[0]
    assert image.shape == (1, 9, 7) and mask.shape == (9, 7) and mask.max() < 3
    assert (data[1][1] == 255).all()  # ignore_index is allowed
    decoded, _ = FolderDataset(images, masks, num_classes=3, decoded=True)[0]
    assert decoded.dtype == torch.uint8 and decoded.shape == (9, 7, 1)
    assert torch.equal(decoded.permute(2, 0, 1).float() / 255, image)
    with pytest.raises(ValueError, match="holds value 255"):
        FolderDataset(images, masks, num_classes=3, ignore_index=-1)[1]
    (images / "2.png").write_bytes((images / "0.png").read_bytes())
    with pytest.raises(ValueError, match="no mask <stem>.png .* e.g. 2.png"):
        FolderDataset(images, masks, num_classes=3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        FolderDataset(tmp_path / "nowhere", masks, num_classes=3)


def test_train_on_a_folder_augments_its_bytes(tmp_path, capsys):
    """--augment on a folder: images go through the DataLoader as uint8 HWC, augmented into floats."""
    images, masks = _write_folder(tmp_path, [torch.randint(0, 3, (24, 24)) for _ in range(6)])
    checkpoint = tmp_path / "folder.pt"
    args = [
        *"train --model unet --data folder --num-classes 3 --in-channels 1 --epochs 1 --batch-size 2".split(),
        *"--base-width 4 --depth 2 --augment rotate=20,flip=0.5,crop=16,brightness=0.1,contrast=0.1".split(),
        "--images-dir",
        str(images),
        "--masks-dir",
        str(masks),
        "--out",
        str(checkpoint),
        "--quiet",
    ]
    assert main(args) == 0
    assert "augment rotate=20" in capsys.readouterr().out
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("loss", ["bce", "dice", "focal", "dice-bce"])
def test_binary_segmentation_end_to_end(tmp_path, capsys, loss):
    """--num-classes 1: one sigmoid channel, a binary loss, binary metrics, 0 / 1 masks out."""
    checkpoint = tmp_path / "binary.pt"
    args = [*"train --model unet --data digits --num-classes 1 --epochs 1 --max-steps 3 --batch-size 4".split()]
    assert main([*args, "--loss", loss, "--out", str(checkpoint)] + TINY) == 0
    assert torch.load(checkpoint, weights_only=True)["config"]["num_classes"] == 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "ECE" in out and "      0  " in out and "      1  " not in out
    if loss != "bce":
        return
    Image = pytest.importorskip("PIL.Image")
    image_path, mask_path = tmp_path / "digit.png", tmp_path / "mask.png"
    Image.fromarray((DigitsSegmentation("test", count=1).tensors[0][0, 0] * 255).byte().numpy()).save(image_path)
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(image_path), "--out", str(mask_path)]
    assert main([*argv, "--explain"]) == 0
    with Image.open(mask_path) as written:
        assert set(np.unique(np.array(written)).tolist()) <= {0, 1}
    assert (tmp_path / "mask_saliency.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-classes", "1", "--loss", "ce"], "with one class .binary. use one of bce, dice, focal, dice-bce"),
        (["--loss", "dice-bce"], r"--loss dice-bce is for binary segmentation \(--num-classes 1\)"),
        (["--num-classes", "5"], "--data digits has 11 classes, or 1 .binary.; got 5"),
    ],
)
def test_binary_options_are_checked(tmp_path, capsys, extra, message):
    args = [*"train --model unet --data digits --epochs 1 --max-steps 1 --batch-size 2 --out".split()]
    assert main([*args, str(tmp_path / "x.pt"), *extra] + TINY) == 2
    assert re.search(message, capsys.readouterr().err)


def test_train_eval_predict_resume(tmp_path, capsys):
    checkpoint = tmp_path / "unet.pt"
    args = [*"train --model unet --epochs 1 --max-steps 3 --batch-size 4 --out".split(), str(checkpoint)] + TINY
    assert main(args) == 0
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and 0 <= saved["val"]["miou"] <= 1
    assert main(args[:3] + ["--epochs", "2"] + args[5:] + ["--resume", str(checkpoint)]) == 0
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "pixel accuracy" in out and "class  IoU     Dice" in out and "ECE 0." in out
    Image = pytest.importorskip("PIL.Image")
    image_path, mask_path = tmp_path / "digit.png", tmp_path / "mask.png"
    Image.fromarray((DigitsSegmentation("test", count=1).tensors[0][0, 0] * 255).byte().numpy()).save(image_path)
    assert main(["predict", "--checkpoint", str(checkpoint), "--image", str(image_path), "--out", str(mask_path)]) == 0
    with Image.open(mask_path) as written:
        assert written.mode == "P" and written.size == (64, 64)
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(image_path), "--out", str(mask_path)]
    assert main([*argv, "--explain", "--explain-class", "3"]) == 0
    assert "Grad-CAM of class 3" in capsys.readouterr().out
    for name in ("confidence", "entropy", "saliency"):
        with Image.open(tmp_path / f"mask_{name}.png") as written:
            assert written.mode == "RGB" and written.size == (64, 64)
    # the README's pictures come from these scripts
    examples = Path(__file__).resolve().parent.parent / "examples"
    for script, extra in (("explain_picture.py", ["--checkpoint", str(checkpoint)]), ("augment_picture.py", [])):
        picture = tmp_path / script.replace(".py", ".png")
        run = [sys.executable, str(examples / script), "--out", str(picture), "--samples", "2", *extra]
        subprocess.run(run, check=True, capture_output=True)
        with Image.open(picture) as written:
            assert written.mode == "RGB" and written.size[1] == 3 * (2 * 64 + 4)


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    checkpoint = tmp_path / "unet.pt"
    assert (
        main([*"train --model unet --epochs 1 --max-steps 1 --batch-size 2 --out".split(), str(checkpoint)] + TINY) == 0
    )
    capsys.readouterr()
    resumed_wider = [
        *"train --model unet --epochs 2 --max-steps 1 --batch-size 2 --base-width 8 --depth 2 --quiet --resume".split(),
        str(checkpoint),
    ]
    assert main(resumed_wider) == 2
    assert "is for another model or run (base_width=4;" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                "folder",
                "--images-dir",
                str(tmp_path / "x"),
                "--masks-dir",
                str(tmp_path),
                "--num-classes",
                "3",
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert "is not a directory" in capsys.readouterr().err


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) reaches the weights one process reaches on the same
    global batches (norm none: BatchNorm statistics are per process under DDP on CPU)."""
    common = (
        "-m segfast train --model unet --norm none --epochs 1 --max-steps 3 --batch-size 8 --optimizer sgd "
        "--lr 0.05 --schedule none --no-shuffle --base-width 4 --depth 2 --quiet"
    ).split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, *common, "--out", str(one)], check=True, env=env, capture_output=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *common,
            "--out",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert a["val"]["miou"] == pytest.approx(b["val"]["miou"], abs=1e-6)


def test_train_flags_amp_channels_last_sgd_poly(tmp_path):
    checkpoint = tmp_path / "fcn.pt"
    assert (
        main(
            [
                *"train --model fcn8s --epochs 1 --max-steps 2 --batch-size 2 --optimizer sgd --nesterov".split(),
                *"--weight-decay 1e-4 --schedule poly --amp bf16 --channels-last --class-weights".split(),
                *["1"] * 11,
                "--out",
                str(checkpoint),
            ]
            + TINY
        )
        == 0
    )
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["config"]["model"] == "fcn8s" and saved["optimizer"]["param_groups"][0]["nesterov"]


def test_train_with_augmentation(tmp_path, capsys):
    checkpoint = tmp_path / "aug.pt"
    assert (
        main(
            [
                *"train --model unet --epochs 1 --max-steps 2 --batch-size 4".split(),
                *"--augment rotate=30,flip=0.5,scale=0.7:1.4,translate=0.1,crop=40 --out".split(),
                str(checkpoint),
            ]
            + TINY
        )
        == 0
    )
    assert "augment rotate=30" in capsys.readouterr().out
    assert torch.load(checkpoint, weights_only=True)["config"]["augment"].startswith("rotate=30")
    assert main(["train", "--model", "unet", "--epochs", "1", "--augment", "spin=3", "--out", str(checkpoint)]) == 2
    assert "unknown key 'spin'" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["dice", "focal", "dice-ce"])
def test_train_with_each_loss(tmp_path, loss):
    checkpoint = tmp_path / f"{loss}.pt"
    assert (
        main(
            [
                *"train --model unet --epochs 1 --max-steps 2 --batch-size 2 --loss".split(),
                loss,
                "--out",
                str(checkpoint),
            ]
            + TINY
        )
        == 0
    )
    assert torch.load(checkpoint, weights_only=True)["config"]["loss"] == loss
