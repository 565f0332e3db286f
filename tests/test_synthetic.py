"""Generated training samples (data/synthetic.py, shapes.py, pseudo_tasks.py, mixing.py): the real dataset's
contract, targets that are big enough and inside the crop, reproducibility from (seed, epoch, index), and the
data-mix options' checks. Small crops (64³) and a tiny label map built in code keep this fast."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsam3d_cli.data.label_maps import cached_label_maps, check_label_map_folders, label_statistics
from fastsam3d_cli.data.mixing import (MixedDataset, build_source, build_training_dataset, check_mix_options,
                                       parse_data_mix, source_counts)
from fastsam3d_cli.data.synthetic import generator_for
from fastsam3d_cli.errors import BadInputError, UsageError
from train_phantoms import write_volume

CROP = 64  # the sources take any crop size; the model's is 128


def _ellipsoid(shape, centre, radii):
    grid = np.indices(shape, dtype=np.float32)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@pytest.fixture(scope="module")
def label_dataset(tmp_path_factory) -> Path:
    """A one-case nnU-Net v2 dataset: 48³ at 2 mm, four labels (1 and 2 touch, 3 inside 4's hole), an image."""
    root = tmp_path_factory.mktemp("maps") / "Dataset990_Synth"
    shape = (48, 48, 48)
    labels = np.zeros(shape, np.uint8)
    labels[_ellipsoid(shape, (24, 24, 24), (18, 14, 12))] = 4
    labels[_ellipsoid(shape, (24, 24, 24), (6, 6, 6))] = 3
    labels[8:20, 6:16, 10:30] = 1
    labels[20:30, 6:16, 10:30] = 2
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 10, shape) + np.array([0, 300, 500, 80, 40])[labels]).astype(np.float32)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    write_volume(root / "imagesTr" / "case_0000.nii.gz", image, spacing=2.0)
    write_volume(root / "labelsTr" / "case.nii.gz", labels, spacing=2.0)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "left": 1, "right": 2, "core": 3, "shell": 4},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def _check_sample(sample: dict, size: int = CROP) -> None:
    assert set(sample) >= {"image", "label", "valid"}
    assert sample["image"].shape == (1, size, size, size) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (1, size, size, size) and sample["label"].dtype == torch.float32
    assert sample["valid"].shape == (1, size, size, size) and sample["valid"].dtype == torch.bool
    assert torch.isfinite(sample["image"]).all()
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
    label = sample["label"][0] > 0.5
    assert int(label.sum()) >= 1000
    # the target lies inside the crop: at most a sliver of it on the crop's outer faces
    inner = label[2:-2, 2:-2, 2:-2].sum()
    assert int(label.sum() - inner) <= 0.1 * int(label.sum())


@pytest.mark.parametrize("name", ["shapes", "synth-labels", "supervoxels"])
def test_generated_sources_keep_the_real_datasets_contract(name, label_dataset):
    source = build_source(name, label_maps=[label_dataset], crop_size=CROP)
    for index in range(3):
        sample = source.sample(generator_for(7, 0, index, 1))
        _check_sample(sample)
        image = sample["image"][0]
        # z-normalised over the raw image's positive voxels (as the real crops): the bulk lies within a few units
        # (air in a CT-like crop may sit far below, like real CT's −1000 HU)
        assert float(image.abs().median()) < 3 and float(image.max()) < 50


def _ring(label: torch.Tensor, width: int = 3) -> torch.Tensor:
    grown = torch.nn.functional.max_pool3d(label[None, None].float(), 2 * width + 1, 1, width)[0, 0] > 0
    return grown & ~label


def test_targets_are_painted_apart_from_each_major_neighbour():
    """A target between a darker and a brighter neighbour must still differ from each (not only from their mean)."""
    from fastsam3d_cli.data.synthetic import separate_target

    labels = torch.zeros((24, 24, 24), dtype=torch.int64)
    labels[:, :12] = 1
    labels[:, 12:] = 2
    labels[8:16, 8:16, 8:16] = 3  # the target, half in label 1, half in label 2
    separated = 0
    for index in range(40):
        gen = generator_for(0, 0, index, 9)
        means, sds = torch.tensor([0.0, 50.0, 150.0, 100.0]), torch.full((4,), 10.0)
        needed = separate_target(means, sds, labels, labels == 3, [3], gen, ct_like=False)
        if needed is None:
            continue  # left as drawn (10%)
        separated += 1
        assert abs(float(means[3]) - 50.0) >= needed and abs(float(means[3]) - 150.0) >= needed
        assert float(sds[3]) <= 0.6 * needed
    assert separated >= 30


@pytest.mark.parametrize("name", ["shapes", "synth-labels"])
def test_painted_targets_are_visible(name, label_dataset):
    """In the finished image most targets stand out from the voxels around them."""
    source = build_source(name, label_maps=[label_dataset], crop_size=CROP)
    visible = 0
    for index in range(8):
        sample = source.sample(generator_for(11, 0, index, 1))
        image, label = sample["image"][0], sample["label"][0] > 0.5
        ring = _ring(label)
        visible += abs(float(image[label].mean()) - float(image[ring].mean())) > 0.3
    assert visible >= 5  # the ring mixes neighbours on both sides of the target's level: a lower bound


@pytest.mark.parametrize("name", ["shapes", "synth-labels", "supervoxels"])
def test_a_sample_is_a_pure_function_of_its_seed(name, label_dataset):
    source = build_source(name, label_maps=[label_dataset], crop_size=CROP)
    first = source.sample(generator_for(3, 2, 5, 1))
    source.sample(generator_for(3, 2, 6, 1))  # whatever ran before does not matter
    again = build_source(name, label_maps=[label_dataset], crop_size=CROP).sample(generator_for(3, 2, 5, 1))
    other = source.sample(generator_for(3, 3, 5, 1))  # another epoch
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])


def test_synth_labels_targets_are_labels_or_touching_unions(label_dataset):
    volume = cached_label_maps([label_dataset])[0]
    source = build_source("synth-labels", label_maps=[label_dataset], crop_size=CROP)
    for index in range(20):
        values = source._target(volume, source.candidates[0], generator_for(0, 0, index, 2))
        assert values and all(v in volume.counts for v in values)
        for value in values[1:]:  # a union is of labels that touch the first
            assert value in volume.touching[values[0]] or values[0] in volume.touching[value] or value == values[0]


def test_label_statistics_counts_boxes_and_touching():
    labels = np.zeros((10, 12, 14), np.int16)
    labels[2:5, 3:9, 4:6] = 3
    labels[5:7, 3:4, 4:5] = 7  # touches 3 across the face at i = 4|5
    labels[8:9, 10:11, 10:12] = 9  # alone
    counts, boxes, touching = label_statistics(labels)
    assert counts == {3: 36, 7: 2, 9: 2}
    assert boxes[3][0].tolist() == [2, 3, 4] and boxes[3][1].tolist() == [5, 9, 6]
    assert boxes[9][0].tolist() == [8, 10, 10] and boxes[9][1].tolist() == [9, 11, 12]
    assert touching == {3: {7}, 7: {3}, 9: set()}


def test_label_maps_are_resampled_to_1_5_mm_nearest_neighbour(label_dataset):
    volume = cached_label_maps([label_dataset], with_images=True)[0]
    assert volume.labels.shape == (64, 64, 64)  # 48 × 2 mm / 1.5 mm
    assert set(np.unique(volume.labels).tolist()) == {0, 1, 2, 3, 4}  # no interpolated values
    assert volume.image is not None and volume.image.shape == volume.labels.shape
    assert volume.names[3] == "core"


# ------------------------------------------------------------------------------------------- mixing
def test_parse_data_mix_normalises_the_ratios():
    assert parse_data_mix("real=1,shapes=3") == {"real": 0.25, "shapes": 0.75}
    assert parse_data_mix(" shapes = 2 , supervoxels=0 ") == {"shapes": 1.0}  # a 0 ratio drops the source


@pytest.mark.parametrize("text, fragment", [
    ("", "--data-mix is empty"),
    ("shapes", "'shapes' is not SOURCE=RATIO"),
    ("blobs=1", "source 'blobs' is unknown"),
    ("shapes=x", "ratio 'x' of shapes is not a number"),
    ("shapes=-1", "must be a finite number >= 0"),
    ("shapes=nan", "must be a finite number >= 0"),
    ("shapes=inf", "must be a finite number >= 0"),
    ("shapes=1,shapes=2", "names 'shapes' twice"),
    ("shapes=0,real=0", "ratios are all 0"),
])
def test_bad_data_mix_is_a_usage_error(text, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        parse_data_mix(text)


def test_source_counts_follow_the_ratios_exactly():
    counts = source_counts({"real": 0.3, "shapes": 0.3, "synth-labels": 0.3, "supervoxels": 0.1}, 11)
    assert sum(counts.values()) == 11 and counts["supervoxels"] == 1
    assert source_counts({"shapes": 1.0}, 5) == {"shapes": 5}


@pytest.mark.parametrize("kwargs, fragment", [
    ({"data_mix": None, "label_maps": None, "samples_per_epoch": 10}, "--samples-per-epoch only applies"),
    ({"data_mix": None, "label_maps": ["x"], "samples_per_epoch": None}, "--label-maps only applies"),
    ({"data_mix": "shapes=1", "label_maps": None, "samples_per_epoch": 0}, "--samples-per-epoch must be at least 1"),
    ({"data_mix": "synth-labels=1", "label_maps": None, "samples_per_epoch": None}, "needs --label-maps"),
    ({"data_mix": "shapes=1", "label_maps": ["x"], "samples_per_epoch": None}, "uses neither"),
])
def test_mix_option_combinations_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        check_mix_options(**kwargs)


def test_label_maps_from_a_validation_folder_are_refused(tmp_path):
    held_out = tmp_path / "validation" / "Dataset1"
    held_out.mkdir(parents=True)
    with pytest.raises(BadInputError, match="which no training may use"):
        check_label_map_folders([held_out])
    with pytest.raises(BadInputError, match="is not a folder"):
        check_label_map_folders([tmp_path / "missing"])


class _FakeReal:
    """Stands in for InteractiveCropDataset: item (seed, epoch, index) → a ball whose place depends on all three."""

    min_foreground_voxels = 1000

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([9, self.epoch, index])
        centre = rng.integers(24, 40, size=3)
        label = torch.from_numpy(_ellipsoid((CROP,) * 3, centre, (10, 10, 10)).astype(np.float32))
        image = label * 2 + torch.from_numpy(rng.normal(0, 0.3, (CROP,) * 3).astype(np.float32))
        return {"image": image[None], "label": label[None], "valid": torch.ones((1,) + (CROP,) * 3, dtype=torch.bool)}


def test_the_mix_is_reproducible_and_resumes_at_any_index(label_dataset):
    settings = check_mix_options("real=0.4,shapes=0.3,synth-labels=0.3", [label_dataset], 10)
    real = _FakeReal()
    mix = build_training_dataset(real, settings, seed=5, crop_size=CROP)
    assert isinstance(mix, MixedDataset) and len(mix) == 10
    assert sorted(mix.source_of) == ["real"] * 4 + ["shapes"] * 3 + ["synth-labels"] * 3
    mix.set_epoch(2)
    items = {i: mix[i] for i in (7, 1, 4)}
    fresh = build_training_dataset(_FakeReal(), settings, seed=5, crop_size=CROP)  # a resumed run
    fresh.set_epoch(2)
    for index in (4, 7, 1):  # any order
        item = fresh[index]
        assert item["sample_index"] == index
        assert torch.equal(item["image"], items[index]["image"]) and torch.equal(item["label"], items[index]["label"])
        _check_sample(item)
    fresh.set_epoch(3)
    assert not torch.equal(fresh[7]["image"], items[7]["image"])
    assert [mix.describe(i) for i in range(10)] == [fresh.describe(i) for i in range(10)]  # names stay the run's


def test_without_a_mix_the_real_dataset_is_used_unchanged():
    real = _FakeReal()
    assert build_training_dataset(real, check_mix_options(None, None, None), seed=1) is real


def test_real_source_never_loses_the_target():
    source = build_source("real", real_dataset=_FakeReal())
    for index in range(6):
        item = source.sample_real(index, 0, generator_for(0, 0, index, 1))
        _check_sample(item)
        assert item["valid"].all()


# ---------------------------------------------------------------------------------------- the CLI
def _train(*args: str):
    from typer.testing import CliRunner

    from fastsam3d_cli.cli import app
    from train_phantoms import CLI_ENV

    return CliRunner().invoke(app, ["train", *args], env=CLI_ENV)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from train_phantoms import make_prepared

    return make_prepared(tmp_path_factory.mktemp("data") / "prepared", cases=("p0",))


@pytest.mark.parametrize("args, code, fragment", [
    (["--data-mix", "real=0.5,blobs=0.5"], 2, "--data-mix source 'blobs' is unknown"),
    (["--data-mix", "shapes=-1"], 2, "ratio of shapes must be a finite number >= 0"),
    (["--data-mix", "shapes=1", "--samples-per-epoch", "0"], 2, "--samples-per-epoch must be at least 1"),
    (["--samples-per-epoch", "5"], 2, "--samples-per-epoch only applies with --data-mix"),
    (["--data-mix", "synth-labels=1"], 2, "--data-mix synth-labels needs --label-maps DIR"),
    (["--data-mix", "supervoxels=1", "--label-maps", "/nonexistent/Dataset1"], 3, "is not a folder"),
])
def test_bad_data_mix_options_end_with_one_line_and_write_nothing(prepared, tmp_path, args, code, fragment):
    run = tmp_path / "run"
    result = _train(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run), "--device", "cpu", *args)
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert not run.exists()


def test_label_maps_inside_validation_are_exit_3(prepared, tmp_path, label_dataset):
    held_out = tmp_path / "validation" / label_dataset.name
    held_out.mkdir(parents=True)
    result = _train(str(prepared), "-m", "fastsam3d-tiny", "-o", str(tmp_path / "run"), "--device", "cpu",
                    "--data-mix", "synth-labels=1", "--label-maps", str(held_out))
    assert result.exit_code == 3 and "which no training may use" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_mixed_run_trains_on_generated_and_real_samples(prepared, tmp_path, label_dataset):
    run = tmp_path / "run"
    result = _train(str(prepared), "-m", "fastsam3d-tiny", "-o", str(run), "--device", "cpu", "--epochs", "1",
                    "--iterations", "1", "--max-steps", "2", "--json", "--data-mix", "real=1,shapes=1,synth-labels=1",
                    "--label-maps", str(label_dataset), "--samples-per-epoch", "3")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["samples"] == 3 and payload["global_step"] == 2


def test_labels_too_large_for_the_crop_are_no_targets(label_dataset):
    from fastsam3d_cli.data.synthetic import LabelMapSource

    volume = cached_label_maps([label_dataset])[0]  # 64³ at 1.5 mm: the shell spans 48 voxels
    assert 4 in LabelMapSource([volume], crop_size=64).candidates[0]
    assert 4 not in LabelMapSource([volume], crop_size=32).candidates[0]  # 48 > 0.85 × 32 / 0.6
    with pytest.raises(BadInputError, match="fits a 16³ crop"):  # the core is too small, the rest too large
        LabelMapSource([volume], min_foreground_voxels=5000, crop_size=16)


def test_a_mixed_run_resumes_bit_for_bit_with_any_workers(prepared, tmp_path, label_dataset):
    """3 steps straight vs 1 step + resume (in a DataLoader worker) + 2 steps, over an epoch boundary."""
    from fastsam3d_cli.training.train import train

    common = dict(epochs=2, iterations=1, device="cpu", seed=4, data_mix="real=1,shapes=1,synth-labels=1",
                  label_maps=[label_dataset], samples_per_epoch=2)
    train([prepared], "fastsam3d-tiny", output=tmp_path / "straight", max_steps=3, **common)
    train([prepared], "fastsam3d-tiny", output=tmp_path / "split", max_steps=1, **common)
    second = train([prepared], "fastsam3d-tiny", output=tmp_path / "split", max_steps=3, resume=True, workers=1,
                   **common)
    assert second.outcome.resumed_from_step == 1 and second.outcome.global_step == 3
    assert not second.warnings  # same data: nothing reported as changed
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
              for run in ("straight", "split")]
    assert losses[0] == losses[1]


def test_mixed_items_do_not_depend_on_the_thread_count(label_dataset):
    settings = check_mix_options("shapes=1,synth-labels=1", [label_dataset], 2)
    mix = build_training_dataset(_FakeReal(), settings, seed=2, crop_size=CROP)
    threads = torch.get_num_threads()
    try:
        items = []
        for count in (1, 3):
            torch.set_num_threads(count)
            items.append([mix[i] for i in range(2)])
            assert torch.get_num_threads() == count  # restored after each item
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*items):
        assert torch.equal(one["image"], three["image"]) and torch.equal(one["label"], three["label"])


def test_the_fast_opening_is_scipys():
    from scipy import ndimage

    from fastsam3d_cli.data.pseudo_tasks import _dilate, _erode

    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = ndimage.gaussian_filter(rng.random((20, 24, 18)), 1.5) > 0.5
        assert np.array_equal(_erode(mask), ndimage.binary_erosion(mask))
        assert np.array_equal(_dilate(mask), ndimage.binary_dilation(mask))
        assert np.array_equal(_dilate(_erode(mask)), ndimage.binary_opening(mask))
