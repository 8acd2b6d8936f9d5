"""The classification task of ``segfast train`` / ``eval``: the textbook CNN on scikit-learn's digits,
with the same checkpoints and ``--resume`` as segmentation (cli/checkpoint.py)."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader

import segfast
from segfast.cli import checkpoint as checkpoints
from segfast.data import DigitsClassification
from segfast.models import SimpleCNN

MODELS = {"simple-cnn": SimpleCNN}
DATASETS = {"digits": DigitsClassification}


def _loss(backend: str) -> nn.Module:
    return segfast.nn.CrossEntropyLoss() if backend == "segfast" else nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        total_loss += loss_fn(logits, labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return total_loss / count, correct / count


def run_train(args) -> int:
    if args.data not in DATASETS:
        raise ValueError(f"--task classify trains on {', '.join(DATASETS)}, not --data {args.data}")
    config = {
        "task": "classify",
        "model": args.model,
        "in_channels": 1,
        "num_classes": 10,
        "image_size": args.image_size,
        "data": args.data,
        "seed": args.seed,
    }
    resumed_from, checkpoint = None, None
    if args.resume:
        resumed_from, checkpoint = checkpoints.load_for_resume(args.resume, config)
    torch.manual_seed(args.seed)
    data = DATASETS[args.data]
    train_set, test_set = (data(split, image_size=args.image_size, seed=args.seed) for split in ("train", "test"))
    order = checkpoints.EpochOrder(len(train_set), not args.no_shuffle, args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order, generator=torch.Generator())
    test_loader = DataLoader(test_set, batch_size=256)
    model = MODELS[args.model](config["in_channels"], config["num_classes"], args.image_size, backend=args.backend)
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 0.05)
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if args.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    )
    steps_per_epoch = len(train_loader) if args.max_steps is None else min(len(train_loader), args.max_steps)
    # cosine decay to 0 over the run: the last epochs settle instead of bouncing between minibatches
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    position = checkpoints.Position.resumed(checkpoint)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        torch.set_rng_state(checkpoint["rng"])
    saver = checkpoints.Checkpoints(args.out, args.keep)
    loss_fn = _loss(args.backend)

    def save(test: tuple[float, float] | None) -> None:
        results = {"test_loss": test[0] if test else None, "test_accuracy": test[1] if test else None}
        state = checkpoints.run_state(config, args.backend, position, model, optimizer, schedule, **results)
        saver.save(state, position, test[1] if test else None)

    print(
        f"training {args.model} ({args.backend} layers) on {args.data}: {len(train_set)} train / "
        f"{len(test_set)} test images, {args.optimizer} lr={lr}, {torch.get_num_threads()} threads"
        + (f"; resuming from {resumed_from} at epoch {position.epoch}, step {position.step}" if resumed_from else "")
    )
    start, test = time.perf_counter(), None
    while position.epoch <= args.epochs:
        order.set_epoch(position.epoch, skip=position.step * args.batch_size)
        model.train()
        progress = checkpoints.epoch_progress(position, steps_per_epoch, not args.quiet)
        for images, labels in train_loader:
            if position.step == steps_per_epoch:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            save_due = position.advance(loss.item(), args.save_every, steps_per_epoch)
            progress.update()
            if save_due:
                save(None)
        progress.close()
        test = evaluate(model, test_loader, loss_fn)
        print(
            f"epoch {position.epoch:3d}  train loss {position.epoch_loss:.4f}  test loss {test[0]:.4f}  "
            f"test accuracy {100 * test[1]:.2f}%  ({time.perf_counter() - start:.1f} s)"
        )
        position.epoch_done = True
        save(test)
        position = position.next_epoch()
    if test is not None:
        print(f"test loss {test[0]:.4f}, test accuracy {100 * test[1]:.2f}%; checkpoint: {args.out}")
    return 0


def run_eval(args) -> int:
    checkpoint = checkpoints.load(args.checkpoint)
    config = checkpoint["config"]
    backend = args.backend or checkpoint["backend"]
    model = MODELS[config["model"]](config["in_channels"], config["num_classes"], config["image_size"], backend=backend)
    model.load_state_dict(checkpoint["state_dict"])
    test_set = DATASETS[config["data"]]("test", image_size=config["image_size"], seed=config["seed"])
    test_loss, accuracy = evaluate(model, DataLoader(test_set, batch_size=256), _loss(backend))
    print(
        f"{args.checkpoint} on {backend} layers: test loss {test_loss:.4f}, test accuracy {100 * accuracy:.2f}% "
        f"({len(test_set)} {config['data']} test images)"
    )
    return 0
