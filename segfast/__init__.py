"""segfast: fused CPU and CUDA kernels for image-segmentation training, as real torch ops.

``segfast.ops`` mirrors ``torch.nn.functional``; ``segfast.nn`` mirrors ``torch.nn``.
"""

import importlib.metadata as _metadata

import torch  # noqa: F401  (loads libtorch, which _C links against)

from segfast._build_info import TORCH_VERSION as _BUILT_FOR


def _check_torch_version() -> None:
    """A clear ImportError, instead of _C's undefined-symbol error, when the running torch is not
    the major.minor release segfast was compiled against (its C++ ABI changes between them)."""
    built, running = _BUILT_FOR.split("+")[0].split(".")[:2], torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"segfast was built against torch {_BUILT_FOR} but torch {torch.__version__} is installed; "
            f"its compiled ops only load in torch {'.'.join(built)}.x. Reinstall segfast in this environment "
            "(pip install --no-build-isolation --force-reinstall segfast, from source), or install the segfast "
            f"wheel built for torch {'.'.join(running)}, or torch {'.'.join(built)}."
        )


_check_torch_version()

from segfast import (  # noqa: E402
    _C,  # noqa: E402,F401  (registers torch.ops.segfast.*)
    nn,
    ops,
)
from segfast._C import build_info  # noqa: E402
from segfast.convert import ConversionReport, convert  # noqa: E402
from segfast.deploy import fold_batchnorm  # noqa: E402

__all__ = ["ConversionReport", "build_info", "convert", "fold_batchnorm", "nn", "ops"]
__version__ = _metadata.version("segfast")  # e.g. 0.1.0+cpu.torch2.13: what this build is for
