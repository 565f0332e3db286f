"""The classical prior (interactive/prior.py): a model that corrects the floor's region.

What must hold: with the residual switched off (gate 0) the Predictor's mask IS the classical floor's (the
prior is computed on exactly the crop the model sees); training with `--prior classical` learns the gate and
stores it in the checkpoint, which `load_model`, `infer` and `weights bundle` carry; a checkpoint whose prior
entry this version cannot run is refused (exit 4); a run cannot silently change its prior on resume.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.errors import UsageError, WeightsError
from fastsam3d_cli.interactive.classical import ClassicalSegmenter
from fastsam3d_cli.interactive.predictor import Predictor
from fastsam3d_cli.interactive.prior import CropPrior, PriorSettings, check_kind, mask_prompt
from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import load_model
from fastsam3d_cli.training.train import ClassicalPriorBatch, interactive_loss
from test_train_recipe import MICRO, blob_sample
from train_phantoms import CLI_ENV, make_prepared

runner = CliRunner()


def _phantom() -> tuple[sitk.Image, np.ndarray]:
    """A bright ellipsoid in noise on a 1.5 mm grid (the model's spacing: the crop is the volume's own voxels)."""
    rng = np.random.default_rng(1)
    shape = (90, 80, 70)
    grid = np.indices(shape, dtype=np.float32)
    mask = ((grid[0] - 45) / 20) ** 2 + ((grid[1] - 40) / 15) ** 2 + ((grid[2] - 35) / 12) ** 2 <= 1
    volume = rng.normal(100, 10, shape).astype(np.float32) + 80 * mask
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing((1.5, 1.5, 1.5))
    return image, mask


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("fastsam3d-tiny", attention="auto", device="cpu").eval()


def assert_predictor_returns_the_floor(model, image: sitk.Image) -> np.ndarray:
    """Include, exclude, include: the `Predictor`'s mask equals the classical floor's after every click (a prior
    model that adds nothing to the prior); returns the last mask. Shared with test_refine_head.py."""
    predictor = Predictor(model)
    predictor.set_volume(image)
    floor = ClassicalSegmenter()
    floor.set_volume(image)
    for point, include in (([45, 40, 35], True), ([45, 40, 20], False), ([30, 40, 35], True)):
        ours = predictor.add_click(point, include=include, space="ijk", object="o")
        np.testing.assert_array_equal(ours, floor.add_click(point, include=include, space="ijk", object="o"))
    return ours


def test_with_the_residual_off_the_predictor_returns_the_classical_floor(tiny_model):
    image, truth = _phantom()
    tiny_model.prior_settings = {"kind": "classical", "scale": 4.0, "gate": 0.0}
    try:
        ours = assert_predictor_returns_the_floor(tiny_model, image)
        assert ours.sum() > 0.3 * truth.sum()  # and it is a real region, not two empty masks
    finally:
        del tiny_model.prior_settings


def test_a_plain_model_is_untouched_by_the_prior_code(tiny_model):
    image, _ = _phantom()
    predictor = Predictor(tiny_model)
    assert predictor.prior is None
    predictor.set_volume(image)
    mask = predictor.add_click([45, 40, 35], space="ijk", object="o")
    state = predictor.object_state("o")
    crop = state.crops[0]
    # the plain path: the crop's logits are the upsampled decoder output of its stored low-res logits
    np.testing.assert_allclose(crop.logits, tiny_model.upsample_logits(crop.low_res)[0, 0].numpy(), atol=1e-5)
    assert mask.shape == tuple(image.GetSize())


def test_prior_logits_and_mask_prompt():
    rng = np.random.default_rng(0)
    crop = rng.normal(0, 1, (32, 32, 32)).astype(np.float32)
    crop[8:24, 8:24, 8:24] += 5
    prior = CropPrior(crop, 1.5)
    logits = prior.logits([((16, 16, 16), True), ((100, 0, 0), True)], 4.0)  # the second lies outside: ignored
    assert set(np.unique(logits)) == {-4.0, 4.0} and logits[16, 16, 16] == 4.0 and logits[0, 0, 0] == -4.0
    assert not prior.region([((100, 0, 0), True)]).any()
    tensor = torch.from_numpy(logits)[None, None]
    pooled = mask_prompt(tensor, None, 8)
    assert pooled.shape == (1, 1, 8, 8, 8) and float(pooled[0, 0, 4, 4, 4]) == 4.0
    residual = torch.ones(1, 1, 8, 8, 8)
    assert torch.equal(mask_prompt(tensor, residual, 8), pooled + 1)


def test_training_loss_with_the_prior_is_prior_plus_gated_residual_and_trains_the_gate():
    torch.manual_seed(0)
    model = build_model(MICRO)
    rng = np.random.default_rng(0)
    samples = [blob_sample(rng) for _ in range(2)]
    image = torch.stack([s[0] for s in samples])
    label = torch.stack([s[1] for s in samples])
    gate = torch.nn.Parameter(torch.tensor(0.1))
    batch = ClassicalPriorBatch(image, PriorSettings(gate=0.1), gate)
    result = interactive_loss(model, model.encode(image), label, None, 3, np.random.default_rng(1), 1, 0.0, batch)
    assert all(len(clicks) == len(batch.clicks[0]) for clicks in batch.clicks) and len(batch.clicks[0]) >= 1
    prior_only = batch.logits()
    # the logits differ from the prior by the gated residual only: small at gate 0.1
    assert float((result.final_logits.detach() - prior_only).abs().max()) < 4.0
    result.loss.backward()
    assert gate.grad is not None and float(gate.grad) != 0.0


def test_prior_loss_correction_is_the_loss_interactive_loss_sums():
    """With a zeroed residual the logits are the prior itself, so each round's loss is known in closed form."""
    from fastsam3d_cli.interactive.prior import zero_residual
    from fastsam3d_cli.training.losses import correction_loss, dice_ce_loss

    torch.manual_seed(0)
    model = build_model(MICRO)
    zero_residual(model)
    rng = np.random.default_rng(0)
    samples = [blob_sample(rng) for _ in range(2)]
    image, label = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    losses = {}
    for kind in ("dice-ce", "correction"):
        batch = ClassicalPriorBatch(image, PriorSettings(), torch.tensor(1.0))
        result = interactive_loss(model, model.encode(image), label, None, 1, np.random.default_rng(1), 1, 0.0,
                                  batch, prior_loss=kind)
        prior_logits = batch.logits()
        expected = correction_loss if kind == "correction" else dice_ce_loss
        arguments = (prior_logits, prior_logits, label) if kind == "correction" else (prior_logits, label)
        assert float(result.loss.detach()) == pytest.approx(float(expected(*arguments)), rel=1e-5)
        losses[kind] = float(result.loss.detach())
    assert losses["dice-ce"] != pytest.approx(losses["correction"])


def test_settings_validation():
    assert PriorSettings.from_dict(None) is None
    settings = PriorSettings.from_dict({"kind": "classical", "scale": 3, "gate": 0.5})
    assert settings == PriorSettings("classical", 3.0, 0.5)
    for bad in ({"kind": "deep"}, {"kind": "classical", "scale": -1}, {"kind": "classical", "gate": "x"}, "classical"):
        with pytest.raises(WeightsError):
            PriorSettings.from_dict(bad)
    assert check_kind("none") == "none"
    with pytest.raises(UsageError, match="--prior 'magic' is unknown"):
        check_kind("magic")


# ---------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    prepared = make_prepared(tmp_path_factory.mktemp("data") / "prepared", cases=("p0",))
    run = tmp_path_factory.mktemp("runs") / "prior"
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(run), "--epochs", "1",
                                 "--max-steps", "1", "--iterations", "2", "--grad-iterations", "1", "--prior", "classical",
                                 "--device", "cpu", "--json"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    return prepared, run


def test_train_with_prior_stores_it_and_load_model_carries_it(prior_run):
    _, run = prior_run
    payload = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert payload["prior"]["kind"] == "classical" and payload["prior"]["scale"] == 4.0
    assert payload["prior"] == payload["task_state"]["prior"] and isinstance(payload["prior"]["gate"], float)
    # a new prior run starts the residual at 0 (the hypernetwork's last layer zeroed) and one step moved it a
    # little (Adam: about one learning rate per weight), so it started from zero, not from random weights
    last = payload["model_state_dict"]["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"]
    assert 0 < float(last.abs().max()) <= 1e-3
    model, info = load_model(run / "last.pth")
    assert model.prior_settings == payload["prior"] == info.prior
    assert Predictor(model).prior == PriorSettings.from_dict(payload["prior"])


def test_a_correction_loss_run_trains_and_records_its_loss(prior_run, tmp_path):
    prepared, _ = prior_run
    run = tmp_path / "correction"
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(run), "--epochs", "1",
                                 "--max-steps", "1", "--iterations", "2", "--grad-iterations", "1", "--prior", "classical",
                                 "--prior-loss", "correction", "--device", "cpu", "--json"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    payload = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert payload["task_state"]["prior_loss"] == "correction" and payload["prior"]["kind"] == "classical"
    step = json.loads((run / "steps.jsonl").read_text().splitlines()[0])
    assert math.isfinite(step["loss"]) and step["loss"] > 0


def test_resume_with_another_prior_is_a_usage_error(prior_run):
    prepared, run = prior_run
    before = (run / "last.pth").read_bytes()
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(run), "--epochs", "1",
                                 "--iterations", "2", "--grad-iterations", "1", "--device", "cpu", "--resume"],
                           env=CLI_ENV)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(errors) == 1 and "--prior classical" in errors[0] and "not none" in errors[0]
    assert (run / "last.pth").read_bytes() == before


def test_unknown_prior_option_is_exit_2_before_anything_is_written(prior_run, tmp_path):
    prepared, _ = prior_run
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(tmp_path / "run"),
                                 "--prior", "magic", "--device", "cpu"], env=CLI_ENV)
    assert result.exit_code == 2 and "--prior 'magic' is unknown" in result.stderr
    assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(tmp_path / "run"),
                                 "--prior", "classical", "--prior-scale", "0", "--device", "cpu"], env=CLI_ENV)
    assert result.exit_code == 2 and "--prior-scale 0.0 must be positive" in result.stderr
    assert not (tmp_path / "run").exists()
    for extra, message in ((["--prior", "classical", "--prior-loss", "focal"], "--prior-loss 'focal' is unknown"),
                           (["--prior-loss", "correction"], "--prior-loss correction without a prior")):
        result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(tmp_path / "run"),
                                     "--device", "cpu", *extra], env=CLI_ENV)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "run").exists()


def test_bundle_keeps_the_prior_and_a_bad_prior_entry_is_refused(prior_run, tmp_path):
    _, run = prior_run
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["weights", "bundle", str(run / "last.pth"), "--name", "test-prior",
                                 "--output-dir", str(out)], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    stored = torch.load(out / "test-prior.pt", map_location="cpu", weights_only=True)
    assert manifest["prior"]["kind"] == "classical" and stored["prior"] == manifest["prior"]

    payload = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    payload["prior"] = {"kind": "from-the-future"}
    bad = tmp_path / "bad.pth"
    torch.save(payload, bad)
    model, _ = load_model(bad)
    with pytest.raises(WeightsError, match="a prior this version does not know"):
        Predictor(model)


def test_infer_with_a_prior_checkpoint_records_the_prior_in_the_sidecar(prior_run, tmp_path):
    from infer_phantoms import phantom, write

    _, run = prior_run
    image, _ = phantom()
    volume = write(image, tmp_path / "v.nii.gz")
    clicks = tmp_path / "c.json"
    clicks.write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}]}))
    result = runner.invoke(app, ["infer", str(volume), "-c", str(clicks), "-o", str(tmp_path / "m.nii.gz"),
                                 "--checkpoint", str(run / "last.pth"), "--device", "cpu", "--max-crops", "1"],
                           env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["pipeline"]["prior"]["kind"] == "classical" and "classical prior" in sidecar["pipeline"]["clicks"]
    assert sidecar["objects"][0]["voxels"] > 0


def test_validate_scores_a_prior_model_with_its_prior(prior_run, tmp_path):
    """With the residual switched off (gate 0) the model is the floor on the crop: its Dice after one click
    is the floor region's Dice, not the (untrained) decoder's — so validate runs the prior as trained."""
    from fastsam3d_cli.training.validate import validate

    prepared, run = prior_run
    payload = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    payload["prior"] = {**payload["prior"], "gate": 0.0}
    floor_only = tmp_path / "gate0.pth"
    torch.save(payload, floor_only)
    with_prior = validate(prepared, floor_only, clicks=2, device="cpu")
    payload.pop("prior")
    plain = tmp_path / "plain.pth"
    torch.save(payload, plain)
    without = validate(prepared, plain, clicks=2, device="cpu")
    floor_dice = with_prior.overall()["dice_per_click"][0]
    assert floor_dice > 0.5  # the bright phantom organs: the floor finds them
    assert floor_dice > without.overall()["dice_per_click"][0] + 0.2


def test_init_from_a_prior_checkpoint_continues_its_residual(prior_run, tmp_path):
    prepared, run = prior_run
    key = "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"
    before = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    before["model_state_dict"][key] = torch.full_like(before["model_state_dict"][key], 0.5)  # a "trained" residual
    before["prior"] = {**before["prior"], "gate": 0.7}
    start = tmp_path / "start.pth"
    torch.save(before, start)
    result = runner.invoke(app, ["train", str(prepared), "--model", "fastsam3d-tiny", "-o", str(tmp_path / "next"),
                                 "--epochs", "1", "--max-steps", "1", "--iterations", "2", "--grad-iterations", "1",
                                 "--prior", "classical", "--prior-scale", "9", "--init", str(start),
                                 "--device", "cpu"], env=CLI_ENV)
    assert result.exit_code == 0, result.output
    after = torch.load(tmp_path / "next" / "last.pth", map_location="cpu", weights_only=True)
    # not zeroed again: one more small step from the given residual, gate and scale
    assert float((after["model_state_dict"][key] - 0.5).abs().max()) <= 1e-3
    assert abs(after["prior"]["gate"] - 0.7) <= 1e-3 and after["prior"]["scale"] == 4.0
