"""Previews of a model's masks on the unseen volumes, from the clicks `evaluate_unseen.py` placed (for the model card).

For each volume of `data/validation/`, the chosen targets are segmented by `fastsam3d infer` (the product
path: the DICOM series or NRRD file as given, a click file, `--preview`) with the first `--clicks` clicks the
evaluation placed for `--method` (ijk, include/exclude), so the picture shows exactly what was scored.

    python benchmarks/unseen_previews.py --evaluation runs/eval/bundled.json --method bundled \\
        --checkpoint fastsam3d_cli/weights/bundled/fastsam3d-bundled.pt --out docs/img/bundled_unseen
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# evaluation target source → the volume `infer` reads
VOLUMES = {"validation/abdomen_ct_dicom": "validation/abdomen_ct_dicom",
           "validation/brain1_mr": "validation/brain1_mr.nrrd", "validation/brain2_mr": "validation/brain2_mr.nrrd"}
DEFAULT_TARGETS = "spleen,liver,stomach,aorta,vertebrae_T12,rib_left_8,lesion"


def click_file(targets: list[dict], method: str, clicks: int) -> dict:
    """A fastsam3d click file (ijk) with one object per target: its first `clicks` evaluation clicks."""
    objects = []
    for label, target in enumerate(targets, start=1):
        placed = target["clicks"][method][:clicks]
        objects.append({"name": target["name"], "label": label, "points": [p[:3] for p in placed],
                        "point_labels": [int(p[3]) for p in placed]})
    return {"version": 1, "space": "ijk", "objects": objects}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evaluation", type=Path, required=True, help="JSON written by evaluate_unseen.py")
    parser.add_argument("--method", required=True, help="the checkpoint's NAME in that JSON (its clicks are used)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the weights to run")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated target names")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FASTSAM3D_DATA_DIR",
                                                                              REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, required=True, help="prefix: OUT_<volume>.png")
    args = parser.parse_args()

    from fastsam3d_cli.interactive.infer import infer_file

    evaluation = json.loads(args.evaluation.read_text())
    wanted = set(args.targets.split(","))
    by_volume: dict[str, list[dict]] = {}
    for target in evaluation["targets"]:
        if target["group"] == "unseen" and target["name"] in wanted and args.method in target["clicks"]:
            by_volume.setdefault(target["source"], []).append(target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for source, targets in by_volume.items():
            stem = Path(source).name
            clicks = Path(folder) / f"{stem}.json"
            clicks.write_text(json.dumps(click_file(targets, args.method, args.clicks)))
            preview = Path(f"{args.out}_{stem}.png")
            infer_file(args.data_dir / VOLUMES[source], clicks, Path(folder) / f"{stem}_mask.nii.gz",
                       checkpoint=args.checkpoint, device="cpu", preview=preview, overwrite=True)
            print(f"{preview}: {', '.join(t['name'] for t in targets)} ({args.clicks} clicks each)")


if __name__ == "__main__":
    main()
