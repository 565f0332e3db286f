"""Cost of one generated training sample per source, on one CPU thread (issue 16: ≲ 100 ms a sample).

    python benchmarks/synthetic_speed.py [--samples 20] [--data /work/shared/data] [--prepared DIR]

Reports, per source, the median and 90th percentile of CPU time (time.process_time: what the sample costs
one core, robust to other processes sharing the machine) and of wall time. Sources that need data the
machine lacks are skipped with a note. The one-off cost of reading the label maps is reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fastsam3d_cli.data.mixing import build_source
from fastsam3d_cli.data.synthetic import generator_for

LABEL_MAP_DATASETS = ("Dataset501_AbdomenCT", "Dataset502_AbdomenMR", "Task503_Colin27")


class _Plain:
    """The prepared pairs as the default `train` reads them (no --data-mix), for comparison."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def sample(self, gen: torch.Generator) -> dict:
        return self.dataset[int(torch.randint(len(self.dataset), (), generator=gen))]


def measure(source, samples: int) -> dict[str, float]:
    source.sample(generator_for(0, 0, 10_000, 0))  # warm-up (lazy caches)
    cpu, wall = [], []
    for index in range(samples):
        gen = generator_for(0, 0, index, 0)
        c0, w0 = time.process_time(), time.perf_counter()
        source.sample(gen)
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    cpu.sort()
    wall.sort()
    return {"cpu_ms_median": round(statistics.median(cpu), 1), "cpu_ms_p90": round(cpu[int(0.9 * (len(cpu) - 1))], 1),
            "wall_ms_median": round(statistics.median(wall), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FASTSAM3D_DATA_DIR", "/work/shared/data")))
    parser.add_argument("--prepared", type=Path, default=None, help="a prepared folder for the `real` source")
    args = parser.parse_args()
    torch.set_num_threads(1)
    roots = [args.data / name for name in LABEL_MAP_DATASETS if (args.data / name).is_dir()]
    report: dict[str, object] = {"threads": 1, "samples": args.samples}
    started = time.perf_counter()
    if roots:
        from fastsam3d_cli.data.label_maps import cached_label_maps

        cached_label_maps(roots, with_images=True)
        report["label_map_load_s"] = round(time.perf_counter() - started, 2)
    for name in ("shapes", "synth-labels", "supervoxels", "real"):
        if name in ("synth-labels", "supervoxels") and not roots:
            report[name] = "skipped: no label-map datasets under --data"
            continue
        if name == "real" and args.prepared is None:
            report[name] = "skipped: give --prepared DIR"
            continue
        real = None
        if name == "real":
            from fastsam3d_cli.data.prepared import list_prepared_samples
            from fastsam3d_cli.data.training_data import InteractiveCropDataset

            real = InteractiveCropDataset(list_prepared_samples(args.prepared), seed=0)
            report["real-unaugmented"] = measure(_Plain(real), args.samples)  # what the augmentation adds to
            print(f"real-unaugmented: {report['real-unaugmented']}", file=sys.stderr)
        source = build_source(name, label_maps=roots, real_dataset=real)
        report[name] = measure(source, args.samples)
        print(f"{name}: {report[name]}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
