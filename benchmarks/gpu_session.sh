#!/usr/bin/env bash
# One GPU session in one call (the device tool's 10-minute limit): build segfast from source on
# the lent GPU machine, run the CUDA tests, compute-sanitizer memcheck on a small subset, and the
# GPU benchmarks. Everything lands in $OUT (default benchmarks/out/gpu): logs, junit XML, JSON
# and Markdown. Commit what comes back under benchmarks/results/ with device, torch and date.
#
#   device run: bash benchmarks/gpu_session.sh
#
# Expects (as on the lent machine): python3 with a CUDA torch, nvcc, cmake, ninja, pybind11,
# scikit-build-core, pytest; no internet. Each step has its own time limit so that one hang does
# not cost the others' results; the exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PIP_DISABLE_PIP_VERSION_CHECK=1
status=0
step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "::: $(date -u +%T) $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "::: $name: exit $rc in $((SECONDS - start)) s"
  tail -n 25 "$OUT/$name.log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

# torch comes from the system site-packages: nothing to download. SEGFAST_GPU_PYTHON overrides
# the interpreter (a dry run of this script on a machine without a GPU).
if [ -n "${SEGFAST_GPU_PYTHON:-}" ]; then
  PY="$SEGFAST_GPU_PYTHON"
else
  VENV=/tmp/segfast-gpu-venv
  python3 -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 1
  date -u
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step build 300 env SKBUILD_BUILD_DIR=build/gpu "$PY" -m pip install --no-build-isolation --no-deps -e . || {
  echo "build failed: see $OUT/build.log"
  exit 1
}
step info 60 "$PY" -m segfast info
step tests 240 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --junitxml="$OUT/tests.xml"
# memcheck on a handful of small cases of every kernel (the whole suite is too slow under it)
step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
  -k "(float32 and contiguous_format and not silu and not gelu and not sigmoid) or bad_class or padding_only"
# segfast vs eager vs torch.compile on the GPU: float32 NCHW, and bfloat16 channels_last (where the
# opt-in implicit-GEMM convolution is eligible, timed as "segfast igemm")
step bench 240 "$PY" -m segfast bench --device cuda --out "$OUT" --no-charts
step bench-bf16 180 "$PY" -m segfast bench --device cuda --dtype bfloat16 --layout channels_last --suite ops,models \
  --out "$OUT" --no-charts
echo "::: done, first failing status: $status"
exit "$status"
