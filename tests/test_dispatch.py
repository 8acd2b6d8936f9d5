"""The CPU dispatch table (csrc/cpu/dispatch.h): generated from the committed dispatch results, the
C++ lookup answering as those results say at every measured point and falling back to ATen's path
outside them, and the forced paths really changing what runs."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import segfast
from segfast import _C, bench
from segfast.bench.dispatch import DIRECT, FORCED, VENDOR, forcing, grid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import update_dispatch  # noqa: E402

CHOICES = ["direct_conv_forward", "direct_conv_weight_grad", "channels_last_backward", "channels_last_forward"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def test_table_is_generated_from_the_committed_results():
    assert update_dispatch.render() == update_dispatch.TABLE.read_text(), "run python benchmarks/update_dispatch.py"


def _measured_points():
    for result in update_dispatch.RESULTS:
        rows = json.loads((ROOT / result).read_text())["rows"]
        for (choice, dtype, kernel, input_grad), speedups in update_dispatch.points(rows).items():
            for (cin, cout, pixels), speedup in speedups.items():
                yield choice, DTYPES[dtype], kernel, cin, cout, pixels, input_grad, speedup


def test_lookup_takes_segfast_exactly_where_it_was_measured_faster():
    points = list(_measured_points())
    assert len(points) > 100
    for choice, dtype, kernel, cin, cout, pixels, input_grad, speedup in points:
        expected = "segfast" if speedup >= update_dispatch.MARGIN else "vendor"
        assert _C.dispatch_choose(choice, dtype, kernel, cin, cout, pixels, input_grad) == expected, (
            choice,
            dtype,
            kernel,
            cin,
            cout,
            pixels,
            input_grad,
            speedup,
        )


@pytest.mark.parametrize("choice", CHOICES)
def test_unmeasured_shapes_take_the_vendor_path(choice):
    # a dtype, kernel, channel count or image size no row covers
    for dtype, kernel, cin, cout, pixels in [
        (torch.float16, 3, 3, 16, 128 * 128),
        (torch.float32, 9, 3, 16, 128 * 128),
        (torch.float32, 0, 3, 16, 128 * 128),  # non-square kernel
        (torch.float32, 3, 3, 4096, 128 * 128),
        (torch.float32, 3, 3, 16, 64 * 4096 * 4096),
        (torch.float32, 3, 512, 16, 128 * 128),
    ]:
        for input_grad in (False, True):
            assert _C.dispatch_choose(choice, dtype, kernel, cin, cout, pixels, input_grad) == "vendor"


def test_forcing_overrides_and_restores_the_table():
    key = (torch.float16, 9, 3, 16, 64, False)
    with forcing({"direct_conv_forward": "segfast"}):
        assert _C.dispatch_choose("direct_conv_forward", *key) == "segfast"
        assert _C.dispatch_choose("direct_conv_weight_grad", *key) == "vendor"
    assert _C.dispatch_choose("direct_conv_forward", *key) == "vendor"


@pytest.mark.parametrize(
    "args, message",
    [(("sideways", "segfast"), "unknown dispatch choice 'sideways'"), (("direct_conv_forward", "fast"), "'fast'")],
)
def test_bad_force_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        _C.dispatch_force(*args)


def _aten_ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_forced_paths_change_what_runs():
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)

    def step():
        segfast.ops.conv2d_act(x, w, None, padding=1).sum().backward()

    with forcing(FORCED[DIRECT]):
        direct = _aten_ops(step)
    with forcing(FORCED[VENDOR]):
        vendor = _aten_ops(step)
    # the direct kernel computes the forward and the weight gradient without ATen's convolution
    assert "aten::convolution" not in direct and "aten::convolution_backward" not in direct
    assert "aten::convolution" in vendor and "aten::convolution_backward" in vendor


def test_grid_reaches_the_direct_kernels_limits():
    # the first-layer axes span what the direct kernel serves (cpu/conv2d_act_direct.h), no more
    axes = grid(quick=False)
    assert max(axes["direct_in"]) == _C.direct_conv_max_input_channels
    assert max(axes["direct_k"]) == _C.direct_conv_max_kernel


def test_quick_dispatch_suite_feeds_the_table_script():
    rows, _ = bench.run(["dispatch"], bench.Settings(quick=True, compile=False), reps=1, progress=False)
    assert {r.provider for r in rows} == {"vendor", "channels_last", "direct"}
    measured = update_dispatch.points([dataclasses.asdict(r) for r in rows])
    pixels = {8 * 32 * 32, 8 * 64 * 64}
    assert measured.keys() == {
        ("direct_conv_forward", "float32", 3, False),
        ("channels_last_forward", "float32", 3, False),
        ("direct_conv_weight_grad", "float32", 3, False),
        ("channels_last_backward", "float32", 3, False),
        ("channels_last_backward", "float32", 3, True),
    }
    assert set(measured[("direct_conv_forward", "float32", 3, False)]) == {(3, 16, p) for p in pixels}
    assert set(measured[("channels_last_forward", "float32", 3, False)]) == {
        (c, 16, p) for c in (3, 16) for p in pixels
    }
    assert set(measured[("channels_last_backward", "float32", 3, True)]) == {
        (c, 16, p) for c in (3, 16) for p in pixels
    }
    assert all(s > 0 for speedups in measured.values() for s in speedups.values())
    # the suite forced paths only while timing
    key = (torch.float16, 3, 3, 16, 8 * 32 * 32, False)
    assert all(_C.dispatch_choose(choice, *key) == "vendor" for choice in CHOICES)
