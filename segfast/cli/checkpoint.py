"""Checkpoints of ``segfast train``, for both tasks: written atomically, read back with one clear error,
and everything a run's future depends on, so that ``--resume`` continues the very run that was stopped.

What makes a resumed run equal to the uninterrupted one: the data order of an epoch and the augmentation
of a step are functions of (seed, epoch) and (seed, rank, step) alone (``EpochOrder``,
``step_generator``), so nothing but counters has to be saved for them; the model, optimizer, schedule,
GradScaler and the global RNG are saved as state.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler
from tqdm import tqdm

KIND = "segfast-checkpoint"
# a test hook: the save at this global step stops with half of the file written, for a minute (tests kill
# the process there)
PAUSE_MID_WRITE_ENV = "SEGFAST_TEST_PAUSE_MID_WRITE"


@dataclass
class Position:
    """Where a run stands: the epoch in progress (1-based), the training steps done in it, the steps
    done in all, the epoch's running mean train loss, and the best validation score so far."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    epoch_loss: float = 0.0
    best: float | None = None
    epoch_done: bool = False

    def advance(self, loss: float, save_every: int | None, steps_per_epoch: int) -> bool:
        """Counts one training step of mean loss ``loss``; True when a mid-epoch save is due after it
        (the epoch's last step is saved with the epoch instead)."""
        self.step += 1
        self.global_step += 1
        self.epoch_loss += (loss - self.epoch_loss) / self.step
        return bool(save_every) and self.global_step % save_every == 0 and self.step < steps_per_epoch

    def next_epoch(self) -> Position:
        return Position(epoch=self.epoch + 1, global_step=self.global_step, best=self.best)

    @classmethod
    def resumed(cls, checkpoint: dict | None) -> Position:
        """The position to continue from: after the checkpoint's step, or at the next epoch's start."""
        if checkpoint is None:
            return cls()
        saved = cls(**checkpoint["position"])
        return saved.next_epoch() if saved.epoch_done else saved


def epoch_progress(position: Position, steps_per_epoch: int, enabled: bool) -> tqdm:
    """The epoch's progress bar (tqdm: ETA, rate), from the step a resumed epoch starts at; quiet when
    not enabled or when stderr is not a terminal."""
    return tqdm(
        total=steps_per_epoch,
        initial=position.step,
        desc=f"epoch {position.epoch}",
        unit="step",
        disable=not enabled or not sys.stderr.isatty(),
        leave=False,
    )


class EpochOrder(Sampler):
    """The sample indices one process reads in an epoch, a function of (seed, epoch) only: a shuffled
    (or, with ``shuffle=False``, the natural) order of ``size`` samples, padded by its head to a
    multiple of ``world`` and dealt round-robin to the ranks as ``DistributedSampler`` does.
    ``set_epoch(epoch, skip)`` starts ``skip`` samples in, where a resumed epoch continues."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch, self.skip = 1, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        padded = -(-self.size // self.world) * self.world
        order = torch.cat([order, order[: padded - self.size]]) if padded > self.size else order
        return iter(order[self.rank :: self.world][self.skip :].tolist())

    def __len__(self) -> int:
        return -(-self.size // self.world) - self.skip


def step_generator(seed: int, rank: int, global_step: int) -> torch.Generator:
    """The random generator of one training step's augmentation on one rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_000_007 + global_step)


def _replace(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content atomically: a hard link where the file system has them."""
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, staged)
    except OSError:
        shutil.copyfile(source, staged)
    os.replace(staged, target)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """Where a run's checkpoints go. ``out`` always holds the newest complete one: each save is written
    to a temporary file in the same directory, flushed and fsynced, then renamed over it, so a kill or a
    full disk mid-write leaves the previous checkpoint intact. The ``keep`` newest saves also stay as
    ``<out stem>-stepNNNNNNNN.pt`` beside it, and the best by validation score as ``<out stem>-best.pt``
    (hard links: one write per save)."""

    def __init__(self, out: Path, keep: int):
        self.out, self.keep = Path(out), keep
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.stem}*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)

    def step_path(self, global_step: int) -> Path:
        return self.out.with_name(f"{self.out.stem}-step{global_step:08d}{self.out.suffix}")

    @property
    def best_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}-best{self.out.suffix}")

    def save(self, payload: dict, position: Position, score: float | None = None) -> None:
        """Writes ``payload`` and the position; ``score`` (validation, higher is better; None mid-epoch)
        updates the best, whose checkpoint is kept."""
        improved = score is not None and (position.best is None or score > position.best)
        if improved:
            position.best = score
        buffer = io.BytesIO()
        torch.save({"kind": KIND, **payload, "position": asdict(position)}, buffer)
        data = buffer.getbuffer()
        fd, name = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.stem}.", suffix=".tmp")
        written = Path(name)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data[: len(data) // 2])
                if os.environ.get(PAUSE_MID_WRITE_ENV) == str(position.global_step):
                    print(f"checkpoint: half written to {written}", file=sys.stderr, flush=True)
                    time.sleep(60)
                file.write(data[len(data) // 2 :])
                file.flush()
                os.fsync(file.fileno())
            _replace(written, self.step_path(position.global_step))
            if improved:
                _replace(written, self.best_path)
            os.replace(written, self.out)
            _fsync_directory(self.out.parent)
        finally:
            written.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        pattern = re.compile(re.escape(self.out.stem) + r"-step(\d{8})" + re.escape(self.out.suffix) + "$")
        steps = sorted(p for p in self.out.parent.iterdir() if pattern.match(p.name))
        for old in steps[: -self.keep]:
            old.unlink(missing_ok=True)


def run_state(config: dict, backend: str, position: Position, model, optimizer, schedule, **extra) -> dict:
    """What a checkpoint of either task holds besides the position: config, weights, optimizer and
    schedule, the global RNG, and ``extra`` (task results, GradScaler, ...)."""
    return {
        "config": config,
        "backend": backend,
        "epoch": position.epoch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        **extra,
    }


def load(path: Path) -> dict:
    """A checkpoint file's contents, or one clear error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" as a file" if path.exists() else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a cut-short or foreign file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{path} is not a complete checkpoint: it cannot be read ({reason}); a file cut short "
            "by a kill or a full disk reads like this"
        ) from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a segfast checkpoint: it holds no model config and weights")
    return checkpoint


def load_for_resume(path: Path, config: dict) -> tuple[Path, dict]:
    """(file, contents) to resume the run of ``config`` from: the file itself, or the newest complete
    checkpoint of that config in a directory (other files are passed over, each named on stderr)."""
    path = Path(path)
    if not path.is_dir():
        checkpoint = load(path)
        if checkpoint.get("kind") != KIND or "position" not in checkpoint:
            raise ValueError(
                f"{path} cannot be resumed: it was written without a run's state (by an older "
                "segfast, or by something else)"
            )
        _check_same_run(checkpoint, config, path)
        return path, checkpoint
    newest, seen = None, set()
    for candidate in sorted(path.glob("*.pt")):
        inode = candidate.stat().st_ino
        if inode in seen:  # the newest checkpoint and its step link are one file
            continue
        seen.add(inode)
        try:
            candidate_path, checkpoint = load_for_resume(candidate, config)
        except ValueError as error:
            print(f"segfast train: passing over {error}", file=sys.stderr)
            continue
        if (
            newest is None
            or checkpoint["position"]["global_step"] > newest[1]["position"]["global_step"]
            or (
                checkpoint["position"]["global_step"] == newest[1]["position"]["global_step"]
                and checkpoint["position"]["epoch_done"]
            )
        ):
            newest = candidate_path, checkpoint
    if newest is None:
        raise ValueError(f"--resume {path}: the directory holds no complete segfast checkpoint (*.pt) of this run")
    return newest


def _check_same_run(checkpoint: dict, config: dict, path: Path) -> None:
    """A resumed run must be the run the checkpoint was taken from: the same config."""
    theirs = checkpoint["config"]
    different = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
    if different:
        listed = ", ".join(f"{k}={theirs.get(k)}" for k in different)
        raise ValueError(
            f"--resume {path} is for another model or run ({listed}; this run has "
            + ", ".join(f"{k}={config.get(k)}" for k in different)
            + ")"
        )
