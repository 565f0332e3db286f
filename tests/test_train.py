"""`train` API on phantoms: data crops, the interaction loop, checkpoints, exact resume, freezing."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from fastsam3d_cli.imaging.crops import CROP_SIZE, CropBox
from fastsam3d_cli.training.distributed import DistributedEnv
from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.training.losses import dice_ce_loss
from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import load_model, read_checkpoint_info
from fastsam3d_cli.data.prepared import list_prepared_samples
from fastsam3d_cli.training.train import InteractiveSegmentationTask, interactive_loss, mask_only_steps, train
from fastsam3d_cli.training.trainer import EpochSampler
from fastsam3d_cli.data.training_data import InteractiveCropDataset, crop_sample, load_sample, validation_crop
from distill_builders import register_preset
from train_phantoms import SHAPE, add_empty_label, make_prepared, phantom_case, write_volume


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="module")
def samples(prepared):
    return list_prepared_samples(prepared)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One case, two classes: an epoch is 2 steps at batch size 1 (keeps the real-model runs short)."""
    return make_prepared(tmp_path_factory.mktemp("small") / "prepared", cases=("p0",))


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


# ------------------------------------------------------------------------------------------- data
def test_samples_are_read_in_canonical_ras_orientation(samples):
    # The phantoms are stored LPS (identity ITK direction): RAS+ reverses axes 0 and 1, keeps axis 2.
    _, labels = phantom_case(0)
    ball = next(s for s in samples if s.class_name == "ball" and s.case == "p0")
    arrays = load_sample(ball)
    expected = _centroid(labels["ball"]) * [-1, -1, 1] + [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    np.testing.assert_allclose(_centroid(arrays.label), expected, atol=1e-9)


def test_validation_crop_is_centred_on_the_label_and_normalised_after_cropping(samples):
    arrays = load_sample(samples[0])
    crop = validation_crop(arrays)
    assert crop.image.shape == crop.label.shape == (CROP_SIZE,) * 3
    assert crop.label.sum() == arrays.label.sum()  # the whole object is inside
    lo, hi = np.argwhere(crop.label).min(0), np.argwhere(crop.label).max(0)
    np.testing.assert_allclose((lo + hi) / 2.0, 63.5, atol=0.5)
    # The 40³ volume sits inside a zero-padded 128³ crop: mean/std are taken over voxels > 0 (the volume).
    inside = tuple(slice(-s, -s + n) for s, n in zip(crop.box.start, SHAPE))
    assert abs(float(crop.image[inside].mean())) < 1e-4 and abs(float(crop.image[inside].std(ddof=1)) - 1) < 1e-4
    assert np.all(crop.image[:5, :5, :5] == crop.image[0, 0, 0])  # the padding: one value


def test_training_crops_shift_flip_and_are_a_function_of_seed_epoch_index(samples):
    dataset = InteractiveCropDataset(samples, seed=5, max_shift=8)
    first, again = dataset[1], dataset[1]
    assert all(torch.equal(first[k], again[k]) for k in ("image", "label", "valid"))
    assert first["image"].shape == (1, CROP_SIZE, CROP_SIZE, CROP_SIZE) and first["image"].dtype == torch.float32
    centres = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[1]
        label = item["label"][0].numpy() > 0
        assert item["sample_index"] == 1
        lo, hi = np.argwhere(label).min(0), np.argwhere(label).max(0)
        centres.append((lo + hi) / 2.0)
    assert np.all(np.abs(np.asarray(centres) - 63.5) <= 8.5)  # shift of at most 8 voxels per axis
    assert len({tuple(c) for c in centres}) > 1  # epochs differ
    # Without shift every crop is the centred crop flipped along some axes; several patterns occur.
    base = validation_crop(load_sample(samples[1])).label
    unshifted = InteractiveCropDataset(samples, seed=5, max_shift=0)
    patterns = set()
    for epoch in range(8):
        unshifted.set_epoch(epoch)
        label = unshifted[1]["label"][0].numpy() > 0
        matches = [axes for axes in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
                   if np.array_equal(np.flip(base, axes) if axes else base, label)]
        assert len(matches) == 1
        patterns.add(matches[0])
    assert len(patterns) > 2


def test_crop_flip_flips_image_label_and_valid_together(samples):
    arrays = load_sample(samples[0])
    arrays.valid = np.ones_like(arrays.label)
    arrays.valid[:5] = False
    box = CropBox((-40, -40, -40))
    plain, flipped = crop_sample(arrays, box), crop_sample(arrays, box, (True, False, True))
    np.testing.assert_array_equal(flipped.label, plain.label[::-1, :, ::-1])
    np.testing.assert_array_equal(flipped.valid, plain.valid[::-1, :, ::-1])
    np.testing.assert_allclose(flipped.image, plain.image[::-1, :, ::-1])


def test_crops_with_too_few_foreground_voxels_are_redrawn(tmp_path):
    root = make_prepared(tmp_path / "prepared", cases=("p0",))
    speck = np.zeros(SHAPE, dtype=np.uint8)
    speck[20:23, 20:23, 20:23] = 1  # 27 voxels
    image, _ = phantom_case(0)
    write_volume(root / "speck" / "CT_Dataset990_Phantom" / "imagesTr" / "p0.nii.gz", image)
    write_volume(root / "speck" / "CT_Dataset990_Phantom" / "labelsTr" / "p0.nii.gz", speck)
    samples = list_prepared_samples(root)
    speck_index = next(i for i, s in enumerate(samples) if s.class_name == "speck")
    dataset = InteractiveCropDataset(samples, min_foreground_voxels=1000)
    item = dataset[speck_index]
    assert item["sample_index"] != speck_index and item["label"].sum() >= 1000
    # With voxel counts known (from a manifest) such samples are left out up front …
    known = [type(s)(**{**s.__dict__, "voxels": int(s.class_name != "speck") * 5000 + 27}) for s in samples]
    assert len(InteractiveCropDataset(known)) == len(samples) - 1
    # … and a dataset where none qualifies is a clear error.
    with pytest.raises(BadInputError, match="no prepared sample has at least 1000 label voxels"):
        InteractiveCropDataset([s for s in known if s.class_name == "speck"])


def test_empty_labels_are_left_out_when_the_dataset_is_built(tmp_path):
    root = make_prepared(tmp_path / "prepared", cases=("p0",))
    void_label = add_empty_label(root)  # no manifest: the voxel count is unknown until the label is read
    samples = list_prepared_samples(root)
    assert len(samples) == 3 and all(s.voxels is None for s in samples)
    dataset = InteractiveCropDataset(samples, max_shift=0)
    assert [(s.case, s.class_name) for s in dataset.empty] == [("p0", "void")] and dataset.excluded == dataset.empty
    assert len(dataset) == 2 and all(s.class_name != "void" for s in dataset.samples)
    for epoch in range(3):  # no draw ever lands on the empty label, and none is empty
        dataset.set_epoch(epoch)
        assert all(dataset[i]["label"].sum() >= 1000 for i in range(len(dataset)))
    # A manifest's count of 0 is trusted without reading the file.
    known = [dataclasses.replace(s, voxels=0 if s.class_name == "void" else 5000) for s in samples]
    assert [s.class_name for s in InteractiveCropDataset(known).empty] == ["void"]
    # Nothing usable left: one clear error, naming the sample, when the dataset is built (before any run folder).
    void = [s for s in samples if s.class_name == "void"]
    with pytest.raises(BadInputError, match=r"every prepared label is empty \(1 sample\(s\): "
                                            r"CT_Dataset990_Phantom/p0/void\)"):
        InteractiveCropDataset(void)
    # A label emptied after the dataset was built is still no crash mid-training: an empty target comes back.
    ball = InteractiveCropDataset([s for s in samples if s.class_name == "ball"])
    write_volume(ball.samples[0].label_path, np.zeros(SHAPE, dtype=np.uint8))
    item = ball[0]
    assert item["label"].sum() == 0 and item["sample_index"] == 0
    assert void_label.is_file()


def test_train_skips_an_empty_label_with_a_warning(tmp_path, monkeypatch):
    model = register_preset(monkeypatch)
    root = make_prepared(tmp_path / "prepared", cases=("p0",))
    add_empty_label(root)
    lines: list[str] = []
    result = train([root], model, epochs=1, iterations=1, output=tmp_path / "run", device="cpu", seed=1, log=lines.append)
    assert result.outcome.stop_reason == "completed" and result.outcome.global_step == 2  # 2 usable samples
    assert result.samples == 2 and result.excluded_samples == 1 and result.empty_samples == 1
    warning = next(w for w in result.warnings if "empty" in w)
    assert warning.startswith("CT_Dataset990_Phantom/p0/void: the label is empty") and "skipped" in warning
    assert f"warning: {warning}" in lines
    payload = result.to_json()
    assert warning in payload["warnings"] and payload["empty_samples"] == 1


def test_epoch_sampler_splits_each_epoch_between_ranks():
    shares = [EpochSampler(10, DistributedEnv(rank, 3, rank), seed=1) for rank in range(3)]
    for sampler in shares:
        sampler.set_epoch(4)
    indices = [sampler.rank_indices() for sampler in shares]
    assert [len(i) for i in indices] == [4, 4, 4]  # 10 padded to 12
    assert set().union(*map(set, indices)) == set(range(10))
    assert sum(map(len, indices)) - len(set().union(*map(set, indices))) == 2  # only the 2 padding repeats
    even = [EpochSampler(12, DistributedEnv(rank, 3, rank), seed=1).rank_indices() for rank in range(3)]
    assert sorted(sum(even, [])) == list(range(12))  # without padding: a partition
    shares[0].set_epoch(5)
    assert shares[0].rank_indices() != indices[0]  # reshuffled each epoch
    shares[0].set_epoch(4, skip=3)
    assert list(shares[0]) == indices[0][3:]


# ------------------------------------------------------------------------------- interaction loop
class _RecordingModel(nn.Module):
    """A stand-in Sam3D: records each decode call; low-res logits come from a learnable scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.config = build_model.__globals__["get_config"]("fastsam3d-tiny")
        self.bias = nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def decode(self, embedding, points, labels, mask_logits):
        self.calls.append({"points": None if points is None else points.clone(),
                           "labels": None if labels is None else labels.clone(), "mask": mask_logits})
        return mask_logits.detach() * 0 + self.bias - 1.0 + 0.0 * mask_logits, None

    def upsample_logits(self, low_res):
        return torch.nn.functional.interpolate(low_res, size=(CROP_SIZE,) * 3, mode="nearest")


def test_interaction_loop_follows_the_reference():
    assert mask_only_steps(11, np.random.default_rng(0)) - {10} <= set(range(2, 9))
    assert len(mask_only_steps(11, np.random.default_rng(0))) == 2 and 10 in mask_only_steps(11, np.random.default_rng(0))
    assert mask_only_steps(3, np.random.default_rng(0)) == {2} and mask_only_steps(1, np.random.default_rng(0)) == set()
    model = _RecordingModel()
    target = torch.zeros(2, 1, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    target[:, :, 60:70, 60:70, 60:70] = 1
    result = interactive_loss(model, torch.zeros(2, 384, 8, 8, 8), target, None, 11, np.random.default_rng(1))
    calls = model.calls
    assert len(calls) == 11
    assert torch.count_nonzero(calls[0]["mask"]) == 0 and calls[0]["mask"].shape == (2, 1, 32, 32, 32)  # zeros, not None
    with_points = [i for i, c in enumerate(calls) if c["points"] is not None]
    assert len(with_points) == 9 and 10 not in with_points and 0 in with_points and 1 in with_points
    for call in calls:
        if call["points"] is not None:
            assert call["points"].shape == (2, 1, 3)  # one new click per sample per step
    # Prediction is empty (bias − 1 < 0): every click is an include click inside the target.
    first = calls[0]
    assert first["labels"].tolist() == [[1], [1]]
    assert all(60 <= v < 70 for v in first["points"].flatten().tolist())
    # The loss is summed over the 11 steps (each step's logits are the constant bias − 1 here).
    expected = 11 * dice_ce_loss(torch.full_like(target, -0.5), target)
    assert float(result.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    result.loss.backward()
    assert model.bias.grad is not None and torch.isfinite(model.bias.grad)


# --------------------------------------------------------------------------------- full runs (tiny)
def _weights(path):
    state, _ = read_checkpoint_info(path)
    return state


def test_training_writes_checkpoints_logs_and_curve(small, tmp_path):
    run = tmp_path / "run"
    result = train([small], "fastsam3d-tiny", epochs=2, iterations=2, output=run, device="cpu", seed=3)
    outcome = result.outcome
    assert outcome.stop_reason == "completed" and outcome.epochs_completed == 2 and outcome.global_step == 4
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and len(steps) == 4
    assert all(np.isfinite(e["loss"]) and 0 <= e["dice"] <= 1 for e in epochs)
    assert epochs[1]["lr"] == pytest.approx([8e-5, 8e-6])  # encoder lr ×0.1 after the milestone; decoder at 0.1×
    assert (run / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The official layout, loadable by the safe loader; extras are plain data.
    payload = torch.load(run / "last.pth", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "epoch", "rng_state", "config"):
        assert key in payload
    assert payload["epoch"] == 2 and payload["preset"] == "fastsam3d-tiny"
    assert isinstance(payload["rng_state"]["torch"], torch.Tensor) and isinstance(payload["config"], dict)
    model, info = load_model(run / "last.pth", device="cpu")
    assert info.preset == "fastsam3d-tiny" and info.layout == "training"
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[key])
    best_epoch = max(epochs, key=lambda e: e["dice"])["epoch"]
    assert torch.load(run / "best.pth", weights_only=True)["epoch"] == best_epoch
    # The weights moved.
    torch.manual_seed(3)
    initial = build_model("fastsam3d-tiny").state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_resume_continues_exactly(small, tmp_path):
    # 3 steps straight vs 1 step + resume + 2 steps: the split falls inside epoch 1, and the resumed part
    # crosses the epoch boundary and the lr milestone (epochs=2 → ×0.1 after epoch 1).
    common = dict(epochs=2, iterations=3, device="cpu", seed=11, batch_size=1)
    straight = train([small], "fastsam3d-tiny", output=tmp_path / "straight", max_steps=3, **common)
    first = train([small], "fastsam3d-tiny", output=tmp_path / "split", max_steps=1, **common)
    assert first.outcome.stop_reason == "max_steps" and first.outcome.global_step == 1
    assert torch.load(tmp_path / "split" / "last.pth", weights_only=True)["step_in_epoch"] == 1
    second = train([small], "fastsam3d-tiny", output=tmp_path / "split", max_steps=3, resume=True, **common)
    assert second.outcome.resumed_from_step == 1 and second.outcome.global_step == 3
    a, b = _weights(tmp_path / "straight" / "last.pth"), _weights(tmp_path / "split" / "last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    opt_a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["optimizer_state_dict"]["state"]
    opt_b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)["optimizer_state_dict"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    steps_a = (tmp_path / "straight" / "steps.jsonl").read_text().splitlines()
    steps_b = (tmp_path / "split" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(s)["loss"] for s in steps_a] == [json.loads(s)["loss"] for s in steps_b]
    assert straight.outcome.samples_seen == first.outcome.samples_seen + second.outcome.samples_seen


def test_resume_keeps_the_runs_recipe_and_says_what_changed(small, prepared, tmp_path):
    """A resumed run restores its optimizer and schedule: a new --lr/--seed would be dropped silently, so it
    is reported as ignored and the checkpoint records what really ran; settings taken from the command
    (--epochs, --iterations) and a changed data set are reported too."""
    run = tmp_path / "run"
    train([small], "fastsam3d-tiny", output=run, epochs=2, iterations=2, device="cpu", seed=5, lr=1e-3, max_steps=1)
    resumed = train([prepared], "fastsam3d-tiny", output=run, epochs=3, iterations=1, device="cpu", seed=9, lr=0.1,
                    max_steps=2, resume=True)
    warnings = resumed.warnings
    for expected in ("--lr 0.1 is ignored on resume: the run keeps its 0.001 (restored from last.pth)",
                     "--seed 9 is ignored on resume: the run keeps its 5",
                     "resumed with --epochs 3 (the run was started with 2); the lr milestones stay the run's (1,2)",
                     "resumed with --iterations 1 (the run was started with 2)",
                     "the training data differ from the checkpoint's (2 → "):
        assert any(expected in w for w in warnings), (expected, warnings)
    payload = torch.load(run / "last.pth", weights_only=True)
    assert payload["args"]["lr"] == pytest.approx(1e-3) and payload["args"]["seed"] == 5
    assert payload["args"]["lr_milestones"] == [1, 2]  # the run's own schedule (60%/90% of 2 epochs), not of 3
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    # The run's lr kept (not --lr 0.1): the data changed, so the interrupted epoch 0 ended at resume and step 2
    # is in epoch 1, past the run's first milestone (×0.1).
    assert steps[-1]["step"] == 2 and int(steps[-1]["epoch"]) == 1
    assert steps[-1]["lr"] == pytest.approx([1e-4, 1e-5])
    # Options not given on resume are the run's own: nothing to report about them.
    again = train([prepared], "fastsam3d-tiny", output=run, epochs=3, iterations=1, device="cpu", max_steps=3,
                  resume=True)
    assert not any("ignored" in w or "data differ" in w for w in again.warnings), again.warnings


def test_init_and_freeze_encoder_train_only_the_decoder(small, tmp_path):
    start = tmp_path / "start"
    train([small], "fastsam3d-tiny", epochs=1, max_steps=0, output=start, device="cpu", seed=21)
    source = _weights(start / "last.pth")  # max_steps 0: the initial weights, saved
    torch.manual_seed(21)
    assert all(torch.equal(v, source[k]) for k, v in build_model("fastsam3d-tiny").state_dict().items())
    tuned = train([small], "fastsam3d-tiny", init=start / "last.pth", freeze_encoder=True, epochs=1, max_steps=1,
                  iterations=2, output=tmp_path / "tuned", device="cpu", seed=99)
    weights = _weights(tmp_path / "tuned" / "last.pth")
    encoder = [k for k in weights if k.startswith("image_encoder.")]
    rest = [k for k in weights if not k.startswith("image_encoder.")]
    assert all(torch.equal(weights[k], source[k]) for k in encoder)
    assert any(not torch.equal(weights[k], source[k]) for k in rest)
    assert tuned.outcome.epoch_records == [] and tuned.outcome.global_step == 1


def test_unfreeze_patience_run_unfreezes_and_resumes_exactly(small, tmp_path, monkeypatch):
    # A small registered model (0.1-0.5 s a step). lr 1e-5 barely moves the weights, so the epoch loss follows
    # the augmentation: with seed 4 it is 1.6530, 1.6531 (no improvement → stage 1 unfrozen after epoch 2), 1.6522.
    model = register_preset(monkeypatch)
    common = dict(epochs=3, iterations=1, lr=1e-5, unfreeze_patience=1, device="cpu", seed=4)
    lines: list[str] = []
    straight = train([small], model, output=tmp_path / "straight", log=lines.append, **common)
    unfrozen = [line for line in lines if "unfroze encoder stage" in line]
    assert unfrozen == ["loss has not improved for 1 epoch(s): unfroze encoder stage 1/3"]
    epochs = straight.outcome.epoch_records
    assert epochs[1]["loss"] >= epochs[0]["loss"] and epochs[2]["loss"] < epochs[0]["loss"]
    assert epochs[1]["trainable_params"] < epochs[2]["trainable_params"]  # the rebuilt optimizer holds more
    payload = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    assert payload["task_state"]["unfrozen_stages"] == 1
    assert [g["name"] for g in payload["optimizer_state_dict"]["param_groups"]] == [
        "image_encoder", "prompt_encoder+mask_decoder"]
    # Stage 1 (neck + last block) trained in epoch 3; the rest of the encoder never moved.
    torch.manual_seed(4)
    initial = build_model(model).state_dict()
    final = _weights(tmp_path / "straight" / "last.pth")
    stage1 = [k for k in final if k.startswith(("image_encoder.neck.", "image_encoder.blocks.1."))]
    still = [k for k in final if k.startswith("image_encoder.") and k not in stage1]
    assert stage1 and any(not torch.equal(final[k], initial[k]) for k in stage1)
    assert still and all(torch.equal(final[k], initial[k]) for k in still)
    # Stopped one step after the unfreeze, then resumed: the same weights, bit for bit.
    first = train([small], model, output=tmp_path / "split", max_steps=5, **common)
    assert first.outcome.global_step == 5
    assert torch.load(tmp_path / "split" / "last.pth", weights_only=True)["task_state"]["unfrozen_stages"] == 1
    second = train([small], model, output=tmp_path / "split", resume=True, **common)
    assert second.outcome.resumed_from_step == 5 and second.outcome.global_step == 6
    a, b = _weights(tmp_path / "straight" / "last.pth"), _weights(tmp_path / "split" / "last.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unfreeze_patience_unfreezes_one_stage_at_a_time_from_the_end():
    model = build_model("fastsam3d-tiny")
    task = InteractiveSegmentationTask(model, dataset=None, unfreeze_patience=2)
    encoder = model.image_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert [g["name"] for g in task.param_groups(1e-3)] == ["prompt_encoder+mask_decoder"]
    messages = []
    changed = [task.end_of_epoch({"loss": loss}, messages.append) for loss in (1.0, 0.9, 0.95, 0.92, 0.91, 0.93)]
    # improvement, improvement, stale, stale → unfreeze, stale, stale → unfreeze
    assert changed == [False, False, False, True, False, True]
    assert task.unfrozen_stages == 2 and len(messages) == 2
    trainable = {name.split(".")[1] + ("." + name.split(".")[2] if name.startswith("image_encoder.blocks") else "")
                 for name, p in model.named_parameters() if name.startswith("image_encoder.") and p.requires_grad}
    assert trainable == {"neck", "blocks.5", "blocks.4"}
    groups = task.param_groups(1e-3)
    assert groups[0]["name"] == "image_encoder" and groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    # The state round-trips (resume restores the same trainable set).
    other = InteractiveSegmentationTask(build_model("fastsam3d-tiny"), dataset=None, unfreeze_patience=2)
    other.load_state_dict(task.state_dict())
    assert [p.requires_grad for p in other.model.parameters()] == [p.requires_grad for p in model.parameters()]
