"""Argument checking shared by the segfast op faces: every error names the argument, what was
expected and what came."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# dtypes the kernels compute in (float32 accumulation for the 16-bit ones)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = CPU_DTYPES + (torch.float16,)
# class indices: loss targets, predicted classes, augmentation masks (csrc/common/class_index.h)
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)
REDUCTIONS = ("none", "mean", "sum")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in for inputs of ``dtype`` (at::opmath_type): float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(op: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def float_dtypes(t: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The floating dtypes segfast's kernels take on t's device (float16 on CUDA only)."""
    on_cuda = isinstance(t, torch.Tensor) and t.device.type in ("cuda", "meta")
    return CUDA_DTYPES if on_cuda else CPU_DTYPES


def is_int(v) -> bool:
    """An int (or a symbolic one under torch.compile), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def pair(op: str, name: str, value, *, minimum: int | None = None) -> list[int]:
    """``value`` (an int or a sequence of 1 or 2 ints) as a list of two ints."""
    if type(value) is int or is_int(value):  # the type test first: the common case, at a fraction of the cost
        values = [value, value]
    elif isinstance(value, Sequence) and len(value) in (1, 2) and all(is_int(v) for v in value):
        values = list(value) * (2 // len(value))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(values)}")
    return values


def check_float_arg(op: str, name: str, value: float, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
        raise ValueError(f"{op}: {name} must be a finite float{bounds}, got {value}")
    return value


def check_tensor(op: str, name: str, t, *, dims: Sequence[int] | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {expected}, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} dtype must be one of {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_same(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` has the dtype and device of ``reference``."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on {reference.device}")
        if t.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} differs from {reference_name} dtype {reference.dtype}")


def check_kernel_available(op: str, qualname: str, t: torch.Tensor) -> None:
    """A clear error, instead of the dispatcher's, when this build has no kernel for t's device."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return  # dynamo cannot trace the dispatcher query; the dispatcher still refuses at run time
    key = "CPU" if t.device.type == "cpu" else t.device.type.upper()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        raise NotImplementedError(f"{op}: this segfast build has no {key} kernel (input is on {t.device})")


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout segfast's kernels keep, torch's rule (``Tensor.suggest_memory_format``):
    channels_last for a 4-D tensor whose strides order like NHWC, else contiguous. The C++ side
    applies the same rule (csrc/common/layout.h); this copy also works on fake tensors."""
    if t.dim() != 4:
        return torch.contiguous_format
    sizes, strides = t.shape, t.stride()
    # c10's is_channels_last_strides_2d: walk C, W, H, N with non-decreasing strides; ambiguous
    # size-1 cases fall back to NCHW as in torch
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return torch.channels_last


def entry(name: str):
    """How a Python face calls segfast::<name>: in eager mode through ``segfast._C.<name>``, a typed
    entry that goes through the dispatcher without torch.ops' Python-side argument parsing
    (csrc/bindings.cpp); where dynamo traces, through ``torch.ops.segfast.<name>.default``."""
    from segfast import _C

    return getattr(torch.ops.segfast, name).default if torch.compiler.is_compiling() else getattr(_C, name)


def class_vector(op, name, value, classes, input, scalar_rule):
    """``value`` as a (C,) tensor on input's device: a tensor or a sequence of C numbers as given, a
    number (or 0-D tensor) expanded by ``scalar_rule(value, classes)``, as MONAI reads these arguments."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
            raise TypeError(
                f"{op}: {name} must be a number, a sequence of {classes} numbers or a tensor, got {value!r}"
            )
        value = torch.tensor(value, dtype=torch.float64, device=input.device)
    if value.dim() == 0:
        value = scalar_rule(value, classes)
    check_tensor(op, name, value, dims=(1,))
    if value.shape[0] != classes:
        raise ValueError(f"{op}: {name} must have shape ({classes},), got {tuple(value.shape)}")
    if value.device != input.device:
        raise ValueError(f"{op}: {name} is on {value.device} but input is on {input.device}")
    return value


def every_class(value, classes):
    """class_vector's rule for one number: the same for every class."""
    return value.expand(classes)
