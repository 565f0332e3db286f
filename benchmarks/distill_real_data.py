"""Proof on real data: distil a SAM-Med3D teacher into fastsam3d-tiny, fine-tune the decoder, validate side by side.

Every step runs the real `fastsam3d` CLI (as a user would), logs under OUT/, and the numbers end up in
OUT/summary.json plus a printed table:

1. `fastsam3d prepare` the abdominal CT and MR datasets of the example data (a few organ classes);
2. the teacher: `--teacher CKPT` if given, else DETERMINISTIC weights (the golden folder's weight rule,
   `weights_rule.py`, the same synthetic SAM-Med3D weights the parity tests use — not a trained model);
3. `fastsam3d distill` into fastsam3d-tiny: per-stage MSE before/after each stage and the neck MSE at
   initialisation vs at the end;
4. decoder fine-tune of the student: `fastsam3d train --init student.pth --freeze-encoder
   --unfreeze-patience P`, and (for a fair comparison) the same fine-tune of the teacher's decoder on its
   own frozen encoder;
5. `fastsam3d validate` of teacher and student (before and after the fine-tune) on the same classes.

    python benchmarks/distill_real_data.py [--out /work/runs/distill/proof] [--teacher CKPT] [--epochs-per-stage 5]

The example data are two volumes: validation runs on the training crops, so the Dice numbers show that the
pipeline learns and runs end to end, not how well a student generalises.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTSAM3D_DATA_DIR", REPO.parent / "shared" / "data"))
GOLDEN = Path(os.environ.get("FASTSAM3D_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
CLASSES = "liver,spleen,kidney_left,kidney_right,stomach,aorta"


def run(args: list[str], log: Path, json_out: bool = True) -> dict:
    """Run `fastsam3d ARGS` (stderr → log), return its --json summary."""
    command = [sys.executable, "-m", "fastsam3d_cli", *args] + (["--json"] if json_out else [])
    print(f"$ fastsam3d {' '.join(args)}", flush=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    print(f"  exit {done.returncode} in {time.monotonic() - started:.0f} s (log: {log})", flush=True)
    if done.returncode != 0:
        sys.exit(f"failed: see {log}")
    return json.loads(done.stdout) if json_out else {}


def golden_teacher(path: Path) -> Path:
    """Write the deterministic SAM-Med3D weights as an official-layout checkpoint (once)."""
    if path.exists():
        return path
    import importlib.util

    from fastsam3d_cli.model.checkpoint import save_checkpoint

    spec = importlib.util.spec_from_file_location("weights_rule", GOLDEN / "weights_rule.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)  # type: ignore[union-attr]
    state = rule.make_state_dict(rule.entries_from_manifest(str(GOLDEN / "keys_sam_med3d.json")))
    save_checkpoint(path, state, note="deterministic synthetic weights (golden weights_rule.py), not trained")
    return path


def dice_row(summary: dict) -> dict:
    overall = summary.get("overall") or {}
    return {k: overall.get(k) for k in overall if k.startswith("dice") or k.startswith("best")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/runs/distill/proof"))
    parser.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint (default: deterministic)")
    parser.add_argument("--classes", default=CLASSES)
    parser.add_argument("--epochs-per-stage", type=int, default=5)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--unfreeze-patience", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--no-teacher-finetune", action="store_true")
    args = parser.parse_args()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "classes": args.classes, "host_cpus": os.cpu_count()}

    prepared = out / "prepared"
    if not (prepared / "manifest.json").exists():
        run(["prepare", str(DATA / "Dataset501_AbdomenCT"), str(DATA / "Dataset502_AbdomenMR"), "-o", str(prepared),
             "--classes", args.classes], out / "prepare.log")
    teacher = args.teacher.absolute() if args.teacher else golden_teacher(out / "teacher_deterministic.pth")
    summary["teacher"] = {"path": str(teacher), "kind": "given" if args.teacher else "deterministic (golden weight rule)"}

    distill_dir = out / "distill"
    resume = ["--resume"] if (distill_dir / "last.pth").exists() else []
    result = run(["distill", str(prepared), "--teacher", str(teacher), "--student", "fastsam3d-tiny",
                  "-o", str(distill_dir), "--cache-features", str(out / "teacher_features"), "--epochs-per-stage", str(args.epochs_per_stage),
                  "--lr", str(args.distill_lr), "--device", "cpu", *resume], out / "distill.log")
    summary["distill"] = result
    student = distill_dir / "student.pth"

    finetunes = {"student": (student, "fastsam3d-tiny")}
    if not args.no_teacher_finetune:
        finetunes["teacher"] = (teacher, "sam-med3d")
    tuned = {}
    for name, (init, preset) in finetunes.items():
        run_dir = out / f"finetune_{name}"
        resume = ["--resume"] if (run_dir / "last.pth").exists() else ["--init", str(init)]
        result = run(["train", str(prepared), "--model", preset, *resume, "--freeze-encoder",
                      "--unfreeze-patience", str(args.unfreeze_patience), "--epochs", str(args.finetune_epochs),
                      "--lr", "8e-4", "-o", str(run_dir), "--device", "cpu"], out / f"finetune_{name}.log")
        summary[f"finetune_{name}"] = result
        tuned[name] = run_dir / "last.pth"

    checkpoints = {"teacher": teacher, "student (distilled, teacher's decoder)": student}
    checkpoints.update({f"{name} (decoder fine-tuned)": path for name, path in tuned.items()})
    summary["validate"] = {}
    for label, path in checkpoints.items():
        slug = label.split(" ")[0] + ("_tuned" if "fine-tuned" in label else "")
        result = run(["validate", str(prepared), "--checkpoint", str(path), "--clicks", str(args.clicks),
                      "--device", "cpu"], out / f"validate_{slug}.log")
        summary["validate"][label] = result
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report(summary)


def report(summary: dict) -> None:
    d = summary["distill"]
    print(f"\nteacher: {summary['teacher']['kind']}; cache {d['cache']['bytes'] / 1e6:.1f} MB ({d['cache']['dtype']}), "
          f"{d['samples']} samples")
    print(f"{'stage':>5}  {'pair':<40} {'MSE before':>11} {'MSE after':>11}")
    for s in d["stages"]:
        print(f"{s['stage']:>5}  {s['pair']:<40} {s['start_mse']:>11.4g} {s['end_mse']:>11.4g}")
    print(f"neck MSE student↔teacher: {d['neck_mse']['init']:.4g} at initialisation → {d['neck_mse']['final']:.4g}")
    print("\nvalidate (same classes, same crops and clicks):")
    for label, result in summary["validate"].items():
        print(f"  {label:<42} {json.dumps(dice_row(result))}")
    print(f"\ntotal {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
