"""Rewrites README.md's generated performance block from the result files committed under
benchmarks/results/ (the README's numbers are never typed by hand; tests/test_bench.py checks that
the block matches these files).

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segfast.bench.report import README_BEGIN, README_END, readme_section  # noqa: E402

# the files the README shows, in order
RESULTS = [
    # segfast bench (the full suite: ops, models, augment)
    "benchmarks/results/bench-cpu-float32-nchw.json",
    # segfast bench --suite augment --only bytes --reps 15, in a torch 2.14.1 venv (torchvision 0.29.1 goes with it)
    "benchmarks/results/bench-cpu-augment-bytes-torch2.14.json",
    # segfast bench --suite models --only resnet18_unet --reps 11, torch 2.14.1 venv (smp installs there)
    "benchmarks/results/bench-cpu-resnet18-unet-torch2.14.json",
    # segfast bench --layout channels_last --suite ops,models --only batch_norm_act,unet,unet_iabn
    "benchmarks/results/bench-cpu-float32-channels_last-batch-norm-unet.json",
]


def render(readme: str) -> str:
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    return readme[:start] + readme_section([ROOT / r for r in RESULTS], ROOT) + readme[end:]


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    print(f"rewrote the generated block of {path} from {', '.join(RESULTS)}")
