"""``segfast train`` / ``eval`` / ``predict``: the parsers, and the classification task (the
textbook CNN on scikit-learn's digits). Segmentation lives in segfast/cli/segment.py."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import segfast
from segfast.cli import segment
from segfast.data import DigitsClassification
from segfast.models import SimpleCNN

MODELS = {"simple-cnn": SimpleCNN}
DATASETS = {"digits": DigitsClassification}


# per task: defaults of the arguments the two tasks share
TASK_DEFAULTS = {
    "classify": dict(model="simple-cnn", epochs=30, batch_size=32, optimizer="adam", image_size=28,
                     out="runs/simple-cnn-digits.pt"),
    "segment": dict(model="unet", epochs=20, batch_size=16, optimizer="adam", image_size=64,
                    out="runs/unet-digits.pt"),
}


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a model and save a checkpoint")
    train.add_argument("--task", choices=sorted(TASK_DEFAULTS), default=None,
                       help="default: segment for unet/fcn*, classify for simple-cnn")
    train.add_argument("--model", choices=sorted(MODELS) + list(segment.SEGMENTATION_MODELS), default=None)
    train.add_argument("--data", choices=["digits", "folder"], default="digits")
    train.add_argument("--backend", choices=["segfast", "torch"], default="segfast")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None, help="global batch (split over DDP processes)")
    train.add_argument("--optimizer", choices=["adam", "sgd"], default=None)
    train.add_argument("--lr", type=float, default=None,
                       help="default: adam 1e-3 (classify) / 3e-3 (segment), sgd 0.05")
    train.add_argument("--momentum", type=float, default=0.9, help="sgd")
    train.add_argument("--nesterov", action="store_true", help="sgd")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--schedule", choices=["poly", "cosine", "none"], default="cosine")
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=None)
    seg = train.add_argument_group("segmentation")
    seg.add_argument("--base-width", type=int, default=16)
    seg.add_argument("--depth", type=int, default=3, help="unet: number of poolings")
    seg.add_argument("--norm", choices=["batch", "none"], default="batch")
    seg.add_argument("--loss", choices=["ce", "dice", "focal", "dice-ce"], default="ce",
                     help="cross-entropy, soft Dice, focal (gamma 2), or Dice + cross-entropy")
    seg.add_argument("--ignore-index", type=int, default=255)
    seg.add_argument("--class-weights", type=float, nargs="+", default=None)
    seg.add_argument("--images-dir", type=Path, help="--data folder: images (png/jpg)")
    seg.add_argument("--masks-dir", type=Path, help="--data folder: index-PNG masks, same file stems")
    seg.add_argument("--num-classes", type=int, help="--data folder")
    seg.add_argument("--in-channels", type=int, default=3, help="--data folder: 1 (gray) or 3 (RGB)")
    seg.add_argument("--val-fraction", type=float, default=0.15, help="--data folder")
    seg.add_argument("--augment", default=None, metavar="SPEC",
                     help="joint image+mask augmentation on the training device, e.g. "
                          "rotate=30,flip=0.5,vflip=0,scale=0.5:2,translate=0.1,crop=48")
    seg.add_argument("--device", default="cpu")
    seg.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    seg.add_argument("--channels-last", action="store_true")
    seg.add_argument("--compile", action="store_true")
    seg.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    seg.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    seg.add_argument("--no-shuffle", action="store_true", help="fixed batch order (tests)")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on its test split")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--backend", choices=["segfast", "torch"], default=None,
                          help="run the checkpoint on this backend (default: the one it was trained with)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=run_eval)
    predict = sub.add_parser("predict", help="write the colour (palette) PNG mask a checkpoint predicts for an image")
    predict.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint, or a .pt2 from segfast export")
    predict.add_argument("--image", type=Path, required=True)
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--backend", choices=["segfast", "torch"], default=None)
    predict.set_defaults(run=segment.run_predict)
    export = sub.add_parser("export", help="fold BatchNorm and write a torch.export program (.pt2) for predict")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--image-size", type=int, default=None, help="input size (default: the training size)")
    export.set_defaults(run=segment.run_export)


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
    task = args.task or ("classify" if args.model == "simple-cnn" else "segment")
    if (args.model in MODELS) != (task == "classify") and args.model is not None:
        raise ValueError(f"--model {args.model} does not do --task {task}")
    for name, value in TASK_DEFAULTS[task].items():
        if getattr(args, name) is None:
            setattr(args, name, Path(value) if name == "out" else value)
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be positive")
    return segment.run_train(args) if task == "segment" else _train_classifier(args)


def _train_classifier(args) -> int:
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
    checkpoint = segment.load_checkpoint(args.checkpoint)
    if checkpoint.get("kind") == segment.CHECKPOINT_KIND:
        return segment.run_eval(args)
    config = checkpoint["config"]
    backend = args.backend or checkpoint["backend"]
    model = MODELS[config["model"]](config["in_channels"], config["num_classes"], config["image_size"], backend=backend)
    model.load_state_dict(checkpoint["state_dict"])
    test_set = DATASETS[config["data"]]("test", image_size=config["image_size"], seed=config["seed"])
    test_loss, accuracy = evaluate(model, DataLoader(test_set, batch_size=256), _loss(backend))
    print(f"{args.checkpoint} on {backend} layers: test loss {test_loss:.4f}, test accuracy {100 * accuracy:.2f}% "
          f"({len(test_set)} {config['data']} test images)")
    return 0
