"""conv2d_act(relu): segfast.nn.Conv2dAct vs nn.Sequential(nn.Conv2d, nn.ReLU(inplace=True))
(eager and torch.compile)."""
from __future__ import annotations

import torch
from torch import nn

import segfast
from utils import Case, no_grad, saved_tensor_bytes

# (batch, in, out, size, input needs grad): a middle U-Net layer and the first layer of a network
SHAPES = [(8, 64, 64, 128, True), (8, 3, 32, 256, False)]


def cases(variants: set[str]) -> list[Case]:
    return [_case(variants, *shape) for shape in SHAPES]


def _case(variants, n, cin, cout, size, input_grad) -> Case:
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))
    ours = segfast.nn.Conv2dAct(cin, cout, 3, padding=1, activation="relu")
    ours.load_state_dict(stock[0].state_dict())
    impls = {"eager": stock, "segfast": ours}
    if "compile" in variants:
        impls["compile"] = torch.compile(stock, fullgraph=True)
    x = torch.randn(n, cin, size, size, requires_grad=input_grad)
    grad = torch.randn(n, cout, size, size)
    params = [*stock.parameters(), *ours.parameters()]

    def fwd_bwd(model):
        wrt = ([x] if input_grad else []) + list(model.parameters())
        return torch.autograd.grad(model(x), wrt, grad)

    return Case(
        op="conv2d_act relu 3x3",
        shape=f"{n}x{cin}x{size}x{size} -> {cout}",
        forward={k: no_grad(lambda m=m: m(x)) for k, m in impls.items()},
        forward_backward={k: lambda m=m: fwd_bwd(m) for k, m in impls.items()},
        saved_bytes={k: lambda m=m: saved_tensor_bytes(lambda: m(x), [x, *params]) for k, m in impls.items()},
    )
