"""Training throughput of `fastsam3d train` recipes, side by side in one process (issue 16, part 4).

Runs optimizer steps of the reference recipe (11 decoder iterations, every one back-propagated, batch 1)
and of the fast recipe (RITM-style: random 0..N-K rounds without gradients, K with them; batch B), taking
turns so that both see the same machine load, on real prepared data (crop reading and augmentation
included). Reports (case, class) samples per minute and decoder steps per minute, median over rounds.

    python benchmarks/train_throughput.py PREPARED_DIR [--rounds 3] [--steps 4] [--batch 2] [--grad-iterations 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--model", default="fastsam3d-tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per recipe per round")
    parser.add_argument("--iterations", type=int, default=11)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grad-iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fastsam3d_cli.data.prepared import list_prepared_samples
    from fastsam3d_cli.data.training_data import InteractiveCropDataset
    from fastsam3d_cli.model import build_model
    from fastsam3d_cli.training.train import interactive_loss

    dataset = InteractiveCropDataset(list_prepared_samples(args.prepared), seed=2023, max_shift=16,
                                     min_foreground_voxels=1000, crop_size=128)
    torch.manual_seed(0)
    model = build_model(args.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    recipes = {
        "reference": dict(batch=1, grad_iterations=None),
        "fast": dict(batch=args.batch, grad_iterations=args.grad_iterations),
    }
    rng = np.random.default_rng(0)
    timings: dict[str, list[tuple[float, int, int]]] = {name: [] for name in recipes}
    cursor = 0
    for round_index in range(args.rounds):
        for name, recipe in recipes.items():
            samples = decoder_steps = 0
            start = time.perf_counter()
            for _ in range(args.steps):
                items = [dataset[(cursor + i) % len(dataset)] for i in range(recipe["batch"])]
                cursor += recipe["batch"]
                image = torch.stack([item["image"] for item in items])
                label = torch.stack([item["label"] for item in items])
                optimizer.zero_grad(set_to_none=True)
                embedding = model.encode(image)
                counter = _count_decodes(model)
                result = interactive_loss(model, embedding, label, None, args.iterations, rng,
                                          recipe["grad_iterations"])
                result.loss.backward()
                optimizer.step()
                decoder_steps += counter.stop() * recipe["batch"]
                samples += recipe["batch"]
            timings[name].append((time.perf_counter() - start, samples, decoder_steps))
    report = {"model": args.model, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rounds": args.rounds, "steps_per_round": args.steps,
              "iterations": args.iterations, "recipes": {}}
    for name, rows in timings.items():
        per_min = [60.0 * s / t for t, s, _ in rows]
        decodes = [60.0 * d / t for t, _, d in rows]
        report["recipes"][name] = {**{k: v for k, v in recipes[name].items()},
                                   "samples_per_min": round(statistics.median(per_min), 2),
                                   "samples_per_min_all": [round(v, 2) for v in per_min],
                                   "decoder_steps_per_min": round(statistics.median(decodes), 1)}
    ref, fast = report["recipes"]["reference"], report["recipes"]["fast"]
    report["speedup_samples_per_min"] = round(fast["samples_per_min"] / ref["samples_per_min"], 2)
    print(json.dumps(report, indent=2))


class _count_decodes:
    """Counts `model.decode` calls until stop() (to report decoder steps per minute)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls = model, 0
        self.original = model.decode

        def counted(*a, **k):
            self.calls += 1
            return self.original(*a, **k)

        model.decode = counted

    def stop(self) -> int:
        self.model.decode = self.original
        return self.calls


if __name__ == "__main__":
    main()
