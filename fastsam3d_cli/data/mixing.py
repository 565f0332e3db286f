"""The training dataset that mixes sources (`train --data-mix real=0.3,synth-labels=0.3,shapes=0.3,supervoxels=0.1`).

An epoch has `samples_per_epoch` items. Which source serves item i is fixed for the run: the counts follow
the ratios exactly (largest remainder), spread over the indices by a permutation of the seed, so the
trainer's shuffling sees every source in proportion and the run's sample names never change. What item i
holds in epoch e is a pure function of (seed, e, i): runs are reproducible and resume exactly with any
number of workers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsam3d_cli.errors import UsageError

SOURCE_NAMES = ("real", "synth-labels", "shapes", "supervoxels")
_STREAMS = {name: number for number, name in enumerate(SOURCE_NAMES, start=1)}


def parse_data_mix(text: str) -> dict[str, float]:
    """'real=0.3,shapes=0.7' → {'real': 0.3, 'shapes': 0.7}, normalised to sum 1 (UsageError, exit 2, otherwise).

    Ratios are non-negative finite numbers, at least one positive; each source at most once.
    """
    fix = f"write SOURCE=RATIO pairs separated by commas, sources: {', '.join(SOURCE_NAMES)}"
    ratios: dict[str, float] = {}
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise UsageError("--data-mix is empty", fix)
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--data-mix entry '{part}' is not SOURCE=RATIO", fix)
        if name not in SOURCE_NAMES:
            raise UsageError(f"--data-mix source '{name}' is unknown", fix)
        if name in ratios:
            raise UsageError(f"--data-mix names '{name}' twice", "give each source once")
        try:
            ratio = float(value)
        except ValueError:
            raise UsageError(f"--data-mix ratio '{value.strip()}' of {name} is not a number", fix) from None
        if not math.isfinite(ratio) or ratio < 0:
            raise UsageError(f"--data-mix ratio of {name} must be a finite number >= 0 (got {value.strip()})", fix)
        ratios[name] = ratio
    total = sum(ratios.values())
    if total <= 0:
        raise UsageError("--data-mix ratios are all 0", "give at least one source a positive ratio")
    return {name: ratio / total for name, ratio in ratios.items() if ratio > 0}


def source_counts(ratios: Mapping[str, float], total: int) -> dict[str, int]:
    """Items per source out of `total`, proportional to the ratios (largest remainder; ties in name order)."""
    names = sorted(ratios)
    exact = {name: ratios[name] * total for name in names}
    counts = {name: int(math.floor(exact[name])) for name in names}
    left = total - sum(counts.values())
    for name in sorted(names, key=lambda n: (-(exact[n] - counts[n]), n))[:left]:
        counts[name] += 1
    return counts


class MixedDataset(Dataset):
    """Items from several sources by ratio; each item a dict like the real dataset's (`image`, `label`, `valid`,
    `sample_index`).

    `sources` maps a name to an object with `sample(generator) -> dict` (generated sources) or, for "real",
    to a wrapper with `sample_real(index, epoch, generator)`; see data/synthetic.py and data/pseudo_tasks.py.
    """

    def __init__(self, sources: Mapping[str, Any], ratios: Mapping[str, float], samples_per_epoch: int,
                 seed: int, real: Any = None) -> None:
        missing = [name for name in ratios if name not in sources]
        if missing:
            raise ValueError(f"no source object for {missing}")
        self.sources, self.ratios = dict(sources), dict(ratios)
        self.seed, self.epoch = int(seed), 0
        self.real = real  # the prepared pairs' dataset (its left-out samples are reported by train)
        self.counts = source_counts(ratios, int(samples_per_epoch))
        names = [name for name in sorted(self.counts) for _ in range(self.counts[name])]
        order = np.random.default_rng([self.seed, 16_003]).permutation(len(names))
        self.source_of = [names[k] for k in order]
        # rank of each index within its source (the real source cycles through its samples by it)
        seen: dict[str, int] = {}
        self.rank_in_source = []
        for name in self.source_of:
            self.rank_in_source.append(seen.get(name, 0))
            seen[name] = seen.get(name, 0) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def empty(self) -> list:
        """The real dataset's samples left out for an empty label (none without one)."""
        return list(getattr(self.real, "empty", []))

    @property
    def excluded(self) -> list:
        return list(getattr(self.real, "excluded", []))

    def __len__(self) -> int:
        return len(self.source_of)

    def describe(self, index: int) -> str:
        name = self.source_of[index]
        return f"{name}/{self.rank_in_source[index]}"

    def generator(self, index: int) -> torch.Generator:
        from fastsam3d_cli.data.synthetic import generator_for

        return generator_for(self.seed, self.epoch, index, _STREAMS[self.source_of[index]])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        name = self.source_of[index]
        source = self.sources[name]
        gen = self.generator(index)
        with one_thread():
            if name == "real":
                item = source.sample_real(self.rank_in_source[index], self.epoch, gen)
            else:
                item = source.sample(gen)
        return {"image": item["image"], "label": item["label"], "valid": item["valid"], "sample_index": index}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside (then restore): a float sum split over threads rounds differently, so a
    generated sample is bit-for-bit the same only at a fixed thread count — whatever `--workers` is (a
    DataLoader worker already runs one thread: no switch, no cost)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def describe_mix(dataset: MixedDataset) -> str:
    """'shapes 300, synth-labels 300, …' for the run's log line."""
    return ", ".join(f"{name} {count}" for name, count in sorted(dataset.counts.items()) if count)


def mix_names(ratios: Mapping[str, float]) -> Sequence[str]:
    return [name for name in SOURCE_NAMES if ratios.get(name, 0) > 0]


# ------------------------------------------------------------------------------------------ building
def build_source(name: str, *, label_maps: Sequence = (), real_dataset: Any = None,
                 min_foreground_voxels: int = 1000, crop_size: int = 128) -> Any:
    """The source called `name` (one of SOURCE_NAMES); label-map datasets are read once per process."""
    from fastsam3d_cli.data.label_maps import cached_label_maps
    from fastsam3d_cli.data.synthetic import LabelMapSource, ShapesSource

    if name == "shapes":
        return ShapesSource(crop_size, min_foreground_voxels=min_foreground_voxels)
    if name == "synth-labels":
        return LabelMapSource(cached_label_maps(label_maps), min_foreground_voxels=min_foreground_voxels,
                              crop_size=crop_size)
    if name == "supervoxels":
        from fastsam3d_cli.data.pseudo_tasks import SupervoxelSource

        return SupervoxelSource(cached_label_maps(label_maps, with_images=True),
                                min_foreground_voxels=min_foreground_voxels, crop_size=crop_size)
    if name == "real":
        from fastsam3d_cli.data.pseudo_tasks import RealAugmentedSource

        return RealAugmentedSource(real_dataset)
    raise ValueError(f"unknown source {name!r}")


DEFAULT_SAMPLES_PER_EPOCH = 500
LABEL_MAP_SOURCES = ("synth-labels", "supervoxels")


@dataclass
class MixSettings:
    """The checked `--data-mix`, `--label-maps` and `--samples-per-epoch` of a run (None ratios: real pairs only)."""

    ratios: dict[str, float] | None
    label_maps: list[Path]
    samples_per_epoch: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"data_mix": self.ratios, "label_maps": [str(p) for p in self.label_maps],
                "samples_per_epoch": self.samples_per_epoch}


def check_mix_options(data_mix: str | Mapping[str, float] | None, label_maps: Sequence[str | Path] | None,
                      samples_per_epoch: int | None) -> MixSettings:
    """Validate the data-mix options before anything is read: UsageError (exit 2) for a bad ratio or value, a
    generated-only option without --data-mix, a label-map source without --label-maps; BadInputError (exit 3)
    for a --label-maps folder that is missing or lies in a `validation/` folder."""
    from fastsam3d_cli.data.label_maps import check_label_map_folders

    label_maps = list(label_maps or [])
    if data_mix is None:
        if samples_per_epoch is not None:
            raise UsageError("--samples-per-epoch only applies with --data-mix",
                             "add --data-mix (e.g. real=0.5,shapes=0.5) or drop --samples-per-epoch")
        if label_maps:
            raise UsageError("--label-maps only applies with --data-mix",
                             "add --data-mix with synth-labels or supervoxels, or drop --label-maps")
        return MixSettings(None, [], None)
    ratios = parse_data_mix(data_mix) if isinstance(data_mix, str) else _checked_mapping(data_mix)
    if samples_per_epoch is not None and samples_per_epoch < 1:
        raise UsageError(f"--samples-per-epoch must be at least 1 (got {samples_per_epoch})", "give a value >= 1")
    needs_maps = [name for name in LABEL_MAP_SOURCES if name in ratios]
    if needs_maps and not label_maps:
        raise UsageError(f"--data-mix {needs_maps[0]} needs --label-maps DIR",
                         "give nnU-Net training dataset folders with --label-maps (repeat the option for several)")
    if label_maps and not needs_maps:
        raise UsageError("--label-maps is given but --data-mix uses neither synth-labels nor supervoxels",
                         "add synth-labels=… or supervoxels=… to --data-mix, or drop --label-maps")
    return MixSettings(ratios, check_label_map_folders(label_maps), samples_per_epoch or DEFAULT_SAMPLES_PER_EPOCH)


def _checked_mapping(ratios: Mapping[str, float]) -> dict[str, float]:
    return parse_data_mix(",".join(f"{name}={value}" for name, value in ratios.items()))


def build_training_dataset(real: Any, settings: MixSettings, seed: int,
                           min_foreground_voxels: int = 1000, crop_size: int = 128) -> Any:
    """The dataset `train` iterates: `real` itself without a mix, else a MixedDataset over the mix's sources
    (label maps read once here, before any DataLoader worker starts, so workers share them)."""
    if settings.ratios is None:
        return real
    sources = {}
    for name in settings.ratios:
        sources[name] = build_source(name, label_maps=settings.label_maps, real_dataset=real,
                                     min_foreground_voxels=min_foreground_voxels, crop_size=crop_size)
    return MixedDataset(sources, settings.ratios, int(settings.samples_per_epoch or DEFAULT_SAMPLES_PER_EPOCH), seed,
                        real=real)
