#!/usr/bin/env bash
# GPU check for `fastsam3d benchmark` (issue 8). Fits in 5 minutes on one GPU and installs nothing: it needs
# an environment where `python -c 'import fastsam3d_cli, torch'` already works with a CUDA build of torch
# (flash-attn optional: without it the `flash` rows say "unavailable").
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]          # default OUTPUT_DIR: $OUT, else runs/gpu_check
#
# 1. `fastsam3d benchmark` for sam-med3d / fastsam3d / fastsam3d-tiny × exact / sdpa / flash / sparse ×
#    float32 / bfloat16 on cuda (one run, so the speed-ups share one baseline: sam-med3d/exact/float32);
#    the JSON is kept, and a Markdown table plus the GPU target (fastsam3d encoder <= 3 ms in bf16) printed.
# 2. the golden parity tests (tests/test_golden_parity.py) on CUDA, TF32 off (they set it), with CI=true so a
#    missing golden folder FAILS instead of skipping. The folder: FASTSAM3D_GOLDEN_DIR, else ./shared/golden,
#    else ../shared/golden. On a remote GPU machine that receives only the repository, copy the golden folder
#    into an ignored folder of the checkout first (e.g. `cp -r ../shared/golden .golden`, listed in
#    .git/info/exclude), send it along, and run with FASTSAM3D_GOLDEN_DIR=.golden.
#
# Environment: PYTHON (default python3, else python), FASTSAM3D_GOLDEN_DIR, REPEATS (default 50), WARMUP (default 10),
# BUDGET (seconds per benchmark configuration, default 5: 20 configurations run, the rest are "unavailable").
# Exit status: 1 if the benchmark or the parity tests fail, else 0 (the speed target is reported, not enforced).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
REPEATS="${REPEATS:-50}"
WARMUP="${WARMUP:-10}"
BUDGET="${BUDGET:-5}"
if [ -z "${FASTSAM3D_GOLDEN_DIR:-}" ]; then
    for candidate in shared/golden ../shared/golden; do
        [ -f "$candidate/weights_rule.py" ] && { FASTSAM3D_GOLDEN_DIR="$candidate"; break; }
    done
fi
export FASTSAM3D_GOLDEN_DIR="${FASTSAM3D_GOLDEN_DIR:-../shared/golden}"
mkdir -p "$OUT_DIR"
status=0

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "nvidia-smi not found"
"$PY" -m fastsam3d_cli --version || { echo "fastsam3d_cli is not importable with $PY"; exit 1; }
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' || exit 1

echo "== fastsam3d benchmark (budget ${BUDGET} s per configuration, ${REPEATS} repeats, ${WARMUP} warm-up)"
BENCH=(-m sam-med3d -m fastsam3d -m fastsam3d-tiny -a exact -a sdpa -a flash -a sparse
       --dtype float32 --dtype bfloat16 --device cuda --repeats "$REPEATS" --warmup "$WARMUP" --clicks 5 --budget "$BUDGET")
if timeout 210 "$PY" -m fastsam3d_cli benchmark "${BENCH[@]}" --json > "$OUT_DIR/benchmark.json" 2> "$OUT_DIR/benchmark.log"; then
    "$PY" benchmarks/encoder_speed.py --from-json "$OUT_DIR/benchmark.json" \
        --command "fastsam3d benchmark ${BENCH[*]}" | tee "$OUT_DIR/benchmark.md"
else
    echo "benchmark FAILED (exit $?):"; tail -n 20 "$OUT_DIR/benchmark.log"; status=1
fi

echo "== golden parity tests on CUDA (golden folder: $FASTSAM3D_GOLDEN_DIR)"
if CI=true timeout 90 "$PY" -m pytest tests/test_golden_parity.py -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/parity.log"; then
    :
else
    echo "parity tests FAILED"; status=1
fi
exit $status
