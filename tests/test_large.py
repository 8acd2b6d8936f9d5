"""Tensors of more than 2^31 elements: every index computation must be 64-bit.

Needs about 12 GB of free memory; runs in `make fuzz` (SEGFAST_LARGE=1), skipped otherwise.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import segfast

ELEMENTS = 2**31 + 2**20


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


pytestmark = pytest.mark.skipif(
    not os.environ.get("SEGFAST_LARGE") or _available_bytes() < 14 * 2**30,
    reason="needs SEGFAST_LARGE=1 (make fuzz) and about 14 GB of free memory",
)


def _skip_simulation(device):
    if device.name == "cuda-sim":
        pytest.skip("2^31 simulated threads would take hours; the simulation's index math is the GPU's")


def test_max_pool2d_beyond_int32(device):
    _skip_simulation(device)
    # bfloat16 keeps the input at 4 GiB; the last plane starts beyond 2^31 elements
    x = torch.randn(1, ELEMENTS // 2**20, 1024, 1024, dtype=torch.bfloat16, device=device.device)
    assert x.numel() > 2**31
    out = segfast.ops.max_pool2d(x, 2)
    torch.testing.assert_close(out[:, -2:], F.max_pool2d(x[:, -2:], 2), rtol=0, atol=0)
    x.requires_grad_()
    grad = torch.zeros(out.shape, dtype=torch.bfloat16, device=device.device)
    grad[:, -1] = 1
    (g,) = torch.autograd.grad(segfast.ops.max_pool2d(x, 2), x, grad)
    assert g[:, -1].sum().item() == (1024 // 2) ** 2 and g[:, :-1].abs().sum().item() == 0


def test_cross_entropy_beyond_int32(device):
    _skip_simulation(device)
    classes = 4
    logits = torch.randn(1, classes, ELEMENTS // classes, dtype=torch.bfloat16, device=device.device)
    logits.requires_grad_()
    target = torch.randint(0, classes, (1, ELEMENTS // classes), dtype=torch.uint8, device=device.device)
    loss = segfast.ops.cross_entropy(logits, target, reduction="none")
    tail = slice(-4096, None)
    torch.testing.assert_close(
        loss[:, tail].float(),
        F.cross_entropy(logits[:, :, tail].float(), target[:, tail].long(), reduction="none"),
        rtol=2e-2,
        atol=2e-2,
    )
    (g,) = torch.autograd.grad(segfast.ops.cross_entropy(logits, target, reduction="sum"), logits)
    logits_tail = logits[:, :, tail].detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(logits_tail, target[:, tail].long(), reduction="sum"), logits_tail)
    torch.testing.assert_close(g[:, :, tail].float(), g_ref, rtol=2e-2, atol=2e-2)
