"""The ``ops`` suite: every segfast op vs its stock PyTorch counterpart, forward (under no_grad) and
forward + backward, with eager, torch.compile(stock), segfast and torch.compile(segfast)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.bench.cases import COMPILE, EAGER, SEGFAST, SEGFAST_COMPILE, Case, Settings, nbytes
from segfast.bench.measure import no_grad, saved_tensor_bytes

SUITE = "ops"
IGEMM = "segfast igemm"


def _providers(settings: Settings, stock: Callable, ours: Callable) -> dict[str, Callable]:
    """eager and segfast, and with settings.compile each under torch.compile(fullgraph=True)."""
    if not settings.compile:
        return {EAGER: stock, SEGFAST: ours}
    return {
        EAGER: stock,
        COMPILE: torch.compile(stock, fullgraph=True),
        SEGFAST: ours,
        SEGFAST_COMPILE: torch.compile(ours, fullgraph=True),
    }


def _pair_cases(
    settings: Settings,
    name: str,
    shape: str,
    stock: Callable,
    ours: Callable,
    inputs: list[torch.Tensor],
    wrt: list[torch.Tensor],
    grad: torch.Tensor | None,
    items: int,
    fwd_bytes: int,
    bwd_bytes: int,
    extra: dict[str, Callable] | None = None,
) -> Iterator[Case]:
    """The forward and forward + backward cases of ``stock(*inputs)`` vs ``ours(*inputs)`` (and
    ``extra`` providers, e.g. another segfast mode): the gradient is taken with respect to ``wrt``,
    ``grad`` is the output's gradient (None for a scalar loss)."""
    impls = _providers(settings, stock, ours) | (extra or {})
    yield Case(
        SUITE,
        name,
        shape,
        "fwd",
        {k: no_grad(lambda f=f: f(*inputs)) for k, f in impls.items()},
        items,
        settings,
        bytes_moved=fwd_bytes,
    )
    if not wrt:
        return
    yield Case(
        SUITE,
        name,
        shape,
        "fwd+bwd",
        {k: lambda f=f: torch.autograd.grad(f(*inputs), wrt, grad) for k, f in impls.items()},
        items,
        settings,
        bytes_moved=fwd_bytes + bwd_bytes,
        saved_bytes={k: lambda f=f: saved_tensor_bytes(lambda: f(*inputs), inputs) for k, f in impls.items()},
    )


def _image(settings: Settings, *shape: int, requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, device=settings.device, dtype=settings.torch_dtype).to(memory_format=settings.memory_format)
    return x.requires_grad_(requires_grad)


def cross_entropy(settings: Settings) -> Iterator[Case]:
    # VOC-sized and ADE20K-sized class counts
    shapes = [(4, 21, 128, 128)] if settings.quick else [(8, 21, 256, 256), (4, 150, 128, 128)]
    for n, c, h, w in shapes:
        logits = _image(settings, n, c, h, w)
        target = torch.randint(0, c, (n, h, w), device=settings.device)
        yield from _pair_cases(
            settings,
            "cross_entropy",
            f"{n}x{c}x{h}x{w}",
            F.cross_entropy,
            segfast.ops.cross_entropy,
            [logits, target],
            [logits],
            None,
            n,
            fwd_bytes=nbytes(logits, target),
            bwd_bytes=nbytes(logits, logits, target),
            extra={"segfast grad-in-fwd": _cross_entropy_grad_in_forward},
        )


def _cross_entropy_grad_in_forward(logits, target):
    return segfast.ops.cross_entropy(logits, target, grad_in_forward=True)


def pooling(settings: Settings) -> Iterator[Case]:
    n, c, h, w = (4, 32, 64, 64) if settings.quick else (8, 64, 128, 128)
    for op in ("max_pool2d", "avg_pool2d"):
        x = _image(settings, n, c, h, w)
        grad = torch.randn(n, c, h // 2, w // 2, device=settings.device, dtype=x.dtype).to(
            memory_format=settings.memory_format
        )
        stock, ours = getattr(F, op), getattr(segfast.ops, op)
        yield from _pair_cases(
            settings,
            f"{op} 2x2",
            f"{n}x{c}x{h}x{w}",
            lambda x, f=stock: f(x, 2),
            lambda x, f=ours: f(x, 2),
            [x],
            [x],
            grad,
            n,
            fwd_bytes=nbytes(x, grad),
            bwd_bytes=nbytes(grad, x),
        )


def conv2d_act(settings: Settings) -> Iterator[Case]:
    # (batch, in, out, size, input needs grad): a middle U-Net layer and the first layer of a network
    shapes = (
        [(4, 32, 32, 64, True), (4, 3, 16, 128, False)]
        if settings.quick
        else [(8, 64, 64, 128, True), (8, 3, 32, 256, False)]
    )
    for n, cin, cout, size, input_grad in shapes:
        torch.manual_seed(0)
        layer = nn.Conv2d(cin, cout, 3, padding=1)
        ours = segfast.nn.Conv2dAct(cin, cout, 3, padding=1, activation="relu")
        x = _image(settings, n, cin, size, size, requires_grad=input_grad)
        yield from _relu_after_cases(
            settings, "conv2d_act relu 3x3", f"{n}x{cin}x{size}x{size} -> {cout}", layer, ours, x, (n, cout, size, size)
        )


def linear_act(settings: Settings) -> Iterator[Case]:
    # (rows, in, out): the dense layer of a small CNN classifier at batch 256, and a wide one
    shapes = [(256, 3136, 64)] if settings.quick else [(256, 3136, 64), (4096, 1024, 1024)]
    for rows, fan_in, fan_out in shapes:
        torch.manual_seed(0)
        layer = nn.Linear(fan_in, fan_out)
        ours = segfast.nn.LinearAct(fan_in, fan_out, activation="relu")
        x = torch.randn(rows, fan_in, device=settings.device, dtype=settings.torch_dtype, requires_grad=True)
        yield from _relu_after_cases(
            settings, "linear_act relu", f"{rows}x{fan_in} -> {fan_out}", layer, ours, x, (rows, fan_out)
        )


def _relu_after_cases(settings, name, shape, layer: nn.Module, ours: nn.Module, x, out_shape) -> Iterator[Case]:
    """``layer`` then ReLU (stock) against segfast's fused ``ours`` with the layer's weights, on x;
    images (rank 4) in the suite's memory format. Stock and ours hold separate weights: gradients
    are taken w.r.t. each one's own."""
    stock = nn.Sequential(layer, nn.ReLU(inplace=True))
    ours.load_state_dict(layer.state_dict())
    layout = {"memory_format": settings.memory_format} if x.dim() == 4 else {}
    for m in (stock, ours):
        m.to(settings.device, settings.torch_dtype, **layout)
    grad = torch.randn(out_shape, device=settings.device, dtype=x.dtype).to(**layout)
    yield from _module_cases(
        settings, name, shape, stock, ours, x, x.requires_grad, grad, x.shape[0], fwd_bytes=nbytes(x, grad)
    )


def batch_norm_act(settings: Settings) -> Iterator[Case]:
    # a U-Net's first stage and a deep ResNet stage; training mode, as in a training step
    shapes = [(4, 32, 64, 64)] if settings.quick else [(8, 64, 128, 128), (8, 256, 32, 32)]
    for n, c, h, w in shapes:
        stock = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        ours = segfast.nn.BatchNormAct2d(c, activation="relu")
        for m in (stock, ours):
            m.to(settings.device, settings.torch_dtype)
        x = _image(settings, n, c, h, w)
        grad = torch.randn_like(x)
        yield from _module_cases(
            settings, "batch_norm_act relu", f"{n}x{c}x{h}x{w}", stock, ours, x, True, grad, n, nbytes(x, x)
        )


def _module_cases(
    settings, name, shape, stock: nn.Module, ours: nn.Module, x, input_grad, grad, items, fwd_bytes
) -> Iterator[Case]:
    params = [*stock.parameters(), *ours.parameters()]
    impls = _providers(settings, stock, ours)
    owner = {EAGER: stock, COMPILE: stock, SEGFAST: ours, SEGFAST_COMPILE: ours, IGEMM: ours}
    if settings.device == "cuda" and isinstance(ours, segfast.nn.Conv2dAct):
        impls[IGEMM] = _with_env("SEGFAST_CUDA_CONV", "igemm", ours)  # the opt-in implicit-GEMM path

    def fwd_bwd(key):
        wrt = ([x] if input_grad else []) + list(owner[key].parameters())
        return lambda: torch.autograd.grad(impls[key](x), wrt, grad)

    yield Case(
        SUITE,
        name,
        shape,
        "fwd",
        {k: no_grad(lambda m=m: m(x)) for k, m in impls.items()},
        items,
        settings,
        bytes_moved=fwd_bytes,
    )
    yield Case(
        SUITE,
        name,
        shape,
        "fwd+bwd",
        {k: fwd_bwd(k) for k in impls},
        items,
        settings,
        bytes_moved=2 * fwd_bytes + (nbytes(x) if input_grad else 0),
        saved_bytes={k: lambda m=m: saved_tensor_bytes(lambda: m(x), [x, *params]) for k, m in impls.items()},
    )


def _with_env(name: str, value: str, fn: Callable) -> Callable:
    """``fn`` called with environment variable ``name`` set (segfast reads the igemm opt-in per call)."""

    def run(*args):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return run


def segmentation_losses(settings: Settings) -> Iterator[Case]:
    n, c, h, w = (4, 21, 128, 128) if settings.quick else (8, 21, 256, 256)
    logits = _image(settings, n, c, h, w)
    target = torch.randint(0, c, (n, h, w), device=settings.device)
    yield from _pair_cases(
        settings,
        "dice_loss",
        f"{n}x{c}x{h}x{w}",
        stock_dice,
        segfast.ops.dice_loss,
        [logits, target],
        [logits],
        None,
        n,
        fwd_bytes=nbytes(logits, target),
        bwd_bytes=nbytes(logits, logits, target),
    )
    yield from _pair_cases(
        settings,
        "focal_loss",
        f"{n}x{c}x{h}x{w}",
        stock_focal,
        segfast.ops.focal_loss,
        [logits, target],
        [logits],
        None,
        n,
        fwd_bytes=nbytes(logits, target),
        bwd_bytes=nbytes(logits, logits, target),
    )


def stock_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """MONAI's DiceLoss(softmax=True, to_onehot_y=True) written in stock PyTorch."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = list(range(2, logits.dim()))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


def stock_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    log_p = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def sigmoid_losses(settings: Settings) -> Iterator[Case]:
    """Binary Dice + BCE on one-channel masks, multi-label focal on C channels."""
    n, h, w = (4, 256, 256) if settings.quick else (8, 512, 512)
    logits = _image(settings, n, 1, h, w)
    mask = torch.randint(0, 2, (n, 1, h, w), device=settings.device).to(logits.dtype)
    yield from _pair_cases(
        settings,
        "dice_bce_loss",
        f"{n}x1x{h}x{w}",
        stock_dice_bce,
        lambda x, t: segfast.ops.dice_bce_loss(x, t, mode="binary"),
        [logits, mask],
        [logits],
        None,
        n,
        fwd_bytes=nbytes(logits, mask),
        bwd_bytes=nbytes(logits, logits, mask),
    )
    c = 5
    logits = _image(settings, n, c, h // 2, w // 2)
    labels = torch.randint(0, 2, (n, c, h // 2, w // 2), device=settings.device).to(logits.dtype)
    yield from _pair_cases(
        settings,
        "sigmoid_focal_loss",
        f"{n}x{c}x{h // 2}x{w // 2}",
        stock_sigmoid_focal,
        lambda x, t: segfast.ops.focal_loss(x, t, mode="multilabel", alpha=0.25),
        [logits, labels],
        [logits],
        None,
        n,
        fwd_bytes=nbytes(logits, labels),
        bwd_bytes=nbytes(logits, logits, labels),
    )


def stock_dice_bce(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Binary Dice + BCE as usually written: sigmoid, sums per (sample, class), and
    F.binary_cross_entropy_with_logits."""
    p = torch.sigmoid(logits)
    dims = list(range(2, logits.dim()))
    dice = 1 - (2 * (p * target).sum(dims) + smooth) / (p.sum(dims) + target.sum(dims) + smooth)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def stock_sigmoid_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss(alpha=0.25, gamma=2, reduction="mean"), its code."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** 2)
    return ((0.25 * target + 0.75 * (1 - target)) * loss).mean()


def confusion_matrix(settings: Settings) -> Iterator[Case]:
    n, c, h, w = (4, 21, 128, 128) if settings.quick else (8, 21, 256, 256)
    logits = _image(settings, n, c, h, w, requires_grad=False)
    target = torch.randint(0, c, (n, h, w), device=settings.device)

    def stock(logits, target):
        return torch.bincount(target.flatten() * c + logits.argmax(1).flatten(), minlength=c * c).view(c, c)

    yield from _pair_cases(
        settings,
        "confusion_matrix",
        f"{n}x{c}x{h}x{w}",
        stock,
        lambda x, t: segfast.ops.confusion_matrix(x, t, c),
        [logits, target],
        [],
        None,
        n,
        fwd_bytes=nbytes(logits, target),
        bwd_bytes=0,
    )


def softmax_stats(settings: Settings) -> Iterator[Case]:
    n, c, h, w = (4, 21, 128, 128) if settings.quick else (8, 21, 256, 256)
    logits = _image(settings, n, c, h, w, requires_grad=False)

    def stock(logits):
        p = logits.softmax(1)
        return logits.argmax(1), p.amax(1), torch.special.entr(p).sum(1)

    yield from _pair_cases(
        settings,
        "softmax_stats",
        f"{n}x{c}x{h}x{w}",
        stock,
        segfast.ops.softmax_stats,
        [logits],
        [],
        None,
        n,
        fwd_bytes=nbytes(logits) + n * h * w * (8 + 2 * logits.element_size()),
        bwd_bytes=0,
    )


FAMILIES = {
    "batch_norm_act": batch_norm_act,
    "cross_entropy": cross_entropy,
    "pooling": pooling,
    "conv2d_act": conv2d_act,
    "linear_act": linear_act,
    "segmentation_losses": segmentation_losses,
    "sigmoid_losses": sigmoid_losses,
    "confusion_matrix": confusion_matrix,
    "softmax_stats": softmax_stats,
}


def cases(settings: Settings, only: list[str] | None = None) -> Iterator[Case]:
    for family in only or FAMILIES:
        yield from FAMILIES[family](settings)
