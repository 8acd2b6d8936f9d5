#!/usr/bin/env bash
# A GPU session in two device calls of at most 5 minutes each, most valuable results first (the
# budget is 15 minutes of device time in all, machine start and idle included; one command at
# most 10 minutes; at most 8 files come back):
#
#   device run (timeout 300): bash benchmarks/gpu_session.sh 1   build for sm_90, CUDA tests, quick benchmarks
#   device run (timeout 300): bash benchmarks/gpu_session.sh 2   compute-sanitizer memcheck and racecheck
#   here, no GPU:             bash benchmarks/gpu_session.sh plan  each phase's steps, limits and total
#
# Phase 2 reuses phase 1's build when the machine is still warm (build/gpu is kept between calls)
# and rebuilds otherwise. Everything lands in $OUT (default benchmarks/out/gpu), at most 8 files:
# environment.txt, phase1.log, tests.xml, the two benchmark JSON files, phase2.log. Commit what
# comes back under benchmarks/results/ with device, torch and date.
#
# Expects (as on the lent machine): python3 with a CUDA torch, nvcc, cmake, ninja, pybind11,
# scikit-build-core, pytest, compute-sanitizer; no internet, no ccache. Each step has its own time
# limit so that one hang does not cost the others' results; the exit status is the first failing
# step's.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:?usage: gpu_session.sh 1|2|plan}"
OUT="${OUT:-benchmarks/out/gpu}"
PHASE_SECONDS=290  # under the 300 s the device call is given
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PIP_DISABLE_PIP_VERSION_CHECK=1 SEGFAST_CUDA_SIM=OFF

# (phase, name, seconds): the plan both the run and `plan` read
STEPS=(
  "1 build 140" "1 tests 90" "1 bench 30" "1 bench-bf16 25"
  "2 build 150" "2 memcheck 80" "2 racecheck 55"
)

limit() {  # limit PHASE NAME: the step's seconds
  local entry phase name seconds
  for entry in "${STEPS[@]}"; do
    read -r phase name seconds <<<"$entry"
    if [ "$phase" = "$1" ] && [ "$name" = "$2" ]; then
      echo "$seconds"
      return
    fi
  done
  echo "no step $2 in phase $1" >&2
  exit 2
}

if [ "$PHASE" = plan ]; then
  for p in 1 2; do
    total=0
    for entry in "${STEPS[@]}"; do
      read -r phase name seconds <<<"$entry"
      [ "$phase" = "$p" ] || continue
      printf 'phase %s  %-11s %4d s\n' "$phase" "$name" "$seconds"
      total=$((total + seconds))
    done
    printf 'phase %s  total       %4d s (limit %d s)\n' "$p" "$total" "$PHASE_SECONDS"
    [ "$total" -le "$PHASE_SECONDS" ] || { echo "phase $p is over its limit"; exit 1; }
  done
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/phase$PHASE.log"
: >"$LOG"
status=0
step() {  # step NAME CMD...: CMD under its planned limit, output appended to the phase log
  local name=$1 seconds
  seconds=$(limit "$PHASE" "$name")
  shift
  echo "::: $(date -u +%T) $name (limit $seconds s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$seconds" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "::: $name: exit $rc in $((SECONDS - start)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

# torch comes from the system site-packages: nothing to download.
VENV=/tmp/segfast-gpu-venv
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
if [ "$PHASE" = 1 ]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    nvcc --version | tail -n 1
    date -u
  } >"$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
fi

step build env SKBUILD_BUILD_DIR=build/gpu "$PY" -m pip install -q --no-build-isolation --no-deps -e . || {
  echo "build failed: see $LOG"
  exit 1
}
if [ "$PHASE" = 1 ]; then
  # every family's tests on the "cuda" backend of the device fixture (tests/conftest.py), graph capture included
  step tests "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$OUT/tests.xml"
  # segfast vs eager vs torch.compile: float32 NCHW, then bfloat16 channels_last (where the opt-in
  # implicit-GEMM convolution is eligible, timed as "segfast igemm")
  step bench "$PY" -m segfast bench --device cuda --quick --suite ops,models --out "$OUT" --no-charts
  step bench-bf16 "$PY" -m segfast bench --device cuda --quick --dtype bfloat16 --layout channels_last \
    --suite ops,models --out "$OUT" --no-charts
else
  # without the caching allocator, an out-of-bounds access inside a cached block is seen too; the
  # comparisons with the CPU twins reach every kernel (forward and backward, multi-block sizes),
  # in float32 (and integer / index paths), plus the bad-class-index and graph-capture paths
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests \
    -k "(twin or bad_class or graph) and not bfloat16 and not float64"
  # the kernels with shared memory, shuffles and barriers: block sums (cross_entropy, Dice, focal,
  # batch_norm_act statistics), the warp-per-pixel cross_entropy, the activation-backward columns
  # kernel, the confusion matrix's per-warp counters
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests \
    -k "twin and float32 and (class_targets or rows or dice_sums or focal_loss or batch_norm or conv2d or linear or confusion)"
fi
echo "::: phase $PHASE done, first failing status: $status" | tee -a "$LOG"
exit "$status"
