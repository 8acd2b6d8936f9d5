"""segfast's CUDA kernels vs stock PyTorch (eager and torch.compile) on one GPU, side by side.

    python benchmarks/bench_gpu.py [--reps N] [--no-compile] [--out DIR]

Segmentation-sized cases, fp32 and bf16, NCHW and channels_last: cross-entropy 8x19x512x1024,
max/avg pooling 16x64x256x256, conv2d_act 3x3 16x64->64x256x256 (general path, and the custom
implicit-GEMM path as "segfast-igemm" where eligible), linear_act. Times are medians of CUDA-event
timings, interleaved; memory is the peak allocated during one forward+backward above what was
allocated before it. Writes DIR/ops-cuda.json and DIR/ops-cuda.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import segfast  # noqa: E402
from utils import Row, cuda_peak_bytes, machine_info, markdown_table, time_side_by_side, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def with_env(name, value, fn):
    """fn run with environment variable `name` set (the igemm opt-in is read per call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def cases(compile_stock: bool):
    """(op, shape, {variant: forward+backward callable})."""
    for dname, dtype in DTYPES.items():
        for lname, layout in LAYOUTS.items():
            logits = torch.randn(8, 19, 512, 1024, device="cuda", dtype=dtype).to(memory_format=layout)
            logits.requires_grad_()
            target = torch.randint(0, 19, (8, 512, 1024), device="cuda")

            def ce(fn, logits=logits, target=target):
                return lambda: torch.autograd.grad(fn(logits, target), logits)

            stock_ce = lambda x, t: F.cross_entropy(x, t)  # noqa: E731
            yield ("cross_entropy", f"8x19x512x1024 {dname} {lname}",
                   {"eager": ce(stock_ce), "segfast": ce(segfast.ops.cross_entropy),
                    "segfast-grad-in-fwd": ce(lambda x, t: segfast.ops.cross_entropy(x, t, grad_in_forward=True))}
                   | ({"compile": ce(torch.compile(stock_ce))} if compile_stock else {}))
            del logits, target

            x = torch.randn(16, 64, 256, 256, device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
            for op, stock, ours in (("max_pool2d", F.max_pool2d, segfast.ops.max_pool2d),
                                    ("avg_pool2d", F.avg_pool2d, segfast.ops.avg_pool2d)):
                def pool(fn, x=x):
                    return lambda: torch.autograd.grad(fn(x, 2).sum(), x)
                fns = {"eager": pool(stock), "segfast": pool(ours)}
                if compile_stock:
                    fns["compile"] = pool(torch.compile(stock))
                yield (op, f"16x64x256x256 k2 {dname} {lname}", fns)

            w = (0.05 * torch.randn(64, 64, 3, 3, device="cuda", dtype=dtype)).to(memory_format=layout)
            b = torch.randn(64, device="cuda", dtype=dtype)
            w.requires_grad_()
            b.requires_grad_()

            def conv(fn, x=x, w=w, b=b):
                return lambda: torch.autograd.grad(fn(x, w, b).sum(), (x, w, b))

            stock_conv = lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1))  # noqa: E731
            ours_conv = lambda x, w, b: segfast.ops.conv2d_act(x, w, b, padding=1)  # noqa: E731
            fns = {"eager": conv(stock_conv), "segfast": conv(ours_conv)}
            if dtype == torch.bfloat16 and layout == torch.channels_last:
                fns["segfast-igemm"] = with_env("SEGFAST_CUDA_CONV", "igemm", conv(ours_conv))
            if compile_stock:
                fns["compile"] = conv(torch.compile(stock_conv))
            yield ("conv2d_act", f"16x64->64x256x256 3x3 relu {dname} {lname}", fns)
            del x, w, b

        a = torch.randn(8192, 1024, device="cuda", dtype=dtype, requires_grad=True)
        lw = torch.randn(1024, 1024, device="cuda", dtype=dtype, requires_grad=True)
        lb = torch.randn(1024, device="cuda", dtype=dtype, requires_grad=True)

        def lin(fn, a=a, lw=lw, lb=lb):
            return lambda: torch.autograd.grad(fn(a, lw, lb).sum(), (a, lw, lb))

        stock_lin = lambda a, w, b: F.gelu(F.linear(a, w, b))  # noqa: E731
        yield ("linear_act", f"8192x1024->1024 gelu {dname}",
               {"eager": lin(stock_lin), "segfast": lin(lambda a, w, b: segfast.ops.linear_act(a, w, b, "gelu"))}
               | ({"compile": lin(torch.compile(stock_lin))} if compile_stock else {}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.recompile_limit = 64
    rows: list[Row] = []
    for op, shape, fns in cases(not args.no_compile):
        print(f"... {op} {shape}", file=sys.stderr, flush=True)
        try:
            times = time_side_by_side(fns, args.reps, warmup=3, device="cuda")
            for variant, ms in times.items():
                rows.append(Row(op, shape, "fwd+bwd", variant, ms, cuda_peak_bytes(fns[variant])))
        except Exception as e:  # one failing case must not lose the others' numbers
            print(f"!!! {op} {shape}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    info = machine_info() | {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    table = markdown_table(rows).replace("saved for bwd", "peak CUDA memory")
    header = (f"segfast CUDA ops on {info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), "
              f"segfast {info['segfast_commit']}, {info['date']}")
    print(f"\n{header}\n\n{table}")
    write_json(args.out / "ops-cuda.json", rows, {"machine": info})
    (args.out / "ops-cuda.md").write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
