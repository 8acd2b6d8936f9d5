import subprocess
import sys

import torch

import segfast


def test_build_info_describes_this_build():
    info = segfast.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"]
    assert info["cuda"] is False and info["cuda_archs"] == []
    assert info["openmp"] is True  # without -fopenmp at::parallel_for would silently run serially
    assert info["num_threads"] == torch.get_num_threads()


def test_parallel_for_really_uses_every_thread():
    # at::parallel_for compiled without -fopenmp silently runs on one thread
    assert segfast.build_info()["parallel_for_threads"] == torch.get_num_threads()


def test_info_command_prints_build():
    out = subprocess.run([sys.executable, "-m", "segfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "built against torch" in out and "conv2d_act" in out and "cross_entropy" in out


def test_ops_are_registered_with_the_dispatcher():
    for name in ("conv2d_act", "max_pool2d", "avg_pool2d", "cross_entropy"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}_backward", "CPU")
