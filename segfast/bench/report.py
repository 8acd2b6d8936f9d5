"""Results of ``segfast bench`` as a Markdown table, a JSON file, PNG charts, and a comparison
of two result files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from segfast.bench.cases import SEGFAST

CASE_KEY = ("suite", "name", "shape", "step", "dtype", "layout", "device")


def _rows(rows: Iterable) -> list[dict]:
    return [r if isinstance(r, dict) else asdict(r) for r in rows]


def _by_case(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault(tuple(row[k] for k in CASE_KEY), {})[row["provider"]] = row
    return cases


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def markdown(rows: Iterable) -> str:
    """One table per suite, setting and baseline: per case each provider's median ms (and spread), the
    speed-up of every provider over the baseline, images/s of segfast, the floor (the larger of
    bytes moved / measured bandwidth and FLOPs / measured GEMM rate) and segfast's distance to it,
    memory (saved for backward where measured, else the peak), and compile time."""
    rows = _rows(rows)
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:  # a table per baseline too: its ratio columns are against that baseline
        groups.setdefault((row["suite"], row["dtype"], row["layout"], row["device"], row["baseline"]), []).append(row)
    for (suite, dtype, layout, device, baseline), group in groups.items():
        providers = list(dict.fromkeys(r["provider"] for r in group))
        others = [p for p in providers if p != baseline]
        memory = "saved for bwd MiB" if any(r["saved_bytes"] is not None for r in group) else "peak MiB"
        compiled = [p for p in providers if "compile" in p]
        header = (
            ["case", "shape", "step"]
            + [f"{p} ms" for p in providers]
            + [f"{p} vs {baseline}" for p in others]
            + [f"{SEGFAST} img/s", "floor ms", "floor / segfast", f"{memory}: " + " / ".join(providers)]
            + (["compile s: " + " / ".join(compiled)] if compiled else [])
        )
        out += [
            f"\n**{suite}** ({device}, {dtype}, {layout})\n",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for (_, name, shape, step, *_), by in _by_case(group).items():
            base = by.get(baseline)
            mine = by.get(SEGFAST)
            cells = [name, shape, step]
            cells += [
                f"{by[p]['median_ms']:.2f} ±{(by[p]['p75_ms'] - by[p]['p25_ms']) / 2:.2f}" if p in by else "-"
                for p in providers
            ]
            cells += [f"{base['median_ms'] / by[p]['median_ms']:.2f}x" if base and p in by else "-" for p in others]
            floor = (base or mine or {}).get("floor_ms")
            cells += [
                f"{mine['images_per_s']:.0f}" if mine else "-",
                f"{floor:.2f}" if floor else "-",
                f"{floor / mine['median_ms']:.0%}" if floor and mine else "-",
            ]
            key = "saved_bytes" if memory.startswith("saved") else "peak_bytes"
            cells.append(" / ".join(_mib(by[p][key]) if p in by else "-" for p in providers))
            if compiled:
                cells.append(
                    " / ".join(
                        f"{(by[p]['first_call_ms'] - by[p]['median_ms']) / 1e3:.1f}" if p in by else "-"
                        for p in compiled
                    )
                )
            out.append("| " + " | ".join(cells) + " |")
        notes = sorted({r["note"] for r in group if r["note"]})
        out += [f"\nnote: {n}" for n in notes]
    return "\n".join(out).lstrip("\n")


def environment_line(env: dict) -> str:
    limits = env.get("limits", {})
    return (
        f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, segfast {env['segfast']} "
        f"({env['segfast_commit'] or 'no git'}), {env['date']}; measured here: "
        f"{limits.get('bandwidth_gb_s', 0):.1f} GB/s copy, float32 {limits.get('gemm_gflop_s', 0):.0f} GFLOP/s "
        f"GEMM and {limits.get('conv_gflop_s', 0):.0f} GFLOP/s 3x3 convolution"
    )


def write_json(path: Path, rows: Iterable, env: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": _rows(rows)}, indent=1) + "\n")


def read_json(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(Path(path).read_text())
    if "rows" not in data or "environment" not in data:
        raise ValueError(f"{path}: not a segfast bench result file (no 'rows' and 'environment')")
    return data["rows"], data["environment"]


def charts(rows: Iterable, out_dir: Path, stem: str) -> list[Path]:
    """``stem``-speedup.png (each provider's speed-up over the baseline, per case) and
    ``stem``-memory.png (memory per case and provider). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("charts need matplotlib (pip install matplotlib); the table and JSON were written") from error
    rows = _rows(rows)
    cases = _by_case(rows)
    labels = [f"{name} {shape} {step}" for (_, name, shape, step, *_) in cases]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    written = []
    for kind in ("speedup", "memory"):
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
        height = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = []
            for by in cases.values():
                row, base = by.get(provider), by.get(next(iter(by.values()))["baseline"])
                if kind == "speedup":
                    values.append(base["median_ms"] / row["median_ms"] if row and base else 0)
                else:
                    b = row and (row["saved_bytes"] if row["saved_bytes"] is not None else row["peak_bytes"])
                    values.append((b or 0) / 2**20)
            ax.barh([y + i * height for y in range(len(labels))], values, height, label=provider)
        ax.set_yticks([y + 0.4 - height / 2 for y in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        if kind == "speedup":
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel(
                "speed-up over the case's baseline (eager PyTorch; for augment per-sample grid_sample, "
                "albumentations from bytes)"
            )
        else:
            ax.set_xlabel("MiB: saved for backward (fwd+bwd op rows), else peak above the inputs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def compare(before: Path, after: Path) -> str:
    """A table of each (case, provider) median in two result files and the change from the first
    to the second (a ratio below 1 is faster)."""
    rows_a, env_a = read_json(before)
    rows_b, env_b = read_json(after)
    index_b = {tuple(r[k] for k in CASE_KEY) + (r["provider"],): r for r in rows_b}
    lines = [
        f"A: {before} ({env_a.get('segfast_commit') or '?'}, {env_a.get('date')})",
        f"B: {after} ({env_b.get('segfast_commit') or '?'}, {env_b.get('date')})",
        "",
        "| suite | case | shape | step | provider | A ms | B ms | B / A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    matched = 0
    for row in rows_a:
        other = index_b.get(tuple(row[k] for k in CASE_KEY) + (row["provider"],))
        if other is None:
            continue
        matched += 1
        lines.append(
            f"| {row['suite']} | {row['name']} | {row['shape']} | {row['step']} | {row['provider']} | "
            f"{row['median_ms']:.2f} | {other['median_ms']:.2f} | {other['median_ms'] / row['median_ms']:.2f} |"
        )
    if not matched:
        raise ValueError(f"{before} and {after} have no (case, provider) in common")
    return "\n".join(lines)


README_BEGIN = "<!-- segfast bench results: generated by benchmarks/update_readme.py, do not edit -->"
README_END = "<!-- end of generated results -->"


def readme_section(result_files: list[Path], root: Path) -> str:
    """The README's performance tables, rendered from committed result files."""
    parts = [README_BEGIN]
    for path in result_files:
        rows, env = read_json(path)
        parts += ["", f"`{path.relative_to(root)}`: {environment_line(env)}", "", markdown(rows)]
    parts += ["", README_END]
    return "\n".join(parts)
