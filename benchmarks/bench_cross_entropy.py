"""cross_entropy: segfast vs F.cross_entropy (eager and torch.compile)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import segfast
from utils import Case, no_grad, saved_tensor_bytes

SHAPES = [(8, 21, 256, 256), (4, 150, 128, 128)]  # VOC-sized and ADE20K-sized class counts


def cases(variants: set[str]) -> list[Case]:
    return [_case(variants, *shape) for shape in SHAPES]


def _case(variants, n, c, h, w) -> Case:
    impls = {"eager": F.cross_entropy, "segfast": segfast.ops.cross_entropy,
             "segfast grad-in-fwd": lambda x, t: segfast.ops.cross_entropy(x, t, grad_in_forward=True)}
    if "compile" in variants:
        impls["compile"] = torch.compile(F.cross_entropy, fullgraph=True)
    logits = torch.randn(n, c, h, w, requires_grad=True)
    target = torch.randint(0, c, (n, h, w))
    return Case(
        op="cross_entropy",
        shape=f"{n}x{c}x{h}x{w}",
        forward={k: no_grad(lambda f=f: f(logits, target)) for k, f in impls.items()},
        forward_backward={k: lambda f=f: torch.autograd.grad(f(logits, target), logits) for k, f in impls.items()},
        saved_bytes={k: lambda f=f: saved_tensor_bytes(lambda: f(logits, target), [logits, target])
                     for k, f in impls.items()},
    )
