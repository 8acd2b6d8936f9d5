import os
import subprocess
import sys

import pytest
import torch

import segfast


def test_build_info_describes_this_build():
    info = segfast.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"]
    if torch.version.cuda is None:  # a CPU-only torch: no CUDA kernels can be linked
        assert info["cuda"] is False and info["cuda_archs"] == []
    if info["cuda"]:
        assert info["cuda_archs"] and info["nvcc"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert info["openmp"] is True  # without -fopenmp at::parallel_for would silently run serially
    assert info["num_threads"] == torch.get_num_threads()


def test_parallel_for_really_uses_every_thread():
    # at::parallel_for compiled without -fopenmp silently runs on one thread
    assert segfast.build_info()["parallel_for_threads"] == torch.get_num_threads()


def test_info_command_prints_build():
    out = subprocess.run([sys.executable, "-m", "segfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "built against torch" in out
    listed = next(line for line in out.splitlines() if line.startswith("ops")).split(None, 1)[1].split(", ")
    public = {"affine_augment", "avg_pool2d", "confusion_matrix", "conv2d_act", "cross_entropy", "dice_sums"}
    public |= {"focal_loss", "linear_act", "max_pool2d", "softmax_stats"}
    assert public <= set(listed), listed


def test_every_module_of_the_package_is_an_attribute():
    """The README writes segfast.metrics.SegmentationMetrics(21): it works after import segfast alone."""
    code = (
        "import segfast; segfast.metrics.SegmentationMetrics(21); segfast.augment.RandomAffine(rotate=10); "
        "segfast.models.UNet(1, 2, base_width=4, depth=1); segfast.data.DigitsSegmentation; segfast.nn; segfast.ops"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


OPS = ("conv2d_act", "linear_act", "max_pool2d", "avg_pool2d", "cross_entropy", "batch_norm_act")


def test_ops_are_registered_with_the_dispatcher():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}_backward", "CPU")


@pytest.mark.skipif(
    os.environ.get("SEGFAST_EXPECT_CUDA") != "1" and not segfast.build_info()["cuda"],
    reason="CPU-only build (CI sets SEGFAST_EXPECT_CUDA=1 for its CUDA build)",
)
def test_cuda_kernels_are_registered_with_the_dispatcher():
    # without a GPU the CUDA kernels cannot run, but a CUDA build must have registered every one
    assert segfast.build_info()["cuda"], "expected a build with CUDA kernels (SEGFAST_EXPECT_CUDA=1)"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}_backward", "CUDA")


def test_mismatched_torch_gives_a_clear_import_error():
    # fake the recorded build version; the real _C is never loaded
    code = (
        "import sys, types; fake = types.ModuleType('segfast._build_info'); fake.TORCH_VERSION = '2.9.1+cpu'; "
        "sys.modules['segfast._build_info'] = fake\n"
        "try:\n    import segfast\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"built against torch 2.9.1+cpu but torch {torch.__version__} is installed" in out
    assert "Reinstall segfast" in out


def test_package_version_names_the_torch_and_kernels_it_was_built_for():
    # tools/wheel_metadata.py: the local label a wheel (or this editable install) carries, and its torch pin
    import importlib.metadata

    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    flavour = "cu" + torch.version.cuda.replace(".", "") if segfast.build_info()["cuda"] else "cpu"
    assert segfast.__version__ == importlib.metadata.version("segfast")
    assert segfast.__version__.endswith(f"+{flavour}.torch{major_minor}")
    assert f"torch=={major_minor}.*" in importlib.metadata.requires("segfast")


def test_compile_caches_are_keyed_by_segfast_op_schemas():
    # torch.compile's on-disk caches key graphs by op names only: segfast adds a digest of its
    # schemas to their key tag, so a graph compiled against another build is not replayed here
    import hashlib

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("segfast::"))
    assert "segfast::batch_norm_act_backward" in names
    digest = hashlib.sha256("\n".join(str(torch._C._get_schema(n, "")) for n in names).encode()).hexdigest()[:16]
    assert f"segfast-ops-{digest}" in torch.compiler.config.cache_key_tag
    env = dict(os.environ, TORCH_COMPILE_CACHE_KEY_TAG="mine")  # a user's own tag is kept
    out = subprocess.run(
        [sys.executable, "-c", "import torch, segfast; print(torch.compiler.config.cache_key_tag)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == f"mine;segfast-ops-{digest}"


def test_the_simulated_backend_runs_the_cuda_kernels(device):
    """Under the device fixture's "cuda-sim", segfast's Python faces run the simulated CUDA kernels:
    with the simulated stream capturing, a bad class index gives the CUDA path's NaN, where the CPU
    kernel raises (tests/conftest.py)."""
    if device.name != "cuda-sim":
        pytest.skip("the routing of the simulation only")
    import segfast._cuda_sim

    x, target = torch.randn(2, 3, 5), torch.full((2, 5), 3)
    segfast._cuda_sim.set_stream_capturing(True)
    try:
        assert segfast.ops.cross_entropy(x, target).isnan()
    finally:
        segfast._cuda_sim.set_stream_capturing(False)
    with pytest.raises(IndexError, match="target class 3"):
        segfast.ops.cross_entropy(x, target)
