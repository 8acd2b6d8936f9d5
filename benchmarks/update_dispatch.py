"""Writes csrc/cpu/dispatch_table.inc, the table segfast's CPU kernels choose their path from
(csrc/cpu/dispatch.h), from the dispatch suite's committed result files (tests/test_dispatch.py
checks that the two agree):

    segfast bench --suite dispatch --no-compile --dtype float32 --out /tmp/d  # and --dtype bfloat16
    cp /tmp/d/bench-cpu-float32-nchw.json benchmarks/results/dispatch-cpu-float32.json  # ...
    python benchmarks/update_dispatch.py

A point is a win for segfast's path where it ran at least ``MARGIN`` times faster than every other
path measured there (medians of one interleaved run). A row is a box of shapes, per (choice, dtype,
kernel, grad_input): a range of input channels x a range of output channels x a range of output
pixels (the whole batch's), whose every measured grid point was a win; shapes between grid points inside a
box take the box's path, everything else ATen's.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segfast.bench.dispatch import BACKWARD, BACKWARD_WEIGHT, CHANNELS_LAST, DIRECT, FORWARD, VENDOR  # noqa: E402

RESULTS = [
    "benchmarks/results/dispatch-cpu-float32.json",
    "benchmarks/results/dispatch-cpu-bfloat16.json",
]  # float64 is not measured: ATen's path everywhere (oneDNN does not take float64; nor do training runs)
TABLE = ROOT / "csrc/cpu/dispatch_table.inc"
MARGIN = 1.10  # a closer call stays with ATen: one run's noise (up to ~10% on these VMs) must not pick a path
CPP_DTYPE = {"float32": "Float", "bfloat16": "BFloat16", "float64": "Double"}
CHOICE = {
    "direct_conv_forward": "DirectConvForward",
    "direct_conv_weight_grad": "DirectConvWeightGrad",
    "channels_last_backward": "ChannelsLastBackward",
    "channels_last_forward": "ChannelsLastForward",
}
SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+) -> (\d+) k(\d+)")


def points(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """{(choice, dtype, kernel, grad_input): {(in, out, pixels): speedup of segfast's path over the
    fastest other path}} from one result file's rows."""
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        times[(r["name"], r["shape"], r["dtype"])][r["provider"]] = r["median_ms"]
    out: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for (name, shape, dtype), ms in times.items():
        batch, cin, height, width, cout, k = map(int, SHAPE.fullmatch(shape).groups())
        where = (cin, cout, batch * height * width)
        if name == FORWARD:
            out[("channels_last_forward", dtype, k, False)][where] = (
                min(ms[VENDOR], ms.get(DIRECT, ms[VENDOR])) / ms[CHANNELS_LAST]
            )
            if DIRECT in ms:
                out[("direct_conv_forward", dtype, k, False)][where] = min(ms[VENDOR], ms[CHANNELS_LAST]) / ms[DIRECT]
            continue
        input_grad = name == BACKWARD
        assert name in (BACKWARD, BACKWARD_WEIGHT), name
        out[("channels_last_backward", dtype, k, input_grad)][where] = ms[VENDOR] / ms[CHANNELS_LAST]
        if DIRECT in ms:
            out[("direct_conv_weight_grad", dtype, k, False)][where] = min(ms[VENDOR], ms[CHANNELS_LAST]) / ms[DIRECT]
    return out


def _runs(values: list, wins) -> list[tuple]:
    """Maximal runs of consecutive grid values (in grid order) for which wins(v) holds: [(first, last)]."""
    runs, start, last = [], None, None
    for v in values:
        if wins(v):
            start, last = (v if start is None else start), v
        elif start is not None:
            runs.append((start, last))
            start = None
    if start is not None:
        runs.append((start, last))
    return runs


def boxes(speedup: dict[tuple, float]) -> list[dict]:
    """Boxes (in_lo, in_hi, out_lo, out_hi, pixels_lo, pixels_hi) covering only winning grid points:
    pixel runs per (in, out), merged over consecutive out values with the same run, then over
    consecutive in values with the same (out, pixels) boxes."""
    ins = sorted({p[0] for p in speedup})
    outs = sorted({p[1] for p in speedup})
    pixel_values = sorted({p[2] for p in speedup})

    def win(cin, cout, px):
        return speedup.get((cin, cout, px), 0.0) >= MARGIN

    per_in = {}
    for cin in ins:
        pixel_runs = {cout: _runs(pixel_values, lambda s, ci=cin, co=cout: win(ci, co, s)) for cout in outs}
        found = set()
        for run in {r for rs in pixel_runs.values() for r in rs}:
            for out_run in _runs(outs, lambda co, r=run, runs=pixel_runs: r in runs[co]):
                found.add((*out_run, *run))
        per_in[cin] = frozenset(found)
    result = []
    for shape in {b for bs in per_in.values() for b in bs}:
        for in_lo, in_hi in _runs(ins, lambda ci, b=shape: b in per_in[ci]):
            out_lo, out_hi, px_lo, px_hi = shape
            inside = [
                s
                for (ci, co, px), s in speedup.items()
                if in_lo <= ci <= in_hi and out_lo <= co <= out_hi and px_lo <= px <= px_hi
            ]
            result.append({"in": (in_lo, in_hi), "out": (out_lo, out_hi), "pixels": (px_lo, px_hi), "speedups": inside})
    return sorted(result, key=lambda b: (b["in"], b["out"], b["pixels"]))


def render() -> str:
    lines = [
        "// Generated by benchmarks/update_dispatch.py from the dispatch suite's results: do not edit.",
        "// Row: choice, dtype, kernel, grad_input, input channels, output channels, output pixels of the",
        "// batch (each a closed range), segfast's speedup at the box's least favourable point, points.",
    ]
    rows = []
    for result in RESULTS:
        data = json.loads((ROOT / result).read_text())
        env = data["environment"]
        lines.append(
            f"// {Path(result).name}: {env['date']}, torch {env['torch']}, {env['cpu']} x{env['threads']} threads,"
            f" segfast {env['segfast_commit']}"
        )
        for (choice, dtype, k, input_grad), speedup in sorted(points(data["rows"]).items()):
            for b in boxes(speedup):
                slowest = min(b["speedups"])
                rows.append(
                    f"    {{Choice::{CHOICE[choice]}, c10::ScalarType::{CPP_DTYPE[dtype]}, {k}, "
                    f"{'true' if input_grad else 'false'}, {b['in'][0]}, {b['in'][1]}, {b['out'][0]}, {b['out'][1]}, "
                    f"{b['pixels'][0]}, {b['pixels'][1]}, {slowest:.2f}, {len(b['speedups'])}}},"
                )
    lines.append(f"constexpr std::array<Row, {len(rows)}> kRows = {{{{")
    lines += rows
    lines.append("}};")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    TABLE.write_text(render())
    print(f"wrote {TABLE.relative_to(ROOT)} from {', '.join(RESULTS)}")
