"""scikit-build-core metadata provider: the version and the torch requirement of this build.

A segfast binary only loads in the torch minor release it was compiled against, so the wheel says
so: the local version label names the build (``0.1.0+cpu.torch2.13``, ``0.1.0+cu130.torch2.14``)
and the requirement pins that minor (``torch==2.13.*``). The torch is the one in the building
interpreter (segfast builds with ``--no-build-isolation``). Without torch (an sdist, or pip's
isolated metadata step) the plain version and the supported range are given; the build itself
then stops in CMake.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

SUPPORTED_TORCH = "torch>=2.11,<2.15"


def _cuda_kernels(torch_cuda: str | None) -> bool:
    """What CMakeLists.txt decides for SEGFAST_CUDA=AUTO|ON|OFF (AUTO: CUDA torch and nvcc)."""
    mode = os.environ.get("SEGFAST_CUDA", "AUTO").upper()
    if mode in ("ON", "1", "TRUE"):
        return True
    if mode in ("OFF", "0", "FALSE"):
        return False
    return torch_cuda is not None and shutil.which("nvcc") is not None


def build_label() -> tuple[str, str] | None:
    """(local version label, torch requirement) for the torch installed here, or None."""
    try:
        import torch
    except ImportError:
        return None
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = torch.version.cuda
    flavour = "cu" + cuda.replace(".", "") if _cuda_kernels(cuda) and cuda else "cpu"
    return f"{flavour}.torch{major}.{minor}", f"torch=={major}.{minor}.*"


def dynamic_metadata(field: str, settings: Mapping[str, Any]):
    """The ``version`` (settings: ``base-version``) or the ``dependencies`` of this build."""
    found = build_label()
    if field == "version":
        return settings["base-version"] if found is None else f"{settings['base-version']}+{found[0]}"
    if field == "dependencies":
        return [SUPPORTED_TORCH if found is None else found[1], "numpy", "tqdm"]
    raise ValueError(f"wheel_metadata provides version and dependencies, not {field}")
