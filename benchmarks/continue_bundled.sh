#!/usr/bin/env bash
# A second stage for the bundled model: continue training its refine head from the shipped weights with a
# fresh, lower learning-rate schedule (the first stage, benchmarks/train_bundled.sh, ended its 40 epochs with the
# lr at 2e-5 while the unseen score was still rising: 0.516 / 0.544 / 0.560 at 1,000 / 2,000 / 3,000 steps).
# Never on data/validation/.
#
#   benchmarks/continue_bundled.sh [OUT_DIR] [INIT]   (defaults: ./runs/bundled2, the shipped bundled model)
#
# Environment: FASTSAM3D_DATA_DIR (default <repo>/../shared/data), MINUTES (default 60), THREADS (default 1),
# DEVICE (default cpu); LR, EPOCHS, MILESTONES and SEED change the recipe below (a further stage: e.g.
# LR=2e-4 SEED=2028 from stage 2's last.pth). Resumable like train_bundled.sh (a second call continues from
# refine/last.pth).
#
# The recipe: stage 1's data, clicks and boxes; AdamW lr 5e-4 (a quarter of stage 1's), weight decay 1e-4,
# batch 1, BCE + soft Dice; x0.1 at epochs 18 and 26 of 30; seed 2027 (stage 1: 2026, so other crops and clicks).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${FASTSAM3D_DATA_DIR:-$REPO/../shared/data}"
OUT="${1:-runs/bundled2}"
INIT="${2:-$REPO/fastsam3d_cli/weights/bundled/fastsam3d-bundled.pt}"
MINUTES="${MINUTES:-60}"
DEVICE="${DEVICE:-cpu}"
LR="${LR:-5e-4}"
EPOCHS="${EPOCHS:-30}"
MILESTONES="${MILESTONES:-18,26}"
SEED="${SEED:-2027}"
export OMP_NUM_THREADS="${THREADS:-1}"
mkdir -p "$OUT"
echo "[$(date -Is)] data=$DATA out=$OUT init=$INIT minutes=$MINUTES device=$DEVICE threads=$OMP_NUM_THREADS" \
     "lr=$LR epochs=$EPOCHS milestones=$MILESTONES seed=$SEED"

fastsam3d prepare "$DATA/Dataset501_AbdomenCT" "$DATA/Dataset502_AbdomenMR" -o "$OUT/prepared" --json \
    > "$OUT/prepare.json"

START=(--init "$INIT")
[ -f "$OUT/refine/last.pth" ] && START=(--resume)
fastsam3d train "$OUT/prepared" -o "$OUT/refine" --model fastsam3d-tiny-refine --prior classical --refine-head \
    --seed "$SEED" --batch-size 1 --lr "$LR" --weight-decay 1e-4 --epochs "$EPOCHS" --lr-milestones "$MILESTONES" \
    --min-foreground 50 --save-every 50 --device "$DEVICE" --time-limit "$MINUTES" "${START[@]}" --json \
    > "$OUT/refine.json"

python "$REPO/benchmarks/evaluate_unseen.py" --data-dir "$DATA" --checkpoint "continued=$OUT/refine/last.pth" \
    --no-untrained --no-floor --sets unseen,seen --threads "$OMP_NUM_THREADS" --out "$OUT/evaluation" \
    || echo "evaluation failed (see above); the checkpoint is kept"
echo "[$(date -Is)] done: $OUT/refine/last.pth"
