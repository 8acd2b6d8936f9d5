"""Seeing what ops allocate: every tensor returned in fresh memory, op by op."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class FreshOutputs(TorchDispatchMode):
    """Context manager recording ``(op name, size, stride, dtype)`` of every tensor an op returns
    in fresh memory, i.e. not a view or an in-place result of one of its inputs. Ops reached from
    autograd's backward on this thread are recorded too.

    >>> with FreshOutputs() as fresh:
    ...     loss = segfast.ops.cross_entropy(logits, target)
    >>> fresh.bytes()
    """

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.Size, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs:
                self.outputs.append((str(func), t.shape, t.stride(), t.dtype))
        return out

    def bytes(self) -> int:
        """Total bytes of the recorded tensors."""
        return sum(size.numel() * dtype.itemsize for _, size, _, dtype in self.outputs)
