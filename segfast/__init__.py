"""segfast: fused CPU and CUDA kernels for image-segmentation training, as real torch ops.

The library (what a user's own training code imports):

- ``segfast.ops``: mirrors ``torch.nn.functional`` (each op a ``torch.ops.segfast.*`` op with a fake
  kernel and autograd);
- ``segfast.nn``: mirrors ``torch.nn`` (modules on those ops);
- ``segfast.augment``, ``segfast.metrics``: joint image + mask augmentation, segmentation metrics;
- ``segfast.convert`` / ``segfast.fold_batchnorm`` (``segfast.deploy``): swap segfast layers into
  existing models, fold BatchNorm for export.

The application built on it (the ``segfast`` command): ``segfast.models`` (SimpleCNN, UNet, FCN),
``segfast.data`` (digits data sets, folders of images), ``segfast.cli`` (train / eval / predict /
export / bench / info) and ``segfast.bench`` (the benchmark suites). Every module named here is
reachable as an attribute of ``segfast``.
"""

import hashlib as _hashlib
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

from segfast import _C  # noqa: E402,F401,I001  (first: registers torch.ops.segfast.*)


def _tag_compile_caches() -> None:
    """torch.compile's on-disk caches (FX graph, AOTAutograd) key a graph by the names of its ops,
    not by a custom op's schema (pytorch/pytorch#187319): a graph compiled against another segfast
    build would be replayed against this one's ops, arguments in the wrong places (seen: the
    backward of batch_norm_act after from_output was added). A digest of segfast's op schemas
    goes into the caches' key tag, beside any tag the user set."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag") or not hasattr(torch._C, "_dispatch_get_all_op_names"):
        return  # a torch without the tag (or the listing) has nothing to key
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("segfast::"))
    schemas = "\n".join(str(torch._C._get_schema(name, "")) for name in names)
    tag = "segfast-ops-" + _hashlib.sha256(schemas.encode()).hexdigest()[:16]
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag};{tag}" if config.cache_key_tag else tag


_tag_compile_caches()
from segfast import augment, data, metrics, models, nn, ops  # noqa: E402
from segfast._C import build_info  # noqa: E402
from segfast.convert import ConversionReport, convert  # noqa: E402
from segfast.deploy import fold_batchnorm  # noqa: E402

__all__ = [
    "ConversionReport",
    "augment",
    "build_info",
    "convert",
    "data",
    "fold_batchnorm",
    "metrics",
    "models",
    "nn",
    "ops",
]
__version__ = _metadata.version("segfast")  # e.g. 0.1.0+cpu.torch2.13: what this build is for
