"""linear_act(relu): segfast.nn.LinearAct vs nn.Sequential(nn.Linear, nn.ReLU(inplace=True))
(eager and torch.compile)."""
from __future__ import annotations

import torch
from torch import nn

import segfast
from utils import Case, no_grad, saved_tensor_bytes

# (rows, in, out): the dense layer of a small CNN classifier at batch 256, and a wide one
SHAPES = [(256, 3136, 64), (4096, 1024, 1024)]


def cases(variants: set[str]) -> list[Case]:
    return [_case(variants, *shape) for shape in SHAPES]


def _case(variants, rows, fan_in, fan_out) -> Case:
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True))
    ours = segfast.nn.LinearAct(fan_in, fan_out, activation="relu")
    ours.load_state_dict(stock[0].state_dict())
    impls = {"eager": stock, "segfast": ours}
    if "compile" in variants:
        impls["compile"] = torch.compile(stock, fullgraph=True)
    x = torch.randn(rows, fan_in, requires_grad=True)
    grad = torch.randn(rows, fan_out)
    params = [*stock.parameters(), *ours.parameters()]
    return Case(
        op="linear_act relu",
        shape=f"{rows}x{fan_in} -> {fan_out}",
        forward={k: no_grad(lambda m=m: m(x)) for k, m in impls.items()},
        forward_backward={k: lambda m=m: torch.autograd.grad(m(x), [x, *m.parameters()], grad)
                          for k, m in impls.items()},
        saved_bytes={k: lambda m=m: saved_tensor_bytes(lambda: m(x), [x, *params]) for k, m in impls.items()},
    )
