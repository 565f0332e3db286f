#!/usr/bin/env python
"""Encoder (and decoder-step) time for each preset × attention backend × dtype, with the speed targets.

    python benchmarks/encoder_speed.py                       # CPU: 3 presets × exact/sdpa × fp32/bf16
    python benchmarks/encoder_speed.py --dtypes float32 --repeats 10 --json runs/encoder_speed.json
    python benchmarks/encoder_speed.py --from-json result.json   # summarise a saved `fastsam3d benchmark --json`

Everything is measured in ONE run through `fastsam3d_cli.benchmark.speed.run_benchmark` (the machinery behind
`fastsam3d benchmark`): the first call is reported apart, warm-up is discarded, and the median of the
timed repeats is used. `--budget` (seconds per configuration, default 60) cuts warm-up and repeats of slow
configurations — the teacher with `exact` attention takes ~10 s per encode on a 2-core CPU — down to 1
warm-up and 3 repeats at least; the `n` column says how many repeats each row got.

Prints a Markdown table (for README.md) with date, device, threads and the command, then each target
with the measured value and PASS/FAIL. Targets (issue 2, 2-core CPU, ratios within one run; issue 8 GPU):

* sam-med3d: padded-window path (`sdpa`) at least 5× faster than `exact`;
* fastsam3d encoder ≤ 0.2 s;
* fastsam3d-tiny encoder at least 4× faster than fastsam3d;
* prompt encoder + mask decoder step for one click ≤ 10 ms;
* on CUDA: fastsam3d encoder ≤ 3 ms in bfloat16 (H100/H200 class; the paper: 8 ms on an A100).

Each target is judged per dtype, on the `sdpa` rows (what `auto` picks on CPU). Exit status: 0 when the
run completed (targets may FAIL: they are reported, not enforced), 2 on bad options.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

PRESETS = ("sam-med3d", "fastsam3d", "fastsam3d-tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PRESETS))
    parser.add_argument("--attentions", nargs="+", default=["exact", "sdpa"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per configuration (0 = no cap)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the full result and the targets here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="summarise this saved `fastsam3d benchmark --json` output instead of measuring")
    parser.add_argument("--command", default=None, help="with --from-json: the command that produced it")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- lookups
def _row(result: dict, model: str, attention: str, dtype: str) -> dict | None:
    for config in result["configs"]:
        if (config["model"], config["attention"], config["dtype"]) == (model, attention, dtype) \
                and config["status"] == "ok":
            return config
    return None


def _median(config: dict | None, what: str = "encoder") -> float | None:
    return None if config is None else config[what]["median_ms"]


# ----------------------------------------------------------------------------------------- targets
def evaluate_targets(result: dict) -> list[dict]:
    """Each target per dtype: what was measured, the limit, PASS/FAIL (or 'not measured')."""
    targets = []
    device_type = result["environment"]["device"].split(":")[0]

    def add(name: str, dtype: str, value: float | None, limit: float, unit: str, higher_is_better: bool) -> None:
        if value is None:
            verdict = "not measured"
        else:
            verdict = "PASS" if (value >= limit if higher_is_better else value <= limit) else "FAIL"
        targets.append({"target": name, "dtype": dtype, "value": value, "limit": limit, "unit": unit,
                        "verdict": verdict})

    for dtype in result["settings"]["dtypes"]:
        teacher_exact = _median(_row(result, "sam-med3d", "exact", dtype))
        teacher_sdpa = _median(_row(result, "sam-med3d", "sdpa", dtype))
        student = _median(_row(result, "fastsam3d", "sdpa", dtype))
        tiny = _median(_row(result, "fastsam3d-tiny", "sdpa", dtype))
        step = _median(_row(result, "fastsam3d", "sdpa", dtype), "decoder_step")
        if device_type == "cpu":
            add("sam-med3d: sdpa (padded window) at least 5x faster than exact", dtype,
                None if teacher_exact is None or teacher_sdpa is None else teacher_exact / teacher_sdpa, 5.0, "x", True)
            add("fastsam3d encoder <= 0.2 s", dtype, student, 200.0, "ms", False)
            add("fastsam3d-tiny encoder at least 4x faster than fastsam3d", dtype,
                None if student is None or tiny is None else student / tiny, 4.0, "x", True)
            add("prompt encoder + decoder step for one click <= 10 ms", dtype, step, 10.0, "ms", False)
        elif dtype == "bfloat16":
            add("fastsam3d encoder <= 3 ms in bfloat16 on an H100/H200-class GPU", dtype, student, 3.0, "ms", False)
    return targets


# ----------------------------------------------------------------------------------------- printing
def _cell(stats: dict) -> str:
    return f"{stats['median_ms']:.1f} [{stats['p5_ms']:.1f}–{stats['p95_ms']:.1f}]"


def markdown(result: dict, command: str) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [
        f"Measured {env['date_utc']} on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"CUDA {env['cuda'] or '-'}, flash-attn {env['flash_attn'] or 'not installed'}, "
        f"{env['torch_threads']} torch thread(s) of {env['cpu_cores_available']} core(s), "
        f"CPU GEMMs on {env.get('cpu_gemm', 'aten')}, load average {env['load_average_1m']:.2f} → {env.get('load_average_1m_end') or 0:.2f} "
        f"(other processes may have been running).",
        f"Command: `{command}`",
        f"Batch {settings['batch']}; ms per call, median [p5–p95] over n timed repeats after the first call and "
        f"{settings['warmup']} warm-up(s) (* = cut by the {settings['budget_s']:.0f} s budget per configuration); "
        f"decoder step = prompt encoder + mask decoder for one click.",
        "",
        "| model | attention | dtype | encoder ms | n | 1st call ms | decoder step ms | encoder GMAC | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in result["configs"]:
        attention = config["attention"] if config["backend"] in (None, config["attention"]) \
            else f"{config['attention']} ({config['backend']})"
        if config["status"] != "ok":
            lines.append(f"| {config['model']} | {attention} | {config['dtype']} | {config['status']}: "
                         f"{config['reason']} | | | | | |")
            continue
        gmacs = f"{config['flops']['image_encoder']['gmacs']:.1f}" if config.get("flops") else "-"
        peak = "-" if config["peak_memory_mb"] is None else f"{config['peak_memory_mb']:.0f}"
        lines.append(f"| {config['model']} | {attention} | {config['dtype']} | {_cell(config['encoder'])} | "
                     f"{config['repeats_done']}{'*' if config['capped_by_budget'] else ''} | "
                     f"{config['first_call']['encoder_ms']:.0f} | "
                     f"{_cell(config['decoder_step'])} | {gmacs} | {peak} |")
    return "\n".join(lines)


def targets_text(targets: list[dict]) -> str:
    lines = ["", "Targets:"]
    for t in targets:
        value = "-" if t["value"] is None else (f"{t['value']:.2f}x" if t["unit"] == "x" else f"{t['value']:.1f} ms")
        limit = f"{t['limit']:g}x" if t["unit"] == "x" else f"{t['limit']:g} ms"
        lines.append(f"  [{t['verdict']}] {t['target']} ({t['dtype']}): measured {value}, target {limit}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/encoder_speed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        result = saved["result"] if "result" in saved else saved  # this script's --json, or the CLI's
        command = args.command or saved.get("command") or f"(not recorded; settings: {json.dumps(result['settings'])})"
    else:
        from fastsam3d_cli.benchmark.speed import run_benchmark
        from fastsam3d_cli.errors import FastSAM3DError

        try:
            result = run_benchmark(models=args.models, attentions=args.attentions, device=args.device,
                                   dtypes=args.dtypes, repeats=args.repeats, warmup=args.warmup, clicks=args.clicks,
                                   budget_s=args.budget, threads=args.threads,
                                   progress=lambda text: print(text, file=sys.stderr, flush=True)).to_dict()
        except FastSAM3DError as exc:
            print(f"encoder_speed: error: {exc.one_line()}", file=sys.stderr)
            return int(exc.exit_code)
    targets = evaluate_targets(result)
    print(markdown(result, command))
    for warning in result.get("warnings", []):
        print(f"\nWARNING: {warning}")
    print(targets_text(targets))
    if args.json is not None:
        from fastsam3d_cli.imaging.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"result": result, "targets": targets, "command": command}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
