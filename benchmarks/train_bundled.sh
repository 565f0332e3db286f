#!/usr/bin/env bash
# The bundled model's recipe (issue 16): `fastsam3d-tiny-refine` with the classical prior, whose refine head
# (a ~95 k-weight full-resolution 3D U-Net, fastsam3d_cli/model/refine_head.py) is trained FROM SCRATCH on CPU
# with the project's own commands to correct the classical floor on the clicks' box
# (`train --refine-head`, fastsam3d_cli/training/refine_train.py). The SAM part keeps its seeded initial
# weights with the residual zeroed, so it adds nothing: the model is floor + refine head (docs/models.md).
# Never on data/validation/ (that folder is only ever scored, by benchmarks/evaluate_unseen.py).
#
#   benchmarks/train_bundled.sh [OUT_DIR]          (default: ./runs/bundled)
#
# Resumable across sessions: a second call on the same OUT_DIR continues exactly from refine/last.pth for
# another MINUTES (the run stops by itself after its last epoch). Environment: FASTSAM3D_DATA_DIR (default
# <repo>/../shared/data), MINUTES (default 120), THREADS (torch/OpenMP threads, default 1), DEVICE (default cpu).
#
# The recipe (every value recorded in the run's last.pth args and in the bundled manifest):
#   data     the (case, class) pairs of Dataset501_AbdomenCT and Dataset502_AbdomenMR at 1.5 mm with at
#            least 50 label voxels, 128³ crops with the dataset's shifts and flips
#   clicks   first at the deepest voxel (p 1/2) or a depth²-weighted inner voxel, then 0-4 at the deepest
#            voxel of the largest error of the floor (from step 300, half the samples: of the head itself)
#   box      the clicks' box grown by 40 mm, cut to at most 64³ around the last click; sign and axis flips
#   optim    AdamW lr 2e-3, weight decay 1e-4, batch 1, BCE + soft Dice; x0.1 at epochs 24 and 36 of 40
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

# 1. Per-class binary training data at 1.5 mm (a re-run skips what is complete).
fastsam3d prepare "$DATA/Dataset501_AbdomenCT" "$DATA/Dataset502_AbdomenMR" -o "$OUT/prepared" --json \
    > "$OUT/prepare.json"

# 2. The refine head, for the time budget (continued from refine/last.pth).
RESUME=""
[ -f "$OUT/refine/last.pth" ] && RESUME="--resume"
fastsam3d train "$OUT/prepared" -o "$OUT/refine" --model fastsam3d-tiny-refine --prior classical --refine-head \
    --seed "$SEED" --batch-size 1 --lr 2e-3 --weight-decay 1e-4 --epochs 40 --lr-milestones 24,36 \
    --min-foreground 50 --save-every 50 --device "$DEVICE" --time-limit "$MINUTES" $RESUME --json \
    > "$OUT/refine.json"

# 3. Score the floor and this checkpoint on the unseen volumes (and the seen ones).
python "$REPO/benchmarks/evaluate_unseen.py" --data-dir "$DATA" --checkpoint "bundled=$OUT/refine/last.pth" \
    --no-untrained --sets unseen,seen --threads "$OMP_NUM_THREADS" --out "$OUT/evaluation" \
    || echo "evaluation failed (see above); the checkpoint is kept"
echo "[$(date -Is)] done: $OUT/refine/last.pth; ship it only if it beats the floor (docs/models.md):"
echo "  fastsam3d weights bundle $OUT/refine/last.pth --name fastsam3d-bundled --overwrite"
