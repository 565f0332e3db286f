#!/usr/bin/env python
"""File-to-file speed of `fastsam3d infer` on the example CT, split per stage, and the cost of a second click.

    python benchmarks/infer_speed.py [--preset fastsam3d] [--repeats 5] [--max-crops 1] [--threads N]
    python benchmarks/infer_speed.py --checkpoint bundled --max-crops 8 --threads 2   # the shipped model

* Volume: Dataset501_AbdomenCT (122×101×112, 3 mm, int32) from $FASTSAM3D_DATA_DIR (default ../shared/data).
* Clicks: two include clicks inside the liver (from its reference label), in RAS millimetres.
* Weights: DETERMINISTIC synthetic weights of the chosen preset (the golden-data rule in
  $FASTSAM3D_GOLDEN_DIR/weights_rule.py, default ../shared/golden) saved as a real checkpoint file and loaded
  through the normal loader — speed does not depend on the weight values, but their masks are noise, and
  crop extension follows the mask: the timed runs therefore use --max-crops 1 (one 128³ crop, what a
  real model runs for an organ that fits in 192 mm); each further crop adds its resample + encode + one
  decoder step per click, printed as "per extra crop". --also-max-crops N times the noise worst case.
  `--checkpoint PATH` (or `bundled`, the model shipped in the package) times real weights instead: their mask
  is real, so give infer's own --max-crops (8).
* "after model load" = what `infer_file` spends once the model is in memory: reading the volume and click
  file (with sha256), preprocessing, encode, decode per click, paste back, writing labelmap + sidecar.
  The first run in a process is reported separately (cold: allocator and oneDNN warm-up), then the median
  of --repeats warm runs.
* Second click: `Predictor.add_click` on the same object after a first click (decoder + paste back, the
  embedding is cached), median of --repeats.

Prints a table and a final JSON line (machine, threads, numbers). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("read", "preprocess", "encode", "decode", "paste", "write")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fastsam3d", choices=("fastsam3d", "sam-med3d", "fastsam3d-tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-crops", type=int, default=1,
                        help="crops per object for the timed runs (default 1, see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--checkpoint", default=None, metavar="PATH|bundled",
                        help="time these real weights (or the bundled model) instead of the preset's deterministic ones")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint is cached (default: temp)")
    parser.add_argument("--also-max-crops", type=int, default=None, metavar="N",
                        help="also time one run with --max-crops N (with deterministic weights the mask is noise "
                             "that touches every crop face, so this is the worst case: N crops)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fastsam3d_cli.interactive.infer import infer_file
    from fastsam3d_cli.weights.loading import load_inference_model
    from fastsam3d_cli.interactive.predictor import Predictor

    data_dir = Path(os.environ.get("FASTSAM3D_DATA_DIR", REPO.parent / "shared" / "data"))
    golden_dir = Path(os.environ.get("FASTSAM3D_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
    case = data_dir / "Dataset501_AbdomenCT"
    volume = case / "imagesTr" / "abdomen_0000.nii.gz"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fastsam3d-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights_label = "deterministic weights"
    if args.checkpoint == "bundled":
        from fastsam3d_cli.weights import bundled

        checkpoint, _ = bundled.verified_path(bundled.require_installed())
        weights_label = f"the bundled model ({checkpoint.name})"
    elif args.checkpoint:
        checkpoint, weights_label = Path(args.checkpoint), f"checkpoint {args.checkpoint}"
    else:
        checkpoint = deterministic_checkpoint(args.preset, golden_dir, workdir)
    clicks_ras = liver_clicks(case)
    clicks_file = workdir / "clicks.json"
    clicks_file.write_text(json.dumps({"version": 1, "space": "ras", "objects": [
        {"name": "liver", "label": 1, "points": [clicks_ras[0]], "point_labels": [1]}]}))

    load_before = os.getloadavg()
    start = time.perf_counter()
    loaded = load_inference_model(model=None if args.checkpoint else args.preset, checkpoint=checkpoint, device="cpu",
                                  attention=args.attention)
    load_s = time.perf_counter() - start

    cpu_seconds: list[float] = []

    def run(max_crops: int) -> tuple[float, dict]:
        begin, begin_cpu = time.perf_counter(), time.process_time()
        result = infer_file(volume, clicks_file, workdir / "liver_mask.nii.gz", loaded=loaded, overwrite=True,
                            max_crops=max_crops)
        cpu_seconds.append(time.process_time() - begin_cpu)
        return time.perf_counter() - begin, result

    cold_s, cold = run(args.max_crops)
    warm = [run(args.max_crops) for _ in range(args.repeats)]
    walls = [w for w, _ in warm]
    median_result = sorted(warm, key=lambda item: item[0])[len(warm) // 2][1]
    extra = [run(args.also_max_crops) for _ in range(1 + args.repeats)][1:] if args.also_max_crops else None

    def second_click(max_crops: int) -> tuple[list[float], list[float], int]:
        """Wall and CPU ms of a second click on the same object (the embeddings are cached), crops run."""
        predictor = Predictor(loaded.model, loaded.device, max_crops=max_crops)
        predictor.set_volume(volume)
        wall_ms, cpu_ms = [], []
        for _ in range(args.repeats):
            predictor.reset_object()
            predictor.add_click(clicks_ras[0], space="ras", object="liver")
            begin, begin_cpu = time.perf_counter(), time.process_time()
            predictor.add_click(clicks_ras[1], space="ras", object="liver")
            wall_ms.append((time.perf_counter() - begin) * 1000.0)
            cpu_ms.append((time.process_time() - begin_cpu) * 1000.0)
        return wall_ms, cpu_ms, len(predictor.object_report("liver")["crops"])

    second_ms, second_cpu_ms, _ = second_click(args.max_crops)
    extra_second = second_click(args.also_max_crops) if args.also_max_crops else None

    machine = {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(loaded.device),
               "attention": loaded.attention, "preset": loaded.preset}
    timings = median_result["timings_ms"]
    print(f"fastsam3d infer speed — {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), {loaded.preset} with {weights_label}, attention "
          f"{loaded.attention}")
    print(f"volume {volume.name} {sitk.ReadImage(str(volume)).GetSize()}, model load {load_s:.2f} s "
          f"(checkpoint read + sha256)")
    print(f"voxels in the mask (median run): {median_result.get('objects', [{}])[0].get('voxels', '?')}")
    print(f"{'stage':<12}{'ms (median run)':>18}")
    for stage in STAGES:
        print(f"{stage:<12}{timings[stage]:>18.1f}")
    print(f"{'sum':<12}{sum(timings[s] for s in STAGES):>18.1f}")
    load = os.getloadavg()
    print(f"load average before/now: {load_before[0]:.2f} / {load[0]:.2f} (1 min) — other processes on the CPU "
          "inflate every wall time here; CPU time of this process per warm run (all threads): median "
          f"{statistics.median(cpu_seconds[1:1 + args.repeats]) * 1000:.0f} ms")
    print(f"file to file after model load, --max-crops {args.max_crops}: cold {cold_s * 1000:.0f} ms, warm median "
          f"{statistics.median(walls) * 1000:.0f} ms (min {min(walls) * 1000:.0f}, max {max(walls) * 1000:.0f}) "
          f"over {len(walls)} runs; crops run {median_result['crops_run']}")
    encode_per_crop = [e["ms"] for e in timings["encode_per_crop"]]
    if encode_per_crop:
        print(f"per extra crop: crop resample + encode ≈ {statistics.median(encode_per_crop):.0f} ms encode, "
              "plus one decoder step per click inside it")
    else:  # a prior model whose residual is zero (the bundled model): the Predictor skips encoder and decoder
        print("no encoder pass: this model's decoder residual is zero, so each click is the classical floor plus "
              "the refine head on the clicks' box (per extra crop: its resample and smoothing)")
    if extra is not None:
        extra_walls = [w for w, _ in extra]
        extra_median = sorted(extra, key=lambda item: item[0])[len(extra) // 2][1]
        split = ", ".join(f"{s} {extra_median['timings_ms'][s]:.0f}" for s in STAGES)
        print(f"--max-crops {args.also_max_crops} (deterministic weights: noise mask, worst case): warm median "
              f"{statistics.median(extra_walls) * 1000:.0f} ms (min {min(extra_walls) * 1000:.0f}, max "
              f"{max(extra_walls) * 1000:.0f}) over {len(extra_walls)} runs after one untimed; crops run "
              f"{extra_median['crops_run']}; median run: {split}")
    print(f"second click on the same object: median {statistics.median(second_ms):.1f} ms "
          f"(min {min(second_ms):.1f}, max {max(second_ms):.1f}); CPU time median {statistics.median(second_cpu_ms):.1f} ms")
    if extra_second is not None:
        print(f"second click with --max-crops {args.also_max_crops} ({extra_second[2]} crops; only the crops that "
              f"must see the click are decoded): median {statistics.median(extra_second[0]):.1f} ms (min "
              f"{min(extra_second[0]):.1f}, max {max(extra_second[0]):.1f})")
    summary = {"machine": machine, "load_average_1min": [round(load_before[0], 2), round(load[0], 2)],
               "cpu_ms_per_warm_run": [round(c * 1000, 1) for c in cpu_seconds[1:1 + args.repeats]],
               "load_model_s": round(load_s, 3), "cold_ms": round(cold_s * 1000, 1),
               "warm_ms": [round(w * 1000, 1) for w in walls], "median_ms": round(statistics.median(walls) * 1000, 1),
               "stages_ms": {s: timings[s] for s in STAGES}, "max_crops": args.max_crops,
               "extra_run": None if extra is None else {"max_crops": args.also_max_crops,
                                                        "warm_ms": [round(w * 1000, 1) for w, _ in extra],
                                                        "second_click_ms": [round(v, 1) for v in extra_second[0]],
                                                        "crops_run": extra[0][1]["crops_run"]},
               "second_click_ms": [round(v, 2) for v in second_ms],
               "second_click_cpu_ms": [round(v, 2) for v in second_cpu_ms]}
    print(json.dumps(summary))
    return 0


def deterministic_checkpoint(preset: str, golden_dir: Path, workdir: Path) -> Path:
    """A checkpoint of `preset` with the golden rule's weights (key → crc32-seeded randn), cached in workdir."""
    from fastsam3d_cli.model.checkpoint import save_checkpoint

    path = workdir / f"{preset}_deterministic.pth"
    if path.is_file():
        return path
    state, _ = golden_state_dict(preset, golden_dir)
    save_checkpoint(path, state)
    return path


def golden_state_dict(preset: str, golden_dir: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(the golden rule's deterministic state dict of `preset`, the preset built on the meta device)."""
    from fastsam3d_cli.model import build_model

    spec = importlib.util.spec_from_file_location("weights_rule", golden_dir / "weights_rule.py")
    if spec is None or spec.loader is None:
        sys.exit(f"cannot find {golden_dir / 'weights_rule.py'} (set FASTSAM3D_GOLDEN_DIR)")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    with torch.device("meta"):
        net = build_model(preset)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return rule.make_state_dict([(k, s, rule.is_layernorm_weight_key(k)) for k, s in shapes.items()]), net


def liver_clicks(case: Path) -> list[list[float]]:
    """Two points well inside the liver (from the reference label), in RAS mm."""
    labels = json.loads((case / "dataset.json").read_text())["labels"]
    label_image = sitk.ReadImage(str(case / "labelsTr" / "abdomen.nii.gz"))
    from fastsam3d_cli.imaging.volumes import array_ijk

    liver = np.argwhere(array_ijk(label_image) == int(labels["liver"]))
    centre = liver.mean(axis=0)
    ordered = liver[np.argsort(np.linalg.norm(liver - centre, axis=1))]
    points = [ordered[0], ordered[len(ordered) // 4]]
    return [[-p[0], -p[1], p[2]] for p in (label_image.TransformIndexToPhysicalPoint([int(v) for v in q])
                                           for q in points)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
