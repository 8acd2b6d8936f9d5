"""``segfast train`` and ``segfast eval`` for the classification task (the textbook CNN on
scikit-learn's digits). Segmentation training lands with the models issue."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import segfast
from segfast.data import DigitsClassification
from segfast.models import SimpleCNN

MODELS = {"simple-cnn": SimpleCNN}
DATASETS = {"digits": DigitsClassification}


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a model and save a checkpoint")
    train.add_argument("--task", choices=["classify"], default="classify")
    train.add_argument("--model", choices=sorted(MODELS), default="simple-cnn")
    train.add_argument("--data", choices=sorted(DATASETS), default="digits")
    train.add_argument("--backend", choices=["segfast", "torch"], default="segfast")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    train.add_argument("--lr", type=float, default=None, help="default: 1e-3 for adam, 0.05 for sgd")
    train.add_argument("--image-size", type=int, default=28)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=Path("runs/simple-cnn-digits.pt"))
    train.set_defaults(run=run_train)
    evaluate = sub.add_parser("eval", help="test loss and accuracy of a checkpoint")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--backend", choices=["segfast", "torch"], default=None,
                          help="run the checkpoint on this backend (default: the one it was trained with)")
    evaluate.set_defaults(run=run_eval)


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
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("segfast train: --epochs and --batch-size must be positive")
    torch.manual_seed(args.seed)
    data = DATASETS[args.data]
    train_set, test_set = (data(split, image_size=args.image_size, seed=args.seed) for split in ("train", "test"))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=256)
    config = {"model": args.model, "in_channels": 1, "num_classes": 10, "image_size": args.image_size,
              "data": args.data, "seed": args.seed}
    model = MODELS[args.model](config["in_channels"], config["num_classes"], args.image_size, backend=args.backend)
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 0.05)
    optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if args.optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    # cosine decay to 0 over the run: the last epochs settle instead of bouncing between minibatches
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    loss_fn = _loss(args.backend)
    print(f"training {args.model} ({args.backend} layers) on {args.data}: {len(train_set)} train / "
          f"{len(test_set)} test images, {args.optimizer} lr={lr}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        running, seen = 0.0, 0
        for images, labels in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(labels)
            seen += len(labels)
        test_loss, accuracy = evaluate(model, test_loader, loss_fn)
        print(f"epoch {epoch:3d}  train loss {running / seen:.4f}  test loss {test_loss:.4f}  "
              f"test accuracy {100 * accuracy:.2f}%  ({time.perf_counter() - start:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "backend": args.backend, "state_dict": model.state_dict(),
                "test_loss": test_loss, "test_accuracy": accuracy}, args.out)
    print(f"test loss {test_loss:.4f}, test accuracy {100 * accuracy:.2f}%; checkpoint: {args.out}")
    return 0


def run_eval(args) -> int:
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    backend = args.backend or checkpoint["backend"]
    model = MODELS[config["model"]](config["in_channels"], config["num_classes"], config["image_size"], backend=backend)
    model.load_state_dict(checkpoint["state_dict"])
    test_set = DATASETS[config["data"]]("test", image_size=config["image_size"], seed=config["seed"])
    test_loss, accuracy = evaluate(model, DataLoader(test_set, batch_size=256), _loss(backend))
    print(f"{args.checkpoint} on {backend} layers: test loss {test_loss:.4f}, test accuracy {100 * accuracy:.2f}% "
          f"({len(test_set)} {config['data']} test images)")
    return 0
