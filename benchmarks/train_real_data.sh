#!/usr/bin/env bash
# Real-data proof for `fastsam3d train` / `validate`: train fastsam3d-tiny FROM SCRATCH on CPU for a fixed
# time budget on two real datasets, and compare Dice@5 on the training classes with the untrained model.
#
#   benchmarks/train_real_data.sh [OUT_DIR]          (default: ./runs/train-real-data)
#
# Environment: FASTSAM3D_DATA_DIR (default <repo>/../shared/data), MINUTES (training budget, default 30),
# ITERATIONS (decoder iterations per sample, default 11 as in the reference recipe), CLICKS (validation
# clicks, default 5), DEVICE (default cpu), THREADS (torch/OpenMP threads per process, default 1: on a
# small shared CPU, oversubscribed OpenMP threads were 5-8x slower than one thread). Everything it runs is
# a plain `fastsam3d` command.
#
# Outputs in OUT_DIR: prepared/ (prepare), untrained/last.pth (the seeded initial weights: --max-steps 0),
# run/ (last.pth, best.pth, metrics.jsonl, steps.jsonl, train.png), validate_{untrained,trained}.{json,csv,png},
# summary.json. Exit status 0 when the trained Dice@5 is at least 3x the untrained one and 0.05 higher.
# Running it again on the same OUT_DIR resumes the training run for another MINUTES (exactly, from
# run/last.pth) and re-validates: a way to extend the budget step by step.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${FASTSAM3D_DATA_DIR:-$REPO/../shared/data}"
OUT="${1:-runs/train-real-data}"
MINUTES="${MINUTES:-30}"
ITERATIONS="${ITERATIONS:-11}"
CLICKS="${CLICKS:-5}"
DEVICE="${DEVICE:-cpu}"
SEED=2023
export OMP_NUM_THREADS="${THREADS:-1}"
mkdir -p "$OUT"
echo "[$(date -Is)] data=$DATA out=$OUT minutes=$MINUTES iterations=$ITERATIONS clicks=$CLICKS device=$DEVICE" \
     "threads=$OMP_NUM_THREADS"

# 1. Per-class binary training data at 1.5 mm (resumable: a re-run skips what is complete).
fastsam3d prepare "$DATA/Dataset501_AbdomenCT" "$DATA/Task503_Colin27" -o "$OUT/prepared" --workers 2 --json \
    > "$OUT/prepare.json"

# 2. The untrained baseline: the exact initial weights training starts from (same model, same seed).
if [ ! -f "$OUT/untrained/last.pth" ]; then
    fastsam3d train "$OUT/prepared" --model fastsam3d-tiny --seed "$SEED" --epochs 1 --max-steps 0 \
        -o "$OUT/untrained" --device "$DEVICE" --json > "$OUT/untrained.json"
fi

# 3. Train from scratch for the time budget (the lr schedule's milestones lie beyond the budget).
RESUME=""
[ -f "$OUT/run/last.pth" ] && RESUME="--resume"
fastsam3d train "$OUT/prepared" --model fastsam3d-tiny --seed "$SEED" --epochs 100 --iterations "$ITERATIONS" \
    --time-limit "$MINUTES" --save-every 50 -o "$OUT/run" --device "$DEVICE" $RESUME --json > "$OUT/train.json"

# 4. Validate both on the training classes (ritm clicks 1-2, random after; same seed for both).
for name in untrained trained; do
    checkpoint="$OUT/untrained/last.pth"
    [ "$name" = trained ] && checkpoint="$OUT/run/last.pth"
    fastsam3d validate "$OUT/prepared" --checkpoint "$checkpoint" --clicks "$CLICKS" --seed "$SEED" \
        --device "$DEVICE" --csv "$OUT/validate_$name.csv" --plot "$OUT/validate_$name.png" --overwrite --json \
        > "$OUT/validate_$name.json"
done

# 5. Summary.
python - "$OUT" "$CLICKS" <<'EOF'
import json, sys
from pathlib import Path
out, clicks = Path(sys.argv[1]), int(sys.argv[2])
k = str(min(5, clicks))
untrained = json.loads((out / "validate_untrained.json").read_text())["overall"]
trained = json.loads((out / "validate_trained.json").read_text())["overall"]
train = json.loads((out / "train.json").read_text())
summary = {"pairs": trained["cases"], f"dice@{k}_untrained": untrained["dice_at"][k],
           f"dice@{k}_trained": trained["dice_at"][k], "mean_best_dice_untrained": untrained["mean_best_dice"],
           "mean_best_dice_trained": trained["mean_best_dice"], "dice_per_click_untrained": untrained["dice_per_click"],
           "dice_per_click_trained": trained["dice_per_click"], "train_steps": train["global_step"],
           "train_epochs_completed": train["epochs_completed"], "train_wall_s": train["wall_s"],
           "curve": str(out / "run" / "train.png"), "dice_plot": str(out / "validate_trained.png")}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
before, after = untrained["dice_at"][k], trained["dice_at"][k]
sys.exit(0 if after >= 3 * before and after >= before + 0.05 else 1)
EOF
