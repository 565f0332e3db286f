"""The refine head (model/refine_head.py, interactive/refine.py, training/refine_train.py).

What must hold: an untrained head returns the floor's region exactly (so a new run starts as the floor, and a
model with one still behaves as the prior model it is); its input is click-relative (the same features for
any positive affine change of intensities: CT and MR alike); the box holds the clicks with the margin and has
sides the head can halve twice; `train --refine-head` learns a correction the floor cannot make, touches only
`refine_head.*`, and its checkpoint loads, segments and bundles; a request that cannot mean what it says is a
usage error (exit 2) before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.interactive.classical import smoothed
from fastsam3d_cli.interactive.predictor import Predictor
from fastsam3d_cli.interactive.prior import CropPrior, PriorSettings, zero_residual
from fastsam3d_cli.interactive.refine import MARGIN_MM, box_around, features
from fastsam3d_cli.model import build_model, get_config
from fastsam3d_cli.model.checkpoint import load_model
from fastsam3d_cli.model.config import ModelConfig
from fastsam3d_cli.model.refine_head import RefineHead
from fastsam3d_cli.training import evaluation as ev
from fastsam3d_cli.training.refine_train import RefineHeadTask, cut_box
from fastsam3d_cli.training.trainer import StepContext
from test_prior import assert_predictor_returns_the_floor
from test_train_recipe import MICRO
from train_phantoms import CLI_ENV, make_prepared, tree

runner = CliRunner()
SPACING = 1.5


def _ellipsoid(shape=(90, 80, 70), seed=1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    mask = ((grid[0] - 45) / 20) ** 2 + ((grid[1] - 40) / 15) ** 2 + ((grid[2] - 35) / 12) ** 2 <= 1
    return rng.normal(100, 10, shape).astype(np.float32) + 80 * mask, mask


# ------------------------------------------------------------------------------------------ the head
def test_an_untrained_head_returns_the_region_and_keeps_any_box_shape():
    torch.manual_seed(0)
    head = RefineHead()
    for shape in ((16, 16, 16), (5, 7, 9)):
        x = torch.randn(2, 5, *shape)
        x[:, 2] = (torch.rand(2, *shape) > 0.5).float()
        out = head(x)
        assert out.shape == (2, 1, *shape)
        assert torch.equal(out[:, 0] > 0, x[:, 2] > 0.5)
    assert 90_000 < sum(p.numel() for p in head.parameters()) < 100_000  # the model card's "~95 k weights"


def test_the_refine_preset_adds_only_refine_head_keys():
    with torch.device("meta"):
        plain = set(build_model("fastsam3d-tiny").state_dict())
        refine = set(build_model("fastsam3d-tiny-refine").state_dict())
    assert plain < refine and all(k.startswith("refine_head.") for k in refine - plain)
    config = get_config("fastsam3d-tiny-refine")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert get_config("fastsam3d-tiny").refine_head_widths == ()


# ------------------------------------------------------------------------------------------ its input
def test_box_holds_the_clicks_with_the_margin_and_halves_twice():
    margin = int(np.ceil(MARGIN_MM / SPACING))
    box = box_around([(60, 64, 70), (70, 60, 75)], (128, 128, 128), SPACING)
    for s, low, high in zip(box, (60, 60, 70), (70, 64, 75)):
        assert s.start <= low - margin and s.stop >= high + margin + 1 and (s.stop - s.start) % 4 == 0
    edge = box_around([(0, 127, 5)], (128, 128, 128), SPACING)
    assert edge[0].start == 0 and edge[1].stop == 128 and all(0 <= s.start < s.stop <= 128 for s in edge)
    assert all((s.stop - s.start) % 4 == 0 for s in edge)
    cut = cut_box(box, (65, 62, 72), np.random.default_rng(0), size=32)
    assert all(s.stop - s.start <= 32 and s.start <= c < s.stop for s, c in zip(cut, (65, 62, 72)))


def test_features_are_click_relative_and_mark_region_and_clicks():
    values, mask = _ellipsoid()
    spacing = np.full(3, SPACING)
    includes, excludes = [(45, 40, 35)], [(45, 40, 60)]
    box = box_around(includes + excludes, values.shape, SPACING)
    made = []
    for scale, shift in ((1.0, 0.0), (0.01, -3.0)):  # CT numbers or an MR's arbitrary units: the same features
        v = values * scale + shift
        made.append(features(v, smoothed(v, spacing, 1.0), mask, includes, excludes, box, SPACING))
    np.testing.assert_allclose(made[0], made[1], atol=1e-4)
    x = made[0]
    assert np.array_equal(x[2] > 0.5, mask[box])
    local = tuple(c - s.start for c, s in zip(includes[0], box))
    assert x[3][local] == pytest.approx(1.0) and x[4][local] < 0.2
    assert abs(float(x[1][local])) < 0.3  # the include click sits in the middle of its own window


def _ellipsoid_image() -> sitk.Image:
    values, _ = _ellipsoid()
    image = sitk.GetImageFromArray(values.transpose(2, 1, 0))
    image.SetSpacing((SPACING,) * 3)
    return image


def _refine_model_at_init() -> torch.nn.Module:
    """The refine preset as `train --refine-head` starts it: seeded weights, decoder residual zeroed."""
    torch.manual_seed(0)
    model = build_model("fastsam3d-tiny-refine", attention="auto", device="cpu").eval()
    zero_residual(model)
    model.prior_settings = PriorSettings().to_dict()
    return model


def test_a_model_with_an_untrained_head_returns_the_floor():
    assert_predictor_returns_the_floor(_refine_model_at_init(), _ellipsoid_image())


# ------------------------------------------------------------------------------------------ training
def _core_of_a_blob(rng: np.random.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright blob whose label is only its core (70 % of each radius): the floor always takes the whole blob."""
    grid = np.indices((size,) * 3, dtype=np.float32)
    centre, radii = rng.uniform(13, 19, 3), rng.uniform(6, 9, 3)
    distance = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    image = rng.normal(0, 0.3, (size,) * 3).astype(np.float32) + 3.0 * (distance <= 1)
    return torch.from_numpy(image)[None, None], torch.from_numpy((distance <= 0.7).astype(np.float32))[None, None]


def test_the_head_learns_a_correction_the_floor_cannot_make():
    torch.manual_seed(0)
    model = build_model(replace(MICRO, name="micro-refine", refine_head_widths=(8, 16, 32)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = RefineHeadTask(model, None, PriorSettings(), own_clicks_after=10 ** 9)
    optimiser = torch.optim.AdamW(task.param_groups(2e-2)[0]["params"], lr=2e-2, weight_decay=0)
    rng = np.random.default_rng(0)
    for step in range(80):
        image, label = _core_of_a_blob(rng)
        loss, _ = task.step({"image": image, "label": label}, StepContext(0, step, 0, 0, 1, torch.device("cpu")))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("refine_head."))
    model.refine_head.eval()
    fresh = np.random.default_rng(99)
    head_dice, floor_dice = [], []
    for _ in range(5):
        image, label = _core_of_a_blob(fresh)
        crop, target = CropPrior(image[0, 0].numpy(), SPACING), label[0, 0].numpy() > 0
        click = ev.first_click(target, np.full(3, SPACING))
        floor_dice.append(ev.dice(crop.region([click]), target))
        head_dice.append(ev.dice(crop.logits([click], 4.0, model.refine_head) > 0, target))
    assert np.mean(floor_dice) < 0.6 and np.mean(head_dice) > np.mean(floor_dice) + 0.2, (head_dice, floor_dice)


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory):
    prepared = make_prepared(tmp_path_factory.mktemp("data") / "prepared", cases=("p0",))
    run = tmp_path_factory.mktemp("runs") / "refine"
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny-refine", "-o", str(run),
                                 "--prior", "classical", "--refine-head", "--epochs", "1", "--max-steps", "2",
                                 "--lr", "1e-2", "--weight-decay", "0", "--min-foreground", "50", "--device", "cpu",
                                 "--json"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    return prepared, run


def test_train_refine_head_changes_only_the_head_and_starts_as_the_floor(refine_run):
    _, run = refine_run
    payload = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert payload["preset"] == "fastsam3d-tiny-refine" and payload["prior"]["kind"] == "classical"
    assert payload["task_state"]["refine_head"] is True
    torch.manual_seed(2023)  # the run's default seed: the same initial weights
    start = build_model("fastsam3d-tiny-refine").state_dict()
    saved = payload["model_state_dict"]
    assert set(saved) == set(start)
    changed = {k for k in saved if not torch.equal(saved[k], start[k])}
    assert any(k.startswith("refine_head.") for k in changed)
    residual = {k for k in changed if not k.startswith("refine_head.")}
    assert residual == {"mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
                        "mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"}  # zeroed: the model starts as the floor
    assert all(float(saved[k].abs().max()) == 0 for k in residual)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "floor_dice" in record and "dice" in record


def test_a_refine_checkpoint_loads_segments_and_bundles(refine_run, tmp_path):
    _, run = refine_run
    model, info = load_model(run / "last.pth")
    assert model.refine_head is not None and info.preset == "fastsam3d-tiny-refine"
    predictor = Predictor(model)
    predictor.set_volume(_ellipsoid_image())
    mask = predictor.add_click([45, 40, 35], include=True, space="ijk", object="o")
    assert mask[45, 40, 35] and 0 < mask.sum() < mask.size // 4
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["weights", "bundle", str(run / "last.pth"), "--name", "refine-test",
                                 "--output-dir", str(bundle), "--json"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preset"] == "fastsam3d-tiny-refine" and manifest["config"]["refine_head_widths"] == [8, 16, 32]
    shipped, _ = load_model(bundle / manifest["file"])
    for key, value in shipped.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key].half().float())


def test_resetting_a_trained_head_gives_back_the_floor_for_the_untrained_row(refine_run):
    _, run = refine_run
    model, _ = load_model(run / "last.pth")
    assert float(model.refine_head.head.weight.detach().abs().max()) > 0  # trained two steps at lr 1e-2
    ev.reset_refine_head(model)
    assert float(model.refine_head.head.weight.detach().abs().max()) == 0 and float(model.refine_head.skip.detach()) == 2.0
    region = (torch.rand(1, 1, 8, 8, 8) > 0.5).float()
    feats = torch.cat([torch.randn(1, 2, 8, 8, 8), region, torch.rand(1, 2, 8, 8, 8)], 1)
    with torch.no_grad():
        assert torch.equal(model.refine_head(feats), 2.0 * (2 * region - 1))
    with pytest.raises(ValueError, match="no refine head"):
        ev.reset_refine_head(build_model("fastsam3d-tiny"))


@pytest.mark.parametrize("extra, message", [
    (["--model", "fastsam3d-tiny-refine", "--refine-head"], "--refine-head trains the correction of the classical prior"),
    (["--model", "fastsam3d-tiny", "--prior", "classical", "--refine-head"], "model 'fastsam3d-tiny' has no refine head"),
    (["--model", "fastsam3d-tiny-refine"], "corrects the classical prior with its refine head"),
    (["--model", "fastsam3d-tiny-refine", "--prior", "classical", "--refine-head", "--grad-iterations", "1"],
     "--grad-iterations set(s) how the SAM decoder trains"),
    (["--model", "fastsam3d-tiny", "--weight-decay", "-1"], "--weight-decay must be zero or positive"),
])
def test_refine_requests_that_cannot_work_are_usage_errors_before_anything_is_written(refine_run, tmp_path, extra,
                                                                                      message):
    prepared, _ = refine_run
    before = tree(prepared)
    result = runner.invoke(app, ["train", str(prepared), "-o", str(tmp_path / "run"), "--device", "cpu", *extra],
                           env=CLI_ENV)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "run").exists() and tree(prepared) == before


def test_resuming_across_the_refine_flag_is_a_usage_error(refine_run):
    prepared, run = refine_run
    before = (run / "last.pth").read_bytes()
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny-refine", "-o", str(run),
                                 "--prior", "classical", "--epochs", "1", "--iterations", "2", "--device", "cpu",
                                 "--resume"], env=CLI_ENV)
    assert result.exit_code == 2 and "trained with --refine-head" in result.stderr, result.output
    assert (run / "last.pth").read_bytes() == before


def test_a_zero_residual_model_skips_the_encoder_and_gives_the_same_masks():
    image = _ellipsoid_image()
    model = _refine_model_at_init()
    with torch.no_grad():  # a head that changes the floor's answer, as a trained one does
        torch.nn.init.normal_(model.refine_head.head.weight, std=0.5)
    masks = {}
    for shortcut in (True, False):
        predictor = Predictor(model)
        assert predictor.prior_only
        predictor.prior_only = shortcut
        predictor.set_volume(image)
        for point, include in (([45, 40, 35], True), ([45, 40, 20], False)):
            masks[shortcut] = predictor.add_click(point, include=include, space="ijk", object="o")
        stages = {record["stage"] for record in predictor.timings}
        assert ("encode" in stages) is not shortcut
    assert np.array_equal(masks[True], masks[False])
    with torch.no_grad():
        model.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias[0] = 1e-6
    assert not Predictor(model).prior_only  # any non-zero weight: the decoder runs


def test_a_batch_of_clicks_decodes_each_crop_of_a_prior_only_model_once_with_the_same_masks():
    """`add_clicks` (what `infer` runs for a click file) defers a prior-only model's steps to one per crop:
    the masks equal those of the full path that decodes every click (the residual is zero either way),
    also when a click opens a second crop and a later one returns to the first."""
    values = np.random.default_rng(3).normal(100, 10, (240, 60, 60)).astype(np.float32)
    grid = np.indices(values.shape, dtype=np.float32)
    for centre in (40, 200):  # two blobs 240 mm apart: more than one 128³ crop at 1.5 mm
        values += 80 * (((grid[0] - centre) / 18) ** 2 + ((grid[1] - 30) / 14) ** 2 + ((grid[2] - 30) / 12) ** 2 <= 1)
    image = sitk.GetImageFromArray(values.transpose(2, 1, 0))
    image.SetSpacing((SPACING,) * 3)
    model = _refine_model_at_init()
    with torch.no_grad():  # a head that changes the floor's answer, as a trained one does
        torch.nn.init.normal_(model.refine_head.head.weight, std=0.5)
    points = [[40, 30, 30], [45, 36, 30], [200, 30, 30], [40, 30, 42]]
    labels = [1, 1, 1, 0]
    results = {}
    for deferred in (True, False):
        predictor = Predictor(model)
        predictor.prior_only = deferred  # False: encoder + decoder run, every click decoded
        predictor.set_volume(image)
        mask = predictor.add_clicks(points, labels, space="ijk", object="o")
        report = predictor.object_report("o")
        decodes = sum(record["stage"] == "decode" for record in predictor.timings)
        results[deferred] = (mask, decodes, [crop["clicks"] for crop in report["crops"]])
    (batched, batched_decodes, batched_crops), (full, full_decodes, full_crops) = results[True], results[False]
    assert np.array_equal(batched, full) and batched[40, 30, 30] and batched[200, 30, 30] and not batched[40, 30, 42]
    assert batched_crops == full_crops and len(full_crops) == 2  # the same crops, each with the same clicks
    assert (batched_decodes, full_decodes) == (2, 4)


def test_refined_logits_on_the_box_equal_the_whole_crop_computation():
    """Step 4 (clicks forced, components holding an include click) runs on the head's box only; it must give
    the logits the whole-crop computation gives, including a component the head leaves apart from the clicks."""
    from fastsam3d_cli.interactive import refine

    torch.manual_seed(1)
    head = RefineHead().eval()
    with torch.no_grad():
        torch.nn.init.normal_(head.head.weight, std=0.5)
    values, _ = _ellipsoid()
    crop = CropPrior(values, SPACING)
    clicks = [((45, 40, 35), True), ((45, 40, 22), False), ((52, 44, 35), True)]
    region = crop.region(clicks)
    ours = refine.refined_logits(head, crop.values, crop.smooth, region, clicks, SPACING, 4.0)
    includes = [c for c, include in clicks if include]
    excludes = [c for c, include in clicks if not include]
    box = refine.box_around([c for c, _ in clicks], values.shape, SPACING)
    features = torch.from_numpy(refine.features(crop.values, crop.smooth, region, includes, excludes, box, SPACING))
    whole = np.full(values.shape, np.float32(-4.0))
    with torch.no_grad():
        whole[box] = head(features[None])[0, 0].numpy()
    reference = refine._decide(whole, includes, excludes)
    assert np.array_equal(ours, reference)
    assert (ours > 0).sum() < (whole > 0).sum()  # components apart from the clicks were dropped


def test_the_prior_smooths_only_the_clicks_box_and_gets_the_whole_crops_values_bit_for_bit():
    """CropPrior smooths the box its clicks read (padded by the smoothing's reach): the floor's region and the
    head's logits must equal those computed from the whole crop smoothed, for clicks inside, at the crop's
    faces, and as the box grows click by click."""
    from fastsam3d_cli.interactive import refine
    from fastsam3d_cli.interactive.classical import segment_clicks

    torch.manual_seed(2)
    head = RefineHead().eval()
    with torch.no_grad():
        torch.nn.init.normal_(head.head.weight, std=0.5)
    values, _ = _ellipsoid()
    rng = np.random.default_rng(3)
    values = values + rng.normal(0, 0.3, values.shape).astype(np.float32)
    reference = CropPrior(values, SPACING)
    lazy = CropPrior(values, SPACING)
    history = [((45, 40, 35), True), ((0, 40, 35), False), ((52, 44, 0), True), ((63, 63, 63), True)]
    for step in range(1, len(history) + 1):
        clicks = history[:step]
        includes = [c for c, include in clicks if include]
        excludes = [c for c, include in clicks if not include]
        region = segment_clicks(reference.values, reference.smooth, reference.spacing, includes, excludes)
        expected = refine.refined_logits(head, reference.values, reference.smooth, region, clicks, SPACING, 4.0)
        assert np.array_equal(lazy.logits(clicks, 4.0, head), expected), step
        assert np.array_equal(lazy.region(clicks), region), step
    box = lazy.needed_box(history[:1], refine=True)
    assert np.isnan(lazy.smooth_covering(box)).any()  # only the boxes were smoothed, not the whole crop
    assert np.array_equal(lazy.smooth, reference.smooth)  # `smooth` is still the whole crop on demand


def test_the_smoothing_radius_is_the_impulse_responses_reach():
    from fastsam3d_cli.interactive.classical import smoothing_radius

    assert smoothing_radius((1.5, 1.5, 1.5), 1.0) == (2, 2, 2)
    assert smoothing_radius((1.5, 1.5, 3.0), 1.0) == (2, 2, 0)  # an axis coarser than 2σ is not smoothed
    assert smoothing_radius((1.5, 1.5, 1.5), 0.0) == (0, 0, 0)


def test_an_inference_load_keeps_the_head_channels_last_with_the_same_decisions(tmp_path):
    """`infer`'s load (and the evaluation's) store the head channels-last on CPU (faster 3D convolutions); the
    logits stay within 1e-3 of the default layout's and no voxel changes side (checked on the bundled model's
    57 evaluation targets as well: identical Dice, docs/benchmark.md)."""
    from fastsam3d_cli.interactive import refine
    from fastsam3d_cli.model.checkpoint import save_checkpoint
    from fastsam3d_cli.training.evaluation import checkpoint_model
    from fastsam3d_cli.weights.loading import load_inference_model

    model = _refine_model_at_init()
    with torch.no_grad():
        torch.nn.init.normal_(model.refine_head.head.weight, std=0.5)
    path = tmp_path / "refine.pth"
    save_checkpoint(path, model.state_dict(), config=model.config.to_dict(), prior=PriorSettings().to_dict())
    loaded = load_inference_model(checkpoint=path, device="cpu").model
    channels_last = torch.channels_last_3d
    assert loaded.refine_head.enc1[0].weight.is_contiguous(memory_format=channels_last)
    assert checkpoint_model(path).refine_head.enc1[0].weight.is_contiguous(memory_format=channels_last)
    plain, _ = load_model(path, device="cpu")
    assert not plain.refine_head.enc1[0].weight.is_contiguous(memory_format=channels_last)
    values, _ = _ellipsoid()
    crop = CropPrior(values, SPACING)
    clicks = [((45, 40, 35), True), ((45, 40, 22), False)]
    region = crop.region(clicks)
    fast = refine.refined_logits(loaded.refine_head, crop.values, crop.smooth, region, clicks, SPACING, 4.0)
    slow = refine.refined_logits(plain.refine_head, crop.values, crop.smooth, region, clicks, SPACING, 4.0)
    assert np.abs(fast - slow).max() < 1e-3
    assert np.array_equal(fast > 0, slow > 0)
