"""Segmentation with ``segfast train`` / ``eval`` / ``predict``: U-Net and FCN on the digits canvases
or the user's folders; SGD or Adam, poly or cosine schedules, per-epoch validation, checkpoints and
``--resume``, AMP, channels_last, torch.compile, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import segfast
import segfast.nn as snn
from segfast.augment import parse_augment
from segfast.cli import checkpoint as checkpoints
from segfast.data import DigitsSegmentation, FolderDataset, read_image, write_mask_png
from segfast.explain import Explanation, explain, overlay, two_class
from segfast.metrics import CalibrationError, SegmentationMetrics
from segfast.models import FCN, UNet
from segfast.ops.softmax_stats import softmax_stats


def build_model(config: dict, backend: str) -> nn.Module:
    name = config["model"]
    if name == "unet":
        return UNet(
            config["in_channels"],
            config["num_classes"],
            base_width=config["base_width"],
            depth=config["depth"],
            norm=config["norm"],
            backend=backend,
        )
    return FCN(
        config["in_channels"],
        config["num_classes"],
        variant=name.removeprefix("fcn"),
        base_width=config["base_width"],
        norm=config["norm"],
        backend=backend,
    )


def datasets(config: dict, split: str, decoded: bool = False):
    """The data set of a split ("train", "val", "test") for a run's config; ``decoded``: a folder's
    images as their uint8 (H, W, C) bytes (for the augmentation, which writes the float batch)."""
    if config["data"] == "digits":
        return DigitsSegmentation(split, size=config["image_size"], seed=config["seed"], binary=_binary(config))
    full = FolderDataset(
        config["images_dir"], config["masks_dir"], config["num_classes"], config["ignore_index"], decoded=decoded
    )
    # the user's folder: a fixed split by seed, val_fraction for validation (test = val)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(config["seed"])).tolist()
    n_val = max(1, int(round(config["val_fraction"] * len(full)))) if len(full) > 1 else 0
    return Subset(full, order[n_val:] if split == "train" else order[:n_val])


def _binary(config: dict) -> bool:
    """num_classes 1: binary segmentation, one sigmoid channel (the losses' mode="binary")."""
    return config["num_classes"] == 1


BINARY_LOSSES = ("bce", "dice", "focal", "dice-bce")


def _loss(config: dict, backend: str, device) -> nn.Module:
    """The training loss. Dice and focal exist as segfast ops only: the torch backend changes the layers."""
    weight = torch.tensor(config["class_weights"], device=device) if config["class_weights"] else None
    ignore = config["ignore_index"]
    name = config.get("loss") or ("bce" if _binary(config) else "ce")
    if _binary(config):
        if name not in BINARY_LOSSES:
            raise ValueError(f"--loss {name}: with one class (binary) use one of {', '.join(BINARY_LOSSES)}")
        if name == "bce":
            return segfast.nn.DiceBCELoss(mode="binary", lambda_dice=0.0, ignore_index=ignore, weight=weight)
        if name == "dice":
            return segfast.nn.DiceLoss(mode="binary", ignore_index=ignore, weight=weight)
        if name == "focal":
            return segfast.nn.FocalLoss(mode="binary", ignore_index=ignore, alpha=weight)
        return segfast.nn.DiceBCELoss(mode="binary", ignore_index=ignore, weight=weight)
    if name in ("bce", "dice-bce"):
        raise ValueError(f"--loss {name} is for binary segmentation (--num-classes 1)")
    if name == "dice":
        return segfast.nn.DiceLoss(ignore_index=ignore, weight=weight)
    if name == "focal":
        return segfast.nn.FocalLoss(alpha=weight, ignore_index=ignore)
    if name == "dice-ce":
        return segfast.nn.DiceCELoss(ignore_index=ignore, weight=weight)
    cls = segfast.nn.CrossEntropyLoss if backend == "segfast" else nn.CrossEntropyLoss
    return cls(weight=weight, ignore_index=ignore)


def _schedule(optimizer, name: str, total_steps: int):
    if name == "poly":  # the DeepLab schedule
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _optimizer(model: nn.Module, args):
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr or 3e-3, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=args.lr or 0.05,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
    )


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, config: dict, device, amp=None, channels_last=False) -> dict:
    model.eval()
    mode = "binary" if _binary(config) else "multiclass"
    metrics = SegmentationMetrics(config["num_classes"], config["ignore_index"], device=device, mode=mode)
    calibration = CalibrationError(ignore_index=config["ignore_index"], device=device)
    batches = tqdm(loader, desc="evaluating", unit="batch", disable=not sys.stderr.isatty(), leave=False)
    for images, masks in batches:
        images, masks = images.to(device), masks.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        # one read of the logits for the predicted classes and confidences both figures use
        predicted, confidence, _ = softmax_stats(two_class(logits))
        # binary: probabilities, so that logits which happen to lie in [0, 1] are not read as probabilities
        metrics.update(logits.sigmoid() if mode == "binary" else predicted, masks)
        calibration.add(predicted, confidence, masks)
    metrics.all_reduce()
    calibration.all_reduce()
    return metrics.compute() | {"ece": calibration.compute()}


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _config_from(args) -> dict:
    if args.data == "folder" and (args.images_dir is None or args.masks_dir is None or args.num_classes is None):
        raise ValueError("--data folder needs --images-dir, --masks-dir and --num-classes")
    digits = args.data == "digits"
    if digits and args.num_classes not in (None, 1, DigitsSegmentation.num_classes):
        raise ValueError(
            f"--data digits has {DigitsSegmentation.num_classes} classes, or 1 (binary); got {args.num_classes}"
        )
    config = {
        "task": "segment",
        "model": args.model,
        "data": args.data,
        "seed": args.seed,
        "in_channels": 1 if digits else args.in_channels,
        "num_classes": (args.num_classes or DigitsSegmentation.num_classes) if digits else args.num_classes,
        "image_size": args.image_size,
        "base_width": args.base_width,
        "depth": args.depth,
        "norm": args.norm,
        "ignore_index": args.ignore_index,
        "class_weights": args.class_weights,
        "images_dir": str(args.images_dir) if args.images_dir else None,
        "masks_dir": str(args.masks_dir) if args.masks_dir else None,
        "val_fraction": args.val_fraction,
        "augment": args.augment,
        "loss": args.loss,
    }
    if config["class_weights"] and len(config["class_weights"]) != config["num_classes"]:
        raise ValueError(
            f"--class-weights has {len(config['class_weights'])} values for {config['num_classes']} classes"
        )
    return config


def _load_state(model: nn.Module, checkpoint: dict, path) -> None:
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{path} holds weights for another model ({checkpoint['config'].get('model')}, "
            f"width {checkpoint['config'].get('base_width')}): {first}"
        ) from None


def run_train(args) -> int:
    device = torch.device(args.device)
    rank, world = _distributed(device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) must divide among {world} processes")
    config = _config_from(args)
    resumed_from, checkpoint = None, None
    if args.resume:
        resumed_from, checkpoint = checkpoints.load_for_resume(args.resume, config)
    torch.manual_seed(args.seed)
    # with --augment, a folder's images travel as bytes and the augmentation writes the float batch
    decoded = bool(args.augment) and config["data"] != "digits"
    train_set, val_set = datasets(config, "train", decoded), datasets(config, "val")
    per_process = args.batch_size // world
    order = checkpoints.EpochOrder(len(train_set), not args.no_shuffle, args.seed, rank, world)
    # a generator of its own: the loader must not draw from the global RNG, which is saved as state
    train_loader = DataLoader(
        train_set, batch_size=per_process, sampler=order, drop_last=True, generator=torch.Generator()
    )
    val_sampler = DistributedSampler(val_set, shuffle=False) if world > 1 else None
    val_loader = DataLoader(val_set, batch_size=max(1, 64 // world), sampler=val_sampler)
    model = build_model(config, args.backend).to(device)
    if world > 1 and (args.backend == "segfast" or device.type == "cuda"):
        # BatchNorm over the global batch, as one process would see it (stock nn.SyncBatchNorm
        # runs on GPUs only: the torch backend on CPU keeps per-process statistics)
        model = snn.SyncBatchNormAct2d.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, args)
    steps_per_epoch = len(train_loader) if args.max_steps is None else min(len(train_loader), args.max_steps)
    schedule = _schedule(optimizer, args.schedule, max(1, args.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    position = checkpoints.Position.resumed(checkpoint)
    if checkpoint is not None:
        _load_state(model, checkpoint, resumed_from)
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
    loss_fn = _loss(config, args.backend, device)
    augment = None
    if args.augment:
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        augment = parse_augment(args.augment, config["ignore_index"], out_dtype=torch.float32, out_memory_format=layout)
    trained = DistributedDataParallel(model) if world > 1 else model
    step_model = torch.compile(trained) if args.compile else trained
    main_process = rank == 0
    saver = checkpoints.Checkpoints(args.out, args.keep) if main_process else None

    def save(result: dict | None) -> None:
        """Rank 0 writes; every rank waits for it, so a checkpoint is a cut all ranks have passed."""
        if main_process:
            extra = {"scaler": scaler.state_dict(), "val": result, "args": _recorded(args)}
            state = checkpoints.run_state(config, args.backend, position, model, optimizer, schedule, **extra)
            saver.save(state, position, result["miou"] if result else None)
        if world > 1:
            dist.barrier()

    if main_process:
        print(
            f"training {args.model} ({args.backend} layers, width {args.base_width}, norm {args.norm}"
            f"{f', augment {args.augment}' if args.augment else ''}, loss {args.loss}) on "
            f"{args.data}: {len(train_set)} train / {len(val_set)} val images, {args.optimizer} lr "
            f"{optimizer.param_groups[0]['lr']:g}, {args.schedule} schedule, batch {args.batch_size}"
            f"{f' over {world} processes' if world > 1 else ''}, {device}, {torch.get_num_threads()} threads"
            + (
                f"; resuming from {resumed_from} at epoch {position.epoch}, step {position.step}"
                if resumed_from
                else ""
            )
        )
    start, result = time.perf_counter(), {}
    while position.epoch <= args.epochs:
        order.set_epoch(position.epoch, skip=position.step * per_process)
        step_model.train()
        progress = checkpoints.epoch_progress(position, steps_per_epoch, main_process and not args.quiet)
        for images, masks in train_loader:
            if position.step == steps_per_epoch:
                break
            images, masks = images.to(device), masks.to(device)
            if augment is not None:  # one pass over the batch, on the training device
                images, masks, _ = augment(
                    images,
                    masks,
                    checkpoints.step_generator(args.seed, rank, position.global_step),
                    image_layout="NHWC" if decoded else "NCHW",
                )
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, args.amp):
                loss = loss_fn(step_model(images).float(), masks)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            save_due = position.advance(loss.item(), args.save_every, steps_per_epoch)
            progress.update()
            progress.set_postfix(loss=f"{position.epoch_loss:.4f}", refresh=False)
            if save_due:
                save(None)
        progress.close()
        result = evaluate(step_model, val_loader, config, device, args.amp, args.channels_last)
        if main_process:
            print(
                f"epoch {position.epoch:3d}  train loss {position.epoch_loss:.4f}  val mIoU {result['miou']:.4f}  "
                f"pixel accuracy {100 * result['pixel_accuracy']:.2f}%  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        position.epoch_done = True
        save(result)
        position = position.next_epoch()
    if main_process and result:
        print(f"val mIoU {result['miou']:.4f}; checkpoint: {args.out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def _recorded(args) -> dict:
    """The command line's values, kept in the checkpoint for reference (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run"}


def _model_from_checkpoint(path, backend=None, device="cpu"):
    checkpoint = checkpoints.load(path)
    if checkpoint["config"].get("task") != "segment":
        raise ValueError(f"{path} is not a segmentation checkpoint (use it with --task classify)")
    config = checkpoint["config"]
    model = build_model(config, backend or checkpoint["backend"]).to(device)
    _load_state(model, checkpoint, path)
    return model.eval(), config, checkpoint


def run_eval(args) -> int:
    device = torch.device(args.device)
    model, config, checkpoint = _model_from_checkpoint(args.checkpoint, args.backend, device)
    split = "test" if config["data"] == "digits" else "val"
    data = datasets(config, split)
    result = evaluate(model, DataLoader(data, batch_size=64), config, device)
    print(
        f"{args.checkpoint} ({config['model']}, epoch {checkpoint['epoch']}) on {len(data)} {config['data']} "
        f"{split} images:"
    )
    print(
        f"  mIoU {result['miou']:.4f}  mean Dice {result['mean_dice']:.4f}  "
        f"pixel accuracy {100 * result['pixel_accuracy']:.2f}%  ECE {result['ece']:.4f} (15 bins)"
    )
    print("  class  IoU     Dice")
    for c, (iou, dice) in enumerate(zip(result["iou"], result["dice"])):
        print(f"  {c:5d}  {iou:.4f}  {dice:.4f}")
    return 0


EXPORT_CONFIG = "segfast-config.json"


def run_export(args) -> int:
    """A checkpoint -> BatchNorm folded into the convolutions -> a torch.export program (.pt2)."""
    model, config, _ = _model_from_checkpoint(args.checkpoint, "segfast")
    size = args.image_size or config["image_size"]
    example = torch.zeros(1, config["in_channels"], size, size)
    program = torch.export.export(segfast.fold_batchnorm(model), (example,))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, args.out, extra_files={EXPORT_CONFIG: json.dumps({**config, "image_size": size})})
    with torch.no_grad():
        difference = (program.module()(example + 0.5) - model(example + 0.5)).abs().max().item()
    print(
        f"wrote {args.out}: {config['model']} with BatchNorm folded, input (1, {config['in_channels']}, {size}, "
        f"{size}); max |exported - checkpoint| on a test input: {difference:.2e}"
    )
    return 0


def _model_for_prediction(path, backend):
    """(model, config) from a checkpoint, or from a program written by ``segfast export`` (.pt2)."""
    if str(path).endswith(".pt2"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"exported program {path} does not exist")
        extra = {EXPORT_CONFIG: ""}
        program = torch.export.load(path, extra_files=extra)
        if not extra[EXPORT_CONFIG]:
            raise ValueError(f"{path} was not written by `segfast export` (no {EXPORT_CONFIG} inside)")
        return program.module(), json.loads(extra[EXPORT_CONFIG])
    model, config, _ = _model_from_checkpoint(path, backend)
    return model, config


@torch.no_grad()
def run_predict(args) -> int:
    model, config = _model_for_prediction(args.checkpoint, args.backend)
    image = read_image(args.image)
    if str(args.checkpoint).endswith(".pt2") and image.shape[1:] != (config["image_size"],) * 2:
        raise ValueError(
            f"{args.checkpoint} was exported for {config['image_size']}x{config['image_size']} images, "
            f"{args.image} is {image.shape[2]}x{image.shape[1]}"
        )
    if image.shape[0] != config["in_channels"]:
        image = (
            image.mean(0, keepdim=True) if config["in_channels"] == 1 else image.expand(config["in_channels"], -1, -1)
        )
    if args.explain and str(args.checkpoint).endswith(".pt2"):
        raise ValueError("--explain needs a checkpoint (Grad-CAM reads the model's decoder block), not a .pt2")
    # --explain: the mask and the maps from one forward pass
    maps = explain(model, image, args.explain_class) if args.explain else None
    mask = maps.mask if maps is not None else two_class(model(image.unsqueeze(0))).argmax(1)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    classes = max(config["num_classes"], 2)
    write_mask_png(mask, args.out, classes)
    counts = torch.bincount(mask.flatten(), minlength=classes)
    present = ", ".join(f"{c}: {int(n)}" for c, n in enumerate(counts) if n)
    print(f"wrote {args.out} ({tuple(mask.shape)} palette PNG; pixels per class {present})")
    if maps is not None:
        _write_explanation(maps, image, args.out)
    return 0


def _write_explanation(maps: Explanation, image, out: Path) -> None:
    """The three overlays beside the mask: confidence, entropy (/ log C), Grad-CAM saliency."""
    from PIL import Image

    written = []
    for name, heat in (("confidence", maps.confidence), ("entropy", maps.entropy), ("saliency", maps.saliency)):
        path = out.with_name(f"{out.stem}_{name}.png")
        Image.fromarray(overlay(image, heat).numpy()).save(path)
        written.append(path.name)
    print(
        f"wrote {', '.join(written)} beside it: mean confidence {maps.confidence.mean():.3f}, mean entropy "
        f"{maps.entropy.mean():.3f} of log C, Grad-CAM of class {maps.saliency_class}"
    )
