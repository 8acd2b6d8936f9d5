"""``segfast info`` (how this segfast was built), ``segfast train`` / ``eval`` / ``predict`` / ``export``,
``segfast bench``."""
from __future__ import annotations

import argparse
import sys


def _info() -> int:
    import torch

    import segfast

    info = segfast.build_info()
    rows = {
        "segfast": segfast.__version__,
        "built against torch": info["torch_version"],
        "running torch": torch.__version__,
        "compiler": info["compiler"],
        "CUDA kernels": "yes (" + ", ".join(info["cuda_archs"]) + ")" if info["cuda"] else "no",
        "OpenMP": "yes" if info["openmp"] else "no",
        "threads": f"{info['num_threads']} (at::parallel_for uses {info['parallel_for_threads']})",
        "ops": ", ".join(sorted(n for n in dir(torch.ops.segfast) if not n.startswith("_")
                                and not n.endswith("_backward") and n not in ("name", "dispatch"))),
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information").set_defaults(run=lambda args: _info())
    from segfast.cli import bench, train

    train.add_parsers(sub)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IndexError, ImportError) as error:
        # bad input (arguments, files, data): one clear line, not a traceback
        print(f"segfast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
