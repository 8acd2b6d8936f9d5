"""Every segfast op vs stock PyTorch (eager and torch.compile), measured side by side in one run.

    python benchmarks/bench_ops.py [--only cross_entropy,pooling,conv2d_act,linear_act] [--no-compile]
                                   [--reps N] [--out DIR]

Prints a Markdown table (median ms, ratio stock / segfast, bytes saved for backward beyond the
op's inputs) and writes DIR/ops-cpu.json. The "output floor" column is the time to allocate and
write once the tensors segfast's ops return, the part no kernel can remove.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_conv2d_act  # noqa: E402
import bench_cross_entropy  # noqa: E402
import bench_linear_act  # noqa: E402
import bench_pooling  # noqa: E402
from utils import FLOOR, Row, machine_info, markdown_table, output_floor, time_side_by_side, write_json  # noqa: E402

FAMILIES = {"cross_entropy": bench_cross_entropy, "pooling": bench_pooling, "conv2d_act": bench_conv2d_act,
            "linear_act": bench_linear_act}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated op families")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per variant")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)

    variants = {"eager", "segfast"} | (set() if args.no_compile else {"compile"})
    # one compiled stock function serves several shapes, layouts and grad modes
    torch._dynamo.config.recompile_limit = 64
    rows: list[Row] = []
    for family in args.only.split(","):
        for case in FAMILIES[family].cases(variants):
            print(f"... {case.op} {case.shape}", file=sys.stderr, flush=True)
            for mode, fns in (("fwd", case.forward), ("fwd+bwd", case.forward_backward)):
                fns = {**fns, FLOOR: output_floor(fns["segfast"])}
                times = time_side_by_side(fns, args.reps)
                for variant, ms in times.items():
                    saved = case.saved_bytes[variant]() if mode == "fwd+bwd" and variant in case.saved_bytes else None
                    rows.append(Row(case.op, case.shape, mode, variant, ms, saved))
    info = machine_info()
    print(f"\nsegfast ops on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"segfast {info['segfast_commit']}, {info['date']}\n")
    print(markdown_table(rows))
    write_json(args.out / "ops-cpu.json", rows, {"machine": info})
    print(f"\nwrote {args.out / 'ops-cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
