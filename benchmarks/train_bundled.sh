#!/usr/bin/env bash
# The bundled model's recipe (issue 16): fastsam3d-tiny trained FROM SCRATCH on CPU with the project's own
# commands, on the three training datasets plus data generated from them on the fly. Never on
# data/validation/ (that folder is only ever scored, by benchmarks/evaluate_unseen.py).
#
#   benchmarks/train_bundled.sh [OUT_DIR]          (default: ./runs/bundled)
#
# Resumable across sessions: a second call on the same OUT_DIR continues run/ exactly from run/last.pth for
# another MINUTES. Environment: FASTSAM3D_DATA_DIR (default <repo>/../shared/data), MINUTES (default 120),
# THREADS (torch/OpenMP threads, default 1: on a small shared CPU, oversubscribed OpenMP threads were 5-8x
# slower than one thread), DEVICE (default cpu).
#
# The recipe (every value recorded in run/last.pth's args and in the bundled manifest):
#   data     --data-mix real=0.35,synth-labels=0.3,shapes=0.2,supervoxels=0.15, 400 samples per epoch,
#            label maps of Dataset501_AbdomenCT, Dataset502_AbdomenMR, Task503_Colin27
#   clicks   8 rounds at most: a random 0..6 without gradients, then 2 with them (--grad-iterations 2);
#            half the clicks in the interior of the larger error region (--centre-clicks 0.5)
#   optim    AdamW lr 4e-4 for every part (--decoder-lr-scale 1.0), wd 0.1, batch 2, x0.1 at epochs 45 and 55
#   seed     2026
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${FASTSAM3D_DATA_DIR:-$REPO/../shared/data}"
OUT="${1:-runs/bundled}"
MINUTES="${MINUTES:-120}"
DEVICE="${DEVICE:-cpu}"
SEED=2026
export OMP_NUM_THREADS="${THREADS:-1}"
mkdir -p "$OUT"
echo "[$(date -Is)] data=$DATA out=$OUT minutes=$MINUTES device=$DEVICE threads=$OMP_NUM_THREADS"

DATASETS=("$DATA/Dataset501_AbdomenCT" "$DATA/Dataset502_AbdomenMR" "$DATA/Task503_Colin27")
LABEL_MAPS=()
for dataset in "${DATASETS[@]}"; do LABEL_MAPS+=(--label-maps "$dataset"); done

# 1. Per-class binary training data at 1.5 mm (a re-run skips what is complete).
fastsam3d prepare "${DATASETS[@]}" -o "$OUT/prepared" --json > "$OUT/prepare.json"

# 2. Train (or continue) for the time budget.
RESUME=""
[ -f "$OUT/run/last.pth" ] && RESUME="--resume"
fastsam3d train "$OUT/prepared" --model fastsam3d-tiny -o "$OUT/run" --seed "$SEED" \
    --epochs 60 --lr-milestones 45,55 --batch-size 2 --iterations 8 --grad-iterations 2 --centre-clicks 0.5 \
    --lr 4e-4 --decoder-lr-scale 1.0 --samples-per-epoch 400 \
    --data-mix real=0.35,synth-labels=0.3,shapes=0.2,supervoxels=0.15 "${LABEL_MAPS[@]}" \
    --save-every 25 --time-limit "$MINUTES" --device "$DEVICE" $RESUME --json > "$OUT/train.json"

# 3. Score the floor, the untrained model and this checkpoint on the unseen volumes (and the seen ones).
python "$REPO/benchmarks/evaluate_unseen.py" --data-dir "$DATA" --checkpoint "bundled=$OUT/run/last.pth" --no-untrained --out "$OUT/evaluation" \
    || echo "evaluation failed (see above); the checkpoint is kept"
echo "[$(date -Is)] done: $OUT/run/last.pth; export with: fastsam3d weights bundle $OUT/run/last.pth --name fastsam3d-bundled"
