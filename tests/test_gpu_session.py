"""benchmarks/gpu_session.sh fits the device budget: two calls of at most 300 s (its plan)."""

import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def test_each_phase_fits_its_device_call():
    result = subprocess.run(["bash", str(SCRIPT), "plan"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    totals = [line for line in result.stdout.splitlines() if "total" in line]
    assert len(totals) == 2
    for line in totals:
        seconds = int(line.split()[3])
        assert 0 < seconds <= 290, line
