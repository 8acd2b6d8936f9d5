"""What a benchmark row compares: one computation at one shape, run by several providers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# the four providers of the ops and models suites, in table order
EAGER, COMPILE, SEGFAST, SEGFAST_COMPILE = "eager", "compile", "segfast", "segfast+compile"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class Settings:
    device: str = "cpu"
    dtype: str = "float32"
    layout: str = "nchw"
    quick: bool = False
    compile: bool = True  # the torch.compile providers

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return LAYOUTS[self.layout]


@dataclass
class Case:
    """One computation (``step``: fwd, fwd+bwd, train step, inference) at one shape: each provider
    a callable doing it on the same tensors. ``items`` is images per call (for images/s);
    ``bytes_moved`` the least memory traffic of the step and ``flops`` its arithmetic, for the
    floor (flops are counted on the baseline with torch's FlopCounterMode when not given)."""

    suite: str
    name: str
    shape: str
    step: str
    providers: dict[str, Callable[[], object]]
    items: int
    settings: Settings
    baseline: str = EAGER
    bytes_moved: float = 0.0
    flops: float | None = None
    saved_bytes: dict[str, Callable[[], int]] = field(default_factory=dict)
    note: str = ""


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
