"""Checkpoints of ``segfast train``: atomic writes, clear errors for bad files, and a run killed with
SIGKILL at several points and resumed that ends with the weights of the run never interrupted."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from segfast.cli import checkpoint as checkpoints
from segfast.cli.main import main

# the command of issue 19, with a small U-Net: 4 epochs of 12 steps, augmentation on
SEGMENT = (
    "train --model unet --data digits --epochs 4 --max-steps 12 --base-width 8 --depth 2 --batch-size 8 "
    "--augment rotate=20,flip=0.5 --seed 3 --quiet"
).split()
CLASSIFY = "train --task classify --epochs 2 --max-steps 9 --batch-size 16 --seed 5".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(args, env=ENV, torchrun=False) -> subprocess.Popen:
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    )
    return subprocess.Popen(
        launcher + ["-m", "segfast", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _run(args, **kwargs) -> str:
    """Runs to the end (in a subprocess: one thread, as every run here); returns its stderr."""
    process = _start(args, **kwargs)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return err


def _kill_when(process: subprocess.Popen, ready) -> None:
    """SIGKILL the process (and its children) as soon as ``ready()`` holds."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"finished before the kill point: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _assert_same_weights(a, b):
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][name]), name  # bitwise: same threads, same kernels


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The segmentation run and the classifier run, never stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _run(SEGMENT + ["--out", str(root / "unet.pt")])
    _run(CLASSIFY + ["--out", str(root / "cnn.pt")])
    return root


def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, uninterrupted):
    out = tmp_path / "unet.pt"
    args = SEGMENT + ["--out", str(out), "--save-every", "5"]
    _kill_when(_start(args), out.exists)  # the first checkpoint: step 5, inside epoch 1
    _run(args + ["--resume", str(tmp_path)])
    _assert_same_weights(uninterrupted / "unet.pt", out)
    saved = torch.load(out, weights_only=True)
    assert saved["position"]["global_step"] == 48 and saved["epoch"] == 4
    # --keep 2 newest step checkpoints and the best beside the newest one
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["unet-best.pt", "unet-step00000045.pt", "unet-step00000048.pt", "unet.pt"], names


def test_killed_mid_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "unet.pt"
    args = SEGMENT + ["--out", str(out), "--save-every", "10"]
    process = _start(args, env={**ENV, checkpoints.PAUSE_MID_WRITE_ENV: "20"})
    _kill_when(process, lambda: "half written" in (process.stderr.readline() or ""))
    assert torch.load(out, weights_only=True)["position"]["global_step"] == 12  # epoch 1's end, intact
    assert list(tmp_path.glob(".*.tmp"))  # the half-written file the kill left
    _run(args + ["--resume", str(out)])
    _assert_same_weights(uninterrupted / "unet.pt", out)
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path, uninterrupted, capsys):
    out = tmp_path / "unet.pt"
    args = SEGMENT + ["--out", str(out), "--save-every", "7", "--keep", "3"]
    _kill_when(_start(args), lambda: len(list(tmp_path.glob("unet-step*.pt"))) >= 2)
    newest = max(tmp_path.glob("unet-step*.pt"))
    cut = tmp_path / "unet-step99999999.pt"
    cut.write_bytes(newest.read_bytes()[:5000])
    assert main(args + ["--resume", str(cut)]) == 2
    err = capsys.readouterr().err
    assert f"{cut} is not a complete checkpoint: it cannot be read" in err and "cut short" in err
    shutil.copy(uninterrupted / "cnn.pt", tmp_path / "other-run.pt")  # another run's, in the same folder
    err = _run(args + ["--resume", str(tmp_path)])
    assert f"passing over {cut} is not a complete checkpoint" in err
    assert "passing over --resume " + str(tmp_path / "other-run.pt") + " is for another model or run" in err
    _assert_same_weights(uninterrupted / "unet.pt", out)


def test_foreign_and_missing_checkpoints_are_clear_errors(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert main(SEGMENT + ["--out", str(tmp_path / "u.pt"), "--resume", str(foreign)]) == 2
    assert f"{foreign} is not a segfast checkpoint: it holds no model config and weights" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(foreign)]) == 2
    assert "is not a segfast checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(SEGMENT + ["--out", str(tmp_path / "u.pt"), "--resume", str(empty)]) == 2
    assert "holds no complete segfast checkpoint (*.pt) of this run" in capsys.readouterr().err


def test_classifier_killed_and_resumed(tmp_path, uninterrupted):
    out = tmp_path / "cnn.pt"
    args = CLASSIFY + ["--out", str(out), "--save-every", "4"]
    _kill_when(_start(args), out.exists)
    _run(args + ["--resume", str(tmp_path)])
    _assert_same_weights(uninterrupted / "cnn.pt", out)
    assert torch.load(out, weights_only=True)["test_accuracy"] > 0.2  # 18 steps: above chance (0.1)


def test_two_processes_killed_and_resumed(tmp_path):
    """torchrun, 2 gloo processes: a run killed mid-epoch and resumed equals the uninterrupted 2-process run."""
    args = SEGMENT[:6] + ["2", "--max-steps", "6"] + SEGMENT[9:] + ["--save-every", "4"]
    whole, resumed = tmp_path / "whole" / "unet.pt", tmp_path / "resumed" / "unet.pt"
    _run(args + ["--out", str(whole)], torchrun=True)
    _kill_when(_start(args + ["--out", str(resumed)], torchrun=True), resumed.exists)
    _run(args + ["--out", str(resumed), "--resume", str(resumed.parent)], torchrun=True)
    _assert_same_weights(whole, resumed)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    whole = list(checkpoints.EpochOrder(10, True, seed=1))
    again = checkpoints.EpochOrder(10, True, seed=1)
    again.set_epoch(1, skip=4)
    assert list(again) == whole[4:] and len(again) == 6
    assert sorted(whole) == list(range(10))
    again.set_epoch(2)
    assert list(again) != whole
    ranks = [list(checkpoints.EpochOrder(7, False, seed=0, rank=r, world=2)) for r in range(2)]
    assert ranks == [[0, 2, 4, 6], [1, 3, 5, 0]]  # padded by the head, as DistributedSampler does


def test_torchrun_two_processes_train_like_one_on_the_global_batch(tmp_path):
    """BatchNorm synchronised under torchrun (SyncBatchNormAct2d) and DDP's averaged gradients: two
    processes with half the batch each end where one process with the whole batch does."""
    args = (
        "train --model unet --data digits --epochs 1 --max-steps 5 --base-width 8 --depth 2 --batch-size 8 "
        "--seed 3 --optimizer sgd --quiet"
    ).split()
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run(args + ["--out", str(one)])
    _run(args + ["--out", str(two)], torchrun=True)
    first, second = torch.load(one, weights_only=True)["state_dict"], torch.load(two, weights_only=True)["state_dict"]
    assert any("running_var" in name for name in first)
    for name, value in first.items():
        if value.is_floating_point():
            torch.testing.assert_close(second[name], value, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(second[name], value), name
