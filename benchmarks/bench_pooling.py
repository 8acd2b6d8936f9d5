"""max_pool2d / avg_pool2d 2x2: segfast vs torch.nn.functional (eager and torch.compile)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import segfast
from utils import Case, no_grad, saved_tensor_bytes

SHAPE = (8, 64, 128, 128)


def cases(variants: set[str]) -> list[Case]:
    return [_case(variants, op, layout) for op in ("max_pool2d", "avg_pool2d")
            for layout in (torch.contiguous_format, torch.channels_last)]


def _case(variants, op, layout) -> Case:
    impls = {"eager": getattr(F, op), "segfast": getattr(segfast.ops, op)}
    if "compile" in variants:
        impls["compile"] = torch.compile(getattr(F, op), fullgraph=True)
    x = torch.randn(SHAPE).to(memory_format=layout).requires_grad_()
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2] // 2, SHAPE[3] // 2).to(memory_format=layout)
    return Case(
        op=f"{op} 2x2",
        shape="x".join(map(str, SHAPE)) + (" NHWC" if layout == torch.channels_last else ""),
        forward={k: no_grad(lambda f=f: f(x, 2)) for k, f in impls.items()},
        forward_backward={k: lambda f=f: torch.autograd.grad(f(x, 2), x, grad) for k, f in impls.items()},
        saved_bytes={k: lambda f=f: saved_tensor_bytes(lambda: f(x, 2), [x]) for k, f in impls.items()},
    )
