"""segfast bench: the runner on tiny settings, the report, the CLI's errors, and the README's
generated block against the committed result files."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from segfast import bench
from segfast.__main__ import main
from segfast.bench import report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import update_readme  # noqa: E402


@pytest.fixture(scope="module")
def quick_rows():
    settings = bench.Settings(quick=True, compile=False)
    return bench.run(
        ["ops", "augment"], settings, reps=2, only={"ops": ["pooling"], "augment": ["uint8"]}, progress=False
    )


def test_run_times_every_provider_of_every_case(quick_rows):
    rows, env = quick_rows
    cases = {(r.name, r.step) for r in rows}
    assert cases == {
        ("max_pool2d 2x2", "fwd"),
        ("max_pool2d 2x2", "fwd+bwd"),
        ("avg_pool2d 2x2", "fwd"),
        ("avg_pool2d 2x2", "fwd+bwd"),
        ("affine_augment", "fwd"),
    }
    for row in rows:
        assert row.median_ms > 0 and row.p25_ms <= row.median_ms <= row.p75_ms
        assert row.images_per_s == pytest.approx(row.items / row.median_ms * 1e3)
        assert row.floor_ms is not None and row.floor_ms > 0
    pool_bwd = [r for r in rows if r.step == "fwd+bwd"]
    assert {r.provider for r in pool_bwd} == {"eager", "segfast"}
    # max_pool2d saves a 1-byte argmax per output, eager an int64 index
    saved = {r.provider: r.saved_bytes for r in pool_bwd if r.name.startswith("max")}
    assert saved["segfast"] * 8 == saved["eager"]
    assert env["limits"]["bandwidth_gb_s"] > 0 and env["limits"]["gemm_gflop_s"] > 0
    assert env["torch"] == torch.__version__ and env["build"]["torch_version"]


def test_augment_from_bytes_against_the_augmentation_libraries():
    """The bytes case: segfast's collate and each library installed do the same work, albumentations
    the baseline (segfast alone, with a note, where it is not installed)."""
    rows, _ = bench.run(["augment"], bench.Settings(quick=True, compile=False), 1, {"augment": ["bytes"]}, False)
    providers = {r.provider for r in rows}
    assert "segfast" in providers and {r.name for r in rows} == {"uint8 HWC -> normalised float32"}
    try:
        import albumentations  # noqa: F401
    except ImportError:
        assert all(r.baseline == "segfast" and "not installed" in r.note for r in rows)
    else:
        assert "albumentations" in providers and all(r.baseline == "albumentations" for r in rows)
    from segfast.bench.augment import bytes_case

    case = bytes_case(bench.Settings(quick=True, compile=False))
    outputs = {name: run() for name, run in case.providers.items()}
    for name, (images, masks) in outputs.items():  # the same end: a normalised float32 NCHW batch
        assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32, name
        assert images.is_contiguous() and masks.shape == (4, 224, 224) and masks.dtype == torch.uint8, name
        assert -2.2 < images.min() < -1.5 and 2.2 < images.max() < 2.7, name  # ImageNet-normalised bytes
        assert set(masks.unique().tolist()) <= set(range(21)) | {255}, name


@pytest.mark.parametrize("n", range(1, 8))
def test_timing_orders_let_every_provider_follow_every_other_equally_often(n):
    orders = bench.measure.carryover_balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = Counter((order[i], order[i + 1]) for order in orders for i in range(n - 1))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1


def test_time_side_by_side_runs_the_balanced_orders():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    timings = bench.measure.time_side_by_side(fns, reps=8, warmup=0)
    assert set(timings) == set("abcd")
    orders = bench.measure.carryover_balanced_orders(4)
    assert calls == ["abcd"[i] for rep in range(8) for i in orders[rep % 4]]


def test_unsupported_dtype_is_reported_not_timed():
    # float16 pooling: stock CPU runs it, segfast's CPU kernels do not take float16
    settings = bench.Settings(quick=True, compile=False, dtype="float16")
    rows, _ = bench.run(["ops"], settings, reps=1, only={"ops": ["pooling"]}, progress=False)
    assert rows and {r.provider for r in rows} == {"eager"}
    assert all("segfast:" in r.note and "float16" in r.note for r in rows)


def test_report_table_json_compare_and_charts(quick_rows, tmp_path):
    rows, env = quick_rows
    table = report.markdown(rows)
    assert "| max_pool2d 2x2 | 4x32x64x64 | fwd+bwd |" in table and "segfast vs eager" in table
    assert "segfast vs per-sample grid_sample" in table
    report.write_json(tmp_path / "a.json", rows, env)
    loaded, loaded_env = report.read_json(tmp_path / "a.json")
    assert len(loaded) == len(rows) and loaded_env["limits"] == env["limits"]
    slower = json.loads((tmp_path / "a.json").read_text())
    for row in slower["rows"]:
        row["median_ms"] *= 2
    (tmp_path / "b.json").write_text(json.dumps(slower))
    diff = report.compare(tmp_path / "a.json", tmp_path / "b.json")
    assert diff.count("| 2.00 |") == len(rows)
    pytest.importorskip("matplotlib")
    for path in report.charts(rows, tmp_path, "t"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--suite", "nope"], "--suite: expected some of ops, models, augment"),
        (["bench", "--only", "resnet"], "--only: 'resnet' is in none of the suites"),
        (["bench", "compare", "a.json"], "expected 'segfast bench compare A.json B.json'"),
        (["bench", "compare", "missing-a.json", "missing-b.json"], "no result file missing-a.json"),
        (["bench", "--reps", "0"], "--reps must be at least 1"),
    ],
)
def test_cli_rejects_bad_arguments_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_writes_table_json_and_charts(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [
            sys.executable,
            *"-m segfast bench --quick --no-compile --suite ops --only confusion_matrix --reps 1 --out".split(),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| confusion_matrix |" in out
    stem = "bench-cpu-float32-nchw-quick"
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}.json", f"{stem}-speedup.png", f"{stem}-memory.png"}


def test_readme_block_is_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert update_readme.render(readme) == readme, "run python benchmarks/update_readme.py"
