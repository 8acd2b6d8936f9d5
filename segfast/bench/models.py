"""The ``models`` suite: U-Net and FCN, a training step (forward + cross-entropy + backward + SGD
step) and inference, stock layers vs segfast's, each eager and under torch.compile; and, where
segmentation_models_pytorch is installed, its ResNet-18 U-Net as users have it against the same
model through ``segfast.convert`` (channels_last parameters: the network runs channels_last).

Inference compares what each side deploys: the stock model in eval mode (compiled with inductor's
``freezing``, which folds BatchNorm into the convolutions and constant weights), and segfast's model
after ``segfast.fold_batchnorm``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import segfast
from segfast.bench.cases import COMPILE, EAGER, SEGFAST, SEGFAST_COMPILE, Case, Settings
from segfast.models import FCN, UNet

SUITE = "models"
NUM_CLASSES = 21
RESNET18_UNET = "resnet18_unet"  # segmentation_models_pytorch's Unet("resnet18"), where installed


def _build(name: str, backend: str, settings: Settings) -> torch.nn.Module:
    width = 16 if settings.quick else 32
    depth = 3 if settings.quick else 4
    if name == "unet":
        # the reference configuration: base width 32, BatchNorm, depth 4
        model = UNet(3, NUM_CLASSES, base_width=width, depth=depth, norm="batch", backend=backend)
    elif name == "unet_iabn":
        # InPlace-ABN: leaky_relu, segfast's BatchNorm + act overwriting each convolution's output
        model = UNet(
            3, NUM_CLASSES, base_width=width, depth=depth, norm="inplace_abn", activation="leaky_relu", backend=backend
        )
    else:
        model = FCN(3, NUM_CLASSES, variant="8s", base_width=width, backend=backend)
    model = model.to(settings.device, settings.torch_dtype)
    # the channels_last suite converts both models; in the NCHW suite segfast's keeps the layout it
    # chose (parameters channels_last: each convolution would otherwise copy its weight every call)
    return model.to(memory_format=torch.channels_last) if settings.layout == "channels_last" else model


def _pair(name: str, settings: Settings) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    if name == RESNET18_UNET:
        import segmentation_models_pytorch as smp

        stock = smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)
        stock = stock.to(settings.device, settings.torch_dtype, memory_format=settings.memory_format)
        ours, _ = segfast.convert(stock)
        return stock, ours.to(memory_format=torch.channels_last)
    stock = _build(name, "torch", settings)
    ours = _build(name, "segfast", settings)
    ours.load_state_dict(stock.state_dict())  # same parameter names on both backends
    return stock, ours


def _smp_installed() -> bool:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _train_step(model: torch.nn.Module, loss_fn, images, masks):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _inference(model: torch.nn.Module, images):
    def run():
        with torch.no_grad():
            return model(images)

    return run


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    batch, size = (4, 64) if settings.quick else (8, 128)
    names = only or (("unet", "fcn") if settings.quick else ("unet", "unet_iabn", "fcn", RESNET18_UNET))
    for name in names:
        if name == RESNET18_UNET and not _smp_installed():
            continue
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=g).to(settings.device, settings.torch_dtype)
        images = images.contiguous(memory_format=settings.memory_format)
        masks = torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g).to(settings.device)
        shape = f"{batch}x3x{size}x{size}"

        stock, ours = _pair(name, settings)
        models = {EAGER: stock, SEGFAST: ours}
        losses = {EAGER: F.cross_entropy, SEGFAST: segfast.ops.cross_entropy}
        if settings.compile:
            compiled_stock, compiled_ours = _pair(name, settings)
            models = {
                EAGER: stock,
                COMPILE: torch.compile(compiled_stock),
                SEGFAST: ours,
                SEGFAST_COMPILE: torch.compile(compiled_ours),
            }
            losses |= {COMPILE: F.cross_entropy, SEGFAST_COMPILE: segfast.ops.cross_entropy}
        yield Case(
            SUITE,
            name,
            shape,
            "train step",
            {k: _train_step(m, losses[k], images, masks) for k, m in models.items()},
            batch,
            settings,
            note="segfast's model runs channels_last inside (NCHW batch in, NCHW logits out)"
            if name != RESNET18_UNET
            else "segfast: segfast.convert of the smp model, parameters channels_last",
        )
        if name == RESNET18_UNET:
            continue  # inference: the converted model's BatchNorms are fused with their activations

        stock, ours = (m.eval() for m in _pair(name, settings))
        deployed = {EAGER: stock, SEGFAST: segfast.fold_batchnorm(ours)}
        if settings.compile:
            deployed = {
                EAGER: stock,
                COMPILE: torch.compile(stock, options={"freezing": True}),
                SEGFAST: deployed[SEGFAST],
                SEGFAST_COMPILE: torch.compile(deployed[SEGFAST], options={"freezing": True}),
            }
        yield Case(
            SUITE,
            name,
            shape,
            "inference",
            {k: _inference(m, images) for k, m in deployed.items()},
            batch,
            settings,
            note="segfast: fold_batchnorm, channels_last inside; both compiles: inductor freezing",
        )
