"""segfast: fused CPU and CUDA kernels for image-segmentation training, as real torch ops.

``segfast.ops`` mirrors ``torch.nn.functional``; ``segfast.nn`` mirrors ``torch.nn``.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from segfast import _C  # noqa: F401  (registers torch.ops.segfast.*)
from segfast import nn, ops
from segfast._C import build_info
from segfast.convert import ConversionReport, convert

__all__ = ["ConversionReport", "build_info", "convert", "nn", "ops"]
__version__ = "0.1.0"
