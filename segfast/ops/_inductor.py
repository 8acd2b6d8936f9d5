"""What inductor sees of segfast's ops under ``torch.compile``.

A segfast op is an opaque call to inductor: it cannot fuse it with its neighbours or change its
layout. Where inductor's own code for the same math wins, an op registers a decomposition here
(``for_inductor``): inductor then traces the op as stock aten ops, with the same values and the
same saved tensors; the decomposition returns ``NotImplemented`` for the calls where segfast's
kernel wins, which then stay segfast's. Eager mode never sees these.

The decompositions go into inductor's table when ``torch._inductor.decomposition`` is imported
(at the first ``torch.compile``), not at ``import segfast``: importing inductor takes seconds.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

_MODULE = "torch._inductor.decomposition"
_DECOMPOSITIONS: dict[str, Callable] = {}


def for_inductor(op: str) -> Callable[[Callable], Callable]:
    """Registers the decorated function as inductor's decomposition of ``op`` ("segfast::name")."""

    def register(fn: Callable) -> Callable:
        _DECOMPOSITIONS[op] = fn
        if _MODULE in sys.modules:
            _install(sys.modules[_MODULE], {op: fn})
        return fn

    return register


def keep_segfast_kernel(op: str):
    """What a decomposition returns for a call that stays segfast's kernel: NotImplemented, after
    making sure inductor has its fallback (an extern call) for the op - inductor refuses to create
    one by itself for an op that has a decomposition."""
    import torch
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    namespace, name = op.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    if overload not in lowering.lowerings:
        constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(overload, with_default=True))
        lowering.make_fallback(overload, layout_constraint=constraint, override_decomp=True)
    return NotImplemented


def _install(module, decompositions: dict[str, Callable]) -> None:
    import torch

    for name, fn in decompositions.items():
        namespace, op = name.split("::")
        overload = getattr(getattr(torch.ops, namespace), op).default
        module.decompositions[overload] = fn


class _AfterInductorImport(importlib.abc.MetaPathFinder):
    """Runs _install once inductor's decomposition module has executed (a one-shot import hook)."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _install(module, _DECOMPOSITIONS)

        spec.loader.exec_module = exec_module
        return spec


if _MODULE not in sys.modules:
    sys.meta_path.insert(0, _AfterInductorImport())
