"""Dice after 1..N simulated clicks, per target, on unseen (data/validation/) and seen (training) volumes.

Scores the classical floor, the untrained fastsam3d-tiny (the seeded weights a new `train` run starts
from) and every checkpoint given, each through the same click protocol (docs/evaluation.md); checkpoints
run through the real `Predictor` on the full volume, the product path. Writes a JSON, a markdown table and
a Dice-versus-clicks PNG.

    python benchmarks/evaluate_unseen.py                                  # floor + untrained, validation + 8 classes per training dataset
    python benchmarks/evaluate_unseen.py --checkpoint runs/tiny/best.pth --sets unseen
    python benchmarks/evaluate_unseen.py --checkpoint bundled=model.pth --seen-classes 0   # every training class
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from fastsam3d_cli.errors import FastSAM3DError
from fastsam3d_cli.imaging.atomic import write_text_atomic
from fastsam3d_cli.training import evaluation as ev

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("FASTSAM3D_DATA_DIR", REPO.parent / "shared" / "data")),
                        help="folder holding validation/ and the training datasets (env FASTSAM3D_DATA_DIR)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                        help="a checkpoint to score (repeatable); NAME (no '=') defaults to the file's stem")
    parser.add_argument("--no-floor", action="store_true", help="leave the classical floor out")
    parser.add_argument("--no-untrained", action="store_true", help="leave the untrained fastsam3d-tiny out")
    parser.add_argument("--untrained-refine", type=Path, default=None, metavar="CHECKPOINT",
                        help="also score CHECKPOINT with its refine head reset to its initial weights (what "
                             "`train --refine-head` starts from: the floor on the model's crops)")
    parser.add_argument("--sets", default="unseen,seen", help="unseen, seen or both (comma-separated)")
    parser.add_argument("--seen-classes", type=int, default=8,
                        help="classes per training dataset, spread evenly over its list (0 = all)")
    parser.add_argument("--clicks", type=int, default=10, help="clicks per target (default 10)")
    parser.add_argument("--attention", default="auto", help="encoder attention backend for the models")
    parser.add_argument("--max-crops", type=int, default=None, help="Predictor crops per object (default: infer's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="output prefix: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    sets = {s.strip() for s in args.sets.split(",") if s.strip()}
    if not sets or sets - {"unseen", "seen"}:
        parser.error(f"--sets {args.sets!r}: use unseen, seen or unseen,seen")
    if args.clicks < 1 or args.seen_classes < 0:
        parser.error("--clicks must be ≥ 1 and --seen-classes ≥ 0")
    args.sets = sets
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; a bad checkpoint, data folder or output is one line on stderr and its exit code."""
    args = parse_args(argv)
    try:
        return _run(args, argv)
    except FastSAM3DError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return int(error.exit_code)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    methods: list[ev.Method] = []
    if not args.no_floor:
        methods.append(ev.classical_method())
    if not args.no_untrained:
        methods.append(ev.model_method("untrained tiny", ev.untrained_model(attention=args.attention), args.max_crops))
    if args.untrained_refine is not None:
        model = ev.checkpoint_model(args.untrained_refine, args.attention)
        ev.reset_refine_head(model)
        methods.append(ev.model_method("untrained refine", model, args.max_crops))
    for spec in args.checkpoint:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).stem, "", spec)
        methods.append(ev.model_method(name, ev.checkpoint_model(path, args.attention), args.max_crops))
    if not methods:
        print("nothing to score: give --checkpoint or leave the floor/untrained model in", file=sys.stderr)
        return 2
    names = [m.name for m in methods]

    def volumes():
        if "unseen" in args.sets:
            yield from ev.load_validation(args.data_dir)
        if "seen" in args.sets:
            yield from ev.load_training(args.data_dir, args.seen_classes or None)

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *(argv or sys.argv[1:])])
    header = (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.processor() or platform.machine()}"
              f" · {torch.get_num_threads()} torch threads · torch {torch.__version__} · `{command}`")
    print(header, file=sys.stderr)
    start = time.perf_counter()
    results = ev.evaluate(volumes(), methods, args.clicks, progress=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - start
    totals = {m: sum(r.seconds.get(m, 0.0) for r in results) for m in names}
    timing = f"{len(results)} targets in {seconds:.0f} s (" + ", ".join(f"{m} {s:.0f} s" for m, s in totals.items()) + ")"
    table = f"{header}\n\n{ev.markdown_table(results, names, args.clicks)}\n{timing}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = ev.results_json(results, names, args.clicks, command=command, date=header.split(" · ")[0],
                           seconds=seconds, torch_threads=torch.get_num_threads())
    import json

    write_text_atomic(args.out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), table)
    ev.plot_curves(results, names, args.clicks, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
