"""Large CPU outputs (>= 8 MiB) come from segfast's cache of freed blocks (csrc/cpu/output_cache.h)."""

import os
import subprocess
import sys

import pytest
import torch

import segfast


def _gradient(logits, target):
    return torch.autograd.grad(segfast.ops.cross_entropy(logits, target), logits)[0]


def test_a_freed_large_output_is_reused_and_values_do_not_carry_over():
    logits = torch.randn(2, 21, 256, 256, requires_grad=True)  # 11 MiB gradient
    target = torch.randint(0, 21, (2, 256, 256))
    first = _gradient(logits, target)
    expected = first.clone()
    address = first.data_ptr()
    del first
    second = _gradient(logits * 2, target)  # another result into the reused block
    assert second.data_ptr() == address
    torch.testing.assert_close(
        second, torch.autograd.grad(torch.nn.functional.cross_entropy(logits * 2, target), logits)[0]
    )
    assert not torch.equal(second, expected)


def test_cached_storage_shrinks_but_does_not_grow():
    logits = torch.randn(2, 21, 256, 256, requires_grad=True)
    grad = _gradient(logits, torch.randint(0, 21, (2, 256, 256)))
    grad.resize_(10)
    with pytest.raises(RuntimeError, match="not resizable"):
        grad.resize_(2, 22, 256, 256)


def test_cache_can_be_turned_off():
    code = (
        "import torch, segfast\n"
        "x = torch.randn(2, 21, 256, 256, requires_grad=True); t = torch.randint(0, 21, (2, 256, 256))\n"
        "for scale in (1, 2):\n"
        "    g = torch.autograd.grad(segfast.ops.cross_entropy(x * scale, t), x)[0]\n"
        "    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(x * scale, t), x)[0]\n"
        "    torch.testing.assert_close(g, ref)\n"
        "    del g\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, SEGFAST_CPU_CACHE_MB="0"), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
