"""``segfast info`` (how this segfast was built), ``segfast train`` / ``eval`` / ``predict`` / ``export``,
``segfast bench``. Every parser is here; each task's commands live in their own module
(``cli/segment.py``, ``cli/classify.py``, ``cli/bench.py``), checkpoints in ``cli/checkpoint.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# per task: defaults of the arguments the two tasks share
TASK_DEFAULTS = {
    "classify": dict(
        model="simple-cnn", epochs=30, batch_size=32, optimizer="adam", image_size=28, out="runs/simple-cnn-digits.pt"
    ),
    "segment": dict(model="unet", epochs=20, batch_size=16, optimizer="adam", image_size=64, out="runs/unet-digits.pt"),
}
CLASSIFY_MODELS = ("simple-cnn",)
SEGMENT_MODELS = ("unet", "fcn8s", "fcn16s", "fcn32s")


def _info(args) -> int:
    import torch

    import segfast

    info = segfast.build_info()
    rows = {
        "segfast": segfast.__version__,
        "built against torch": info["torch_version"],
        "running torch": torch.__version__,
        "compiler": info["compiler"],
        "CUDA kernels": "yes (" + ", ".join(info["cuda_archs"]) + ")" if info["cuda"] else "no",
        "OpenMP": "yes" if info["openmp"] else "no",
        "threads": f"{info['num_threads']} (at::parallel_for uses {info['parallel_for_threads']})",
        # every registered segfast op (torch.ops.segfast lists only the ones already looked up)
        "ops": ", ".join(
            sorted(
                name.removeprefix("segfast::")
                for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("segfast::") and not name.endswith("_backward")
            )
        ),
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _train(args) -> int:
    task = args.task or ("classify" if args.model in CLASSIFY_MODELS else "segment")
    if args.model is not None and (args.model in CLASSIFY_MODELS) != (task == "classify"):
        raise ValueError(f"--model {args.model} does not do --task {task}")
    for name, value in TASK_DEFAULTS[task].items():
        if getattr(args, name) is None:
            setattr(args, name, Path(value) if name == "out" else value)
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be positive")
    if args.save_every is not None and args.save_every < 1:
        raise ValueError(f"--save-every must be at least 1 step, got {args.save_every}")
    if args.keep < 1:
        raise ValueError(f"--keep must be at least 1, got {args.keep}")
    if task == "classify":
        from segfast.cli import classify

        return classify.run_train(args)
    from segfast.cli import segment

    return segment.run_train(args)


def _eval(args) -> int:
    from segfast.cli import checkpoint, classify, segment

    task = checkpoint.load(args.checkpoint)["config"].get("task", "classify")
    return segment.run_eval(args) if task == "segment" else classify.run_eval(args)


def _predict(args) -> int:
    from segfast.cli import segment

    return segment.run_predict(args)


def _export(args) -> int:
    from segfast.cli import segment

    return segment.run_export(args)


def _bench(args) -> int:
    from segfast.cli import bench

    return bench.run(args)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a model, writing checkpoints as it goes")
    train.add_argument(
        "--task",
        choices=sorted(TASK_DEFAULTS),
        default=None,
        help="default: segment for unet/fcn*, classify for simple-cnn",
    )
    train.add_argument("--model", choices=CLASSIFY_MODELS + SEGMENT_MODELS, default=None)
    train.add_argument("--data", choices=["digits", "folder"], default="digits")
    train.add_argument("--backend", choices=["segfast", "torch"], default="segfast")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None, help="global batch (split over DDP processes)")
    train.add_argument("--optimizer", choices=["adam", "sgd"], default=None)
    train.add_argument(
        "--lr", type=float, default=None, help="default: adam 1e-3 (classify) / 3e-3 (segment), sgd 0.05"
    )
    train.add_argument("--momentum", type=float, default=0.9, help="sgd")
    train.add_argument("--nesterov", action="store_true", help="sgd")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--schedule", choices=["poly", "cosine", "none"], default="cosine")
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    train.add_argument("--no-shuffle", action="store_true", help="fixed batch order (tests)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    saving = train.add_argument_group("checkpoints")
    saving.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the newest checkpoint, replaced atomically at every save; the K newest also stay "
        "as OUT-stepNNNNNNNN.pt beside it and the best by validation as OUT-best.pt",
    )
    saving.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="also save every N training steps (default: at epoch ends only)",
    )
    saving.add_argument("--keep", type=int, default=2, metavar="K", help="step checkpoints kept (default 2)")
    saving.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="PATH",
        help="continue the run saved in this checkpoint, or in the newest complete checkpoint "
        "of this directory, exactly where it stopped (mid-epoch included)",
    )
    seg = train.add_argument_group("segmentation")
    seg.add_argument("--base-width", type=int, default=16)
    seg.add_argument("--depth", type=int, default=3, help="unet: number of poolings")
    seg.add_argument(
        "--norm",
        choices=["batch", "none"],
        default="batch",
        help="batch: BatchNorm, synchronised across processes under torchrun (segfast backend, or CUDA)",
    )
    seg.add_argument(
        "--loss",
        choices=["ce", "dice", "focal", "dice-ce", "bce", "dice-bce"],
        default=None,
        help="cross-entropy, soft Dice, focal (gamma 2), Dice + cross-entropy (default ce); with --num-classes 1 "
        "(binary: one sigmoid channel) bce, dice, focal or dice-bce (default bce)",
    )
    seg.add_argument("--ignore-index", type=int, default=255)
    seg.add_argument("--class-weights", type=float, nargs="+", default=None)
    seg.add_argument("--images-dir", type=Path, help="--data folder: images (png/jpg)")
    seg.add_argument("--masks-dir", type=Path, help="--data folder: index-PNG masks, same file stems")
    seg.add_argument(
        "--num-classes",
        type=int,
        help="--data folder; 1 means binary (masks 0 / 1; --data digits: digit vs background)",
    )
    seg.add_argument("--in-channels", type=int, default=3, help="--data folder: 1 (gray) or 3 (RGB)")
    seg.add_argument("--val-fraction", type=float, default=0.15, help="--data folder")
    seg.add_argument(
        "--augment",
        default=None,
        metavar="SPEC",
        help="joint image+mask augmentation on the training device (a folder's images go there as uint8 "
        "bytes), e.g. rotate=30,flip=0.5,vflip=0,scale=0.5:2,translate=0.1,crop=48,brightness=0.2,contrast=0.2",
    )
    seg.add_argument("--device", default="cpu")
    seg.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    seg.add_argument("--channels-last", action="store_true")
    seg.add_argument("--compile", action="store_true")
    train.set_defaults(run=_train)


def _add_eval_predict_export(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on its test split")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument(
        "--backend",
        choices=["segfast", "torch"],
        default=None,
        help="run the checkpoint on this backend (default: the one it was trained with)",
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=_eval)
    predict = sub.add_parser("predict", help="write the colour (palette) PNG mask a checkpoint predicts for an image")
    predict.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint, or a .pt2 from segfast export")
    predict.add_argument("--image", type=Path, required=True)
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--backend", choices=["segfast", "torch"], default=None)
    predict.add_argument(
        "--explain",
        action="store_true",
        help="also write <out>_confidence.png, <out>_entropy.png and <out>_saliency.png (Grad-CAM) overlays",
    )
    predict.add_argument(
        "--explain-class", type=int, default=None, help="the class Grad-CAM explains (default: most predicted non-0)"
    )
    predict.set_defaults(run=_predict)
    export = sub.add_parser("export", help="fold BatchNorm and write a torch.export program (.pt2) for predict")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--image-size", type=int, default=None, help="input size (default: the training size)")
    export.set_defaults(run=_export)


BENCH_USAGE = """run the benchmark suites, or compare two result files:

    segfast bench [--suite ops,models,augment] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                  [--layout nchw|channels_last] [--quick] [--reps N] [--no-compile] [--out DIR]
    segfast bench compare A.json B.json
"""


def _add_bench(sub) -> None:
    from segfast.bench.cases import DTYPES, LAYOUTS

    p = sub.add_parser(
        "bench",
        help="segfast vs stock PyTorch (eager, torch.compile): time and memory",
        description=BENCH_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "action", nargs="*", metavar="compare A.json B.json", help="compare two result files instead of running"
    )
    p.add_argument(
        "--suite",
        default="ops,models,augment",
        help="comma-separated: ops, models, augment, overhead (per-call cost at tiny sizes), "
        "dispatch (every CPU path of conv2d_act on a grid of shapes: the data of csrc/cpu/dispatch_table.inc)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated families/models within the suites, e.g. "
        "cross_entropy,pooling,unet (ops: cross_entropy, pooling, conv2d_act, linear_act, "
        "segmentation_losses, sigmoid_losses, confusion_matrix, softmax_stats; "
        "models: unet, unet_iabn, fcn, resnet18_unet (where smp is installed); "
        "augment: bytes, int64, uint8; dispatch: forward, backward)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--layout", default="nchw", choices=list(LAYOUTS))
    p.add_argument("--quick", action="store_true", help="small shapes: about 3 minutes on 2 CPU cores")
    p.add_argument("--reps", type=int, default=15, help="timed calls per provider")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--no-charts", action="store_true", help="no PNG charts (they need matplotlib)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="where the JSON and charts go")
    p.set_defaults(run=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segfast", description=__doc__.split(".")[0] + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information").set_defaults(run=_info)
    _add_train(sub)
    _add_eval_predict_export(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IndexError, ImportError) as error:
        # bad input (arguments, files, data): one clear line, not a traceback
        print(f"segfast {args.command}: error: {error}", file=sys.stderr)
        return 2
