#!/usr/bin/env python
"""What a command-line user waits for: cold `fastsam3d infer`, file to file, beside a bare `import torch`.

    python benchmarks/cold_infer.py [--repeats 5] [--max-crops 1] [--models fastsam3d fastsam3d-tiny] [--json FILE]

Every measurement is a fresh process, timed from outside (wall clock, and the child's user+system CPU time),
repeated --repeats times in round-robin order (so a burst of load from other processes hits all of them
alike), and reported as the median with the min–max range:

* `python -c "import torch"` — the floor every torch program pays;
* `python -c "import fastsam3d_cli"` and `fastsam3d --help` — what the package adds before any work;
* `fastsam3d infer examples/abdomen_ct.nii.gz -c examples/abdomen_clicks.json -o OUT --json` for the default
  model (`--model fastsam3d` from the weights cache, as a user runs it) and for `fastsam3d-tiny`
  (`--checkpoint`).

Weights: the published checkpoints cannot be downloaded here, so the default model's cache entry is a
checkpoint built in code in the official FastSAM3D training layout (epoch, model_state_dict,
optimizer_state_dict with AdamW moments, args, used_datas — the 638 MB file's structure and size) with the
golden rule's deterministic weights ($FASTSAM3D_GOLDEN_DIR/weights_rule.py), imported with
`fastsam3d weights import` into a temporary FASTSAM3D_HOME. Their masks are noise, and crop extension follows
the mask, so the runs use --max-crops 1 (one crop per object: 2 crops, 3 decoder steps for the example
clicks), what a trained model runs for organs that fit in 192 mm.

The per-phase breakdown comes from infer's sidecar (`timings_ms`): interpreter + imports + CLI = process wall
minus infer_file's own wall; model load; read; preprocess; encode (first crop apart); decode (first step
apart); paste; write. The same pipeline is then run warm in this process (model loaded once, --repeats runs
after one untimed), so each cold phase is printed beside its warm figure; the difference is the first-call
cost. The goal (issue 15, item 19): cold infer of the default model within 1 s of the bare torch import.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VOLUME = REPO / "examples" / "abdomen_ct.nii.gz"
CLICKS = REPO / "examples" / "abdomen_clicks.json"
PHASES = ("read", "preprocess", "encode", "decode", "paste", "write")
GOAL_S = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-crops", type=int, default=1, help="infer --max-crops (default 1, see above)")
    parser.add_argument("--models", nargs="+", default=["fastsam3d", "fastsam3d-tiny"],
                        choices=["fastsam3d", "fastsam3d-tiny", "bundled"],
                        help="bundled: the model shipped in the package (`--model bundled`, what runs by default "
                             "offline), real trained weights; the others use deterministic stand-in weights")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keeps the built checkpoints between runs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every process (default: torch's choice, all cores). On a busy "
                             "machine --threads 1 makes CPU seconds a fair measure: no thread spins waiting for a "
                             "descheduled sibling")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fastsam3d-cold-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FASTSAM3D_HOME": str(workdir / "home"), "FASTSAM3D_OFFLINE": "1", "NO_COLOR": "1"}
    if args.threads:
        import torch

        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # the warm reference runs in this process
    golden = Path(os.environ.get("FASTSAM3D_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
    checkpoints = {model: None if model == "bundled" else build_checkpoint(model, golden, workdir)
                   for model in args.models}
    if "fastsam3d" in checkpoints:
        run([*fastsam3d_command(), "weights", "import", "fastsam3d", str(checkpoints["fastsam3d"]), "--replace"],
            env)

    commands: dict[str, list[str]] = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import fastsam3d_cli'": [sys.executable, "-c", "import fastsam3d_cli"],
        "fastsam3d --help": [*fastsam3d_command(), "--help"],
    }
    for model in args.models:
        out = workdir / f"out_{model}.nii.gz"  # the same file each repeat (--overwrite)
        choice = (["--model", model] if checkpoints[model] is None
                  else ["--model", model, "--checkpoint", str(checkpoints[model])])
        commands[f"fastsam3d infer ({model})"] = [*fastsam3d_command(), "infer", str(VOLUME), "--clicks", str(CLICKS),
                                                  "-o", str(out), "--overwrite", "--device", "cpu", "--json",
                                                  "--max-crops", str(args.max_crops), *choice]

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            samples[name].append(run(command, env))
    warm = {model: warm_phases(model, checkpoints[model], workdir, args) for model in args.models}
    load_after = os.getloadavg()

    report = summarise(samples, warm, args, started, (load_before[0], load_after[0]), commands)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ processes
def fastsam3d_command() -> list[str]:
    """The console script of this interpreter's environment (what a user types), else `python -m`."""
    script = Path(sys.executable).parent / "fastsam3d"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fastsam3d_cli"]


def run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one fresh process; its wall time, CPU time (user + system, all threads) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {shlex.join(command)}\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sample: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu}
    if "--json" in command and "infer" in command:
        sample["sidecar"] = json.loads(result.stdout)
    return sample


# ------------------------------------------------------------------------------------------ weights
def build_checkpoint(model: str, golden: Path, workdir: Path) -> Path:
    """A checkpoint of `model` with the golden rule's deterministic weights, cached in workdir.

    fastsam3d: the official training layout, optimizer moments included (the published file's size);
    fastsam3d-tiny: what `fastsam3d distill`/`train` save ({'model_state_dict', 'config'}).
    """
    import argparse as _argparse
    import collections

    import torch
    from infer_speed import golden_state_dict  # a sibling script: benchmarks/ is on sys.path

    from fastsam3d_cli.model.checkpoint import save_checkpoint

    path = workdir / f"{model}_deterministic.pth"
    if path.is_file():
        return path
    state, net = golden_state_dict(model, golden)
    if model != "fastsam3d":
        save_checkpoint(path, state, config=net.config.to_dict())
        return path
    names = [k for k, _ in net.named_parameters()]
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(state[k]),
                   "exp_avg_sq": torch.zeros_like(state[k])} for i, k in enumerate(names)}
    payload = {"epoch": 199, "model_state_dict": state,
               "optimizer_state_dict": {"state": moments, "param_groups": [{"lr": 8e-5, "params": list(moments)}]},
               "lr_scheduler_state_dict": {"last_epoch": 199}, "losses": [0.1], "dices": [0.8], "best_loss": 0.1,
               "best_dice": 0.8, "args": _argparse.Namespace(model_type="vit_b_ori", skip_layer=2),
               "used_datas": collections.Counter({"AMOS": 1})}
    tmp = path.with_suffix(".partial")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ warm reference
def warm_phases(model: str, checkpoint: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same infer, in this process with the model loaded once: median phases of --repeats runs after one."""
    from fastsam3d_cli.interactive.infer import infer_file
    from fastsam3d_cli.weights.loading import load_inference_model

    loaded = load_inference_model(model, checkpoint, "cpu")
    runs = []
    for _ in range(1 + args.repeats):
        result = infer_file(VOLUME, CLICKS, workdir / f"warm_{model}.nii.gz", loaded=loaded, overwrite=True,
                            max_crops=args.max_crops)
        runs.append(result["timings_ms"])
    runs = runs[1:]
    phases = {phase: statistics.median(r[phase] for r in runs) for phase in PHASES}
    phases["encode_first"] = statistics.median(_first_ms(r["encode_per_crop"]) for r in runs)
    phases["decode_first"] = statistics.median(r["decode_per_click"][0]["ms"] for r in runs)
    phases["after_model_load"] = statistics.median(r["after_model_load"] for r in runs)
    return phases


# ------------------------------------------------------------------------------------------ report
def _first_ms(records: list[dict[str, Any]]) -> float:
    """The first record's ms; 0 when there is none (a prior-only model runs no encoder pass)."""
    return float(records[0]["ms"]) if records else 0.0


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(samples: dict[str, list[dict[str, Any]]], warm: dict[str, dict[str, Any]], args: argparse.Namespace,
              started: datetime.datetime, load: tuple[float, float], commands: dict[str, list[str]]) -> dict[str, Any]:
    import torch

    rows = {name: {"wall_s": spread([s["wall_s"] for s in runs]), "cpu_s": spread([s["cpu_s"] for s in runs])}
            for name, runs in samples.items()}
    phases: dict[str, Any] = {}
    for model in args.models:
        runs = samples[f"fastsam3d infer ({model})"]
        per_run = []
        for sample in runs:
            t = sample["sidecar"]["timings_ms"]
            per_run.append({
                "startup": sample["wall_s"] * 1000.0 - t["wall"],  # interpreter, imports, CLI, exit
                "load_model": t["load_model"], **{phase: t[phase] for phase in PHASES},
                "encode_first": _first_ms(t["encode_per_crop"]), "decode_first": t["decode_per_click"][0]["ms"],
                "crops_run": sample["sidecar"]["crops_run"]})
        phases[model] = {key: spread([r[key] for r in per_run]) for key in per_run[0]}
    torch_s = rows["python -c 'import torch'"]["wall_s"]["median"]
    goal = {}  # the default model online (fastsam3d) and offline (bundled)
    for model in ("fastsam3d", "bundled"):
        if model in args.models:
            infer_s = rows[f"fastsam3d infer ({model})"]["wall_s"]["median"]
            goal[model] = {"cold_infer_s": infer_s, "import_torch_s": torch_s, "difference_s": infer_s - torch_s,
                           "goal_s": GOAL_S, "met": infer_s - torch_s <= GOAL_S}
    return {
        "date_utc": started.isoformat(timespec="seconds"), "machine": machine(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "max_crops": args.max_crops,
        "load_average_1min": [round(load[0], 2), round(load[1], 2)],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "commands": {name: shlex.join(c) for name, c in commands.items()},
        "processes": rows, "phases_ms": phases, "warm_phases_ms": warm, "goal": goal,
    }


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"cold fastsam3d infer — {report['date_utc']}, {m['cpu']}, {m['cores']} cores, torch {report['torch']} "
          f"({report['torch_threads']} threads), {m['platform']}")
    print(f"command: {report['command']}; {report['repeats']} repeats, round-robin; infer --max-crops "
          f"{report['max_crops']}; 1-min load average before/after {report['load_average_1min'][0]} / "
          f"{report['load_average_1min'][1]}")
    print()
    print("| process | wall s, median (min–max) | CPU s (user+sys), median (min–max) |")
    print("|---|---|---|")
    for name, row in report["processes"].items():
        print(f"| `{name}` | {fmt(row['wall_s'], 2)} | {fmt(row['cpu_s'], 2)} |")
    for model, phases in report["phases_ms"].items():
        warm = report["warm_phases_ms"][model]
        print()
        print(f"`fastsam3d infer` ({model}), per phase from the sidecar, ms: cold process (median, min–max) "
              f"vs the same phase warm in one process (median); crops run {phases['crops_run']['median']:.0f}")
        print()
        print("| phase | cold | warm | first-call cost |")
        print("|---|---|---|---|")
        print(f"| interpreter + imports + CLI + exit | {fmt(phases['startup'], 0)} | — | — |")
        print(f"| model load (resolve, read, sha256, build) | {fmt(phases['load_model'], 0)} | — | — |")
        for phase in ("read", "preprocess", "encode", "encode_first", "decode", "decode_first", "paste", "write"):
            label = {"encode_first": "  first crop's encode", "decode_first": "  first decoder step"}.get(phase, phase)
            cold = phases[phase]["median"]
            print(f"| {label} | {fmt(phases[phase], 0)} | {warm[phase]:.0f} | {cold - warm[phase]:+.0f} |")
    for model, goal in report["goal"].items():
        verdict = "MET" if goal["met"] else "NOT MET"
        which = {"fastsam3d": "default model online", "bundled": "default model offline"}[model]
        print()
        print(f"goal: cold infer ({model}, the {which}) within {goal['goal_s']:.0f} s of a bare `import torch`: "
              f"{goal['cold_infer_s']:.2f} s − {goal['import_torch_s']:.2f} s = {goal['difference_s']:.2f} s → {verdict}")
    if report["load_average_1min"][0] > 0.5 * report["machine"]["cores"] \
            or report["load_average_1min"][1] > 0.5 * report["machine"]["cores"]:
        print("warning: other processes competed for the CPU during this run (load average above); wall times are "
              "inflated — compare CPU seconds, or rerun on a quiet machine before quoting wall times")


def fmt(value: dict[str, float], digits: int) -> str:
    return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}–{value['max']:.{digits}f})"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


if __name__ == "__main__":
    raise SystemExit(main())
