"""`validate`: Dice/IoU per simulated click (exact values with a stand-in model), summaries, the CLI, bad inputs."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.model import get_config
from fastsam3d_cli.training.train import train
from fastsam3d_cli.training.validate import CaseScores, ValidationResult, score_crop
from train_phantoms import CLI_ENV, SHAPE, make_prepared, tree, write_volume

runner = CliRunner()
S = 128


def _run(*args: str):
    return runner.invoke(app, ["validate", *args], env=CLI_ENV)


class _ConstantModel(nn.Module):
    """A stand-in Sam3D whose every decode predicts the whole crop (+10 logits), recording the clicks."""

    def __init__(self) -> None:
        super().__init__()
        self.config = get_config("fastsam3d-tiny")
        self.anchor = nn.Parameter(torch.zeros(()))
        self.clicks: list[tuple[list[float], int]] = []
        self.masks: list[torch.Tensor | None] = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode(self, volume):
        assert volume.shape == (1, 1, S, S, S)
        return torch.zeros(1, 384, 8, 8, 8)

    def decode(self, embedding, points, labels, mask_logits):
        self.clicks.append((points[0, 0].tolist(), int(labels[0, 0])))
        self.masks.append(mask_logits.clone())
        return torch.full((1, 1, 32, 32, 32), 10.0), torch.zeros(1, 1)

    def upsample_logits(self, low_res):
        return torch.nn.functional.interpolate(low_res, size=(S,) * 3, mode="trilinear", align_corners=False)


def test_dice_and_iou_after_each_click_are_exact():
    label = np.zeros((S, S, S), dtype=bool)
    label[50:70, 50:70, 50:70] = True  # 8000 voxels
    model = _ConstantModel()
    dice, iou, clicks = score_crop(model, np.zeros((S, S, S), np.float32), label, None, 4, np.random.default_rng(0))
    assert dice == pytest.approx([2 * 8000 / (8000 + S ** 3)] * 4)  # the prediction is the whole crop each time
    assert iou == pytest.approx([8000 / S ** 3] * 4)
    # Click 1 (ritm, empty prediction): include, in the core of the cube; click 2 (ritm): the leak is deeper,
    # so an exclude click outside the cube; clicks 3-4 (random over FN ∪ FP = the leak): exclude.
    (first, first_label), (second, second_label) = model.clicks[0], model.clicks[1]
    assert first_label == 1 and all(55 <= v < 65 for v in first)
    assert second_label == 0 and not label[tuple(int(v) for v in second)]
    assert [c[1] for c in model.clicks[2:]] == [0, 0]
    assert torch.count_nonzero(model.masks[0]) == 0 and torch.all(model.masks[1] == 10.0)  # logits fed back


def test_empty_label_gives_no_scores():
    model = _ConstantModel()
    empty = np.zeros((S, S, S), dtype=bool)
    assert score_crop(model, np.zeros((S, S, S), np.float32), empty, None, 3, np.random.default_rng(0)) == ([], [], [])
    assert model.clicks == []


def test_summaries_per_class_and_overall():
    scores = [CaseScores("d", "a", "liver", [0.2, 0.5, 0.4], [0.1, 0.3, 0.2], []),
              CaseScores("d", "b", "liver", [0.4, 0.7, 0.8], [0.2, 0.5, 0.6], []),
              CaseScores("d", "a", "spleen", [math.nan, 0.6, 0.9], [math.nan, 0.4, 0.8], [])]
    result = ValidationResult("x.pth", "fastsam3d-tiny", "cpu", 3, 0, scores)
    assert result.reported_clicks == [1, 3]
    liver = result.per_class()["liver"]
    assert liver["cases"] == 2 and liver["dice_at"] == {"1": pytest.approx(0.3), "3": pytest.approx(0.6)}
    assert liver["mean_best_dice"] == pytest.approx((0.5 + 0.8) / 2)
    overall = result.overall()
    assert overall["dice_at"]["1"] == pytest.approx(0.3)  # NaN left out of the mean
    assert overall["mean_best_dice"] == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert overall["dice_per_click"] == pytest.approx([0.3, 0.6, 0.7])
    assert overall["iou_at"]["3"] == pytest.approx((0.2 + 0.6 + 0.8) / 3)


# ----------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A phantom prepared folder and the seeded untrained fastsam3d-tiny weights (train --max-steps 0)."""
    root = tmp_path_factory.mktemp("validate")
    prepared = make_prepared(root / "prepared")
    train([prepared], "fastsam3d-tiny", epochs=1, max_steps=0, output=root / "run", device="cpu", seed=1)
    return prepared, root / "run" / "last.pth"


def test_table_csv_and_plot(setup, tmp_path):
    prepared, checkpoint = setup
    result = _run(str(prepared), "--checkpoint", str(checkpoint), "--clicks", "3", "--csv", str(tmp_path / "c.csv"),
                  "--plot", str(tmp_path / "d.png"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("Dice@1" in line and "Dice@3" in line and "Dice@5" not in line for line in lines)
    assert sum(line.startswith(("│ ball", "│ egg", "│ overall")) for line in lines) == 3
    assert "4 (case, class) pair(s), 3 click(s) each" in result.stdout
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert len(rows) == 4 and list(rows[0])[3:] == ["dice_1", "dice_2", "dice_3", "iou_1", "iou_2", "iou_3", "best_dice"]
    for row in rows:
        dice = [float(row[f"dice_{k}"]) for k in (1, 2, 3)]
        assert all(0.0 <= d <= 1.0 for d in dice) and float(row["best_dice"]) == pytest.approx(max(dice), abs=1e-6)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_is_one_object_and_seeded(setup):
    prepared, checkpoint = setup
    runs = [_run(str(prepared), "--checkpoint", str(checkpoint), "--clicks", "2", "--classes", "ball", "--json",
                 "--device", "cpu") for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    first, second = (json.loads(r.stdout) for r in runs)
    first.pop("wall_s"), second.pop("wall_s")
    assert first == second
    assert first["model"] == "fastsam3d-tiny" and first["overall"]["cases"] == 2 and list(first["classes"]) == ["ball"]
    case = first["cases"][0]
    assert len(case["dice"]) == len(case["iou"]) == 2 and case["best_dice"] == max(case["dice"])


def test_pairs_with_an_empty_label_are_skipped_with_a_warning(setup, tmp_path):
    prepared, checkpoint = setup
    folder = make_prepared(tmp_path / "prepared", cases=("p0",), classes=("ball",))
    write_volume(folder / "ghost" / "CT_Dataset990_Phantom" / "imagesTr" / "p0.nii.gz", np.ones(SHAPE, np.int16))
    write_volume(folder / "ghost" / "CT_Dataset990_Phantom" / "labelsTr" / "p0.nii.gz", np.zeros(SHAPE, np.uint8))
    result = _run(str(folder), "--checkpoint", str(checkpoint), "--clicks", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "CT_Dataset990_Phantom/p0/ghost: empty label, nothing to click — skipped" in result.stderr
    assert "1 (case, class) pair(s)" in result.stdout
    only_empty = _run(str(folder), "--checkpoint", str(checkpoint), "--classes", "ghost", "--device", "cpu")
    assert only_empty.exit_code == 3 and "no (case, class) with a non-empty label" in only_empty.stderr


def _fails(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastsam3d: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_checkpoint_is_exit_4(setup, tmp_path):
    prepared, _ = setup
    _fails(_run(str(prepared), "--checkpoint", str(tmp_path / "nope.pth")), 4, "does not exist")


def test_checkpoint_of_another_model_is_exit_4(setup, tmp_path):
    prepared, checkpoint = setup
    _fails(_run(str(prepared), "--checkpoint", str(checkpoint), "--model", "sam-med3d", "--csv",
                str(tmp_path / "c.csv")), 4, "does not fit model 'sam-med3d'")
    assert not (tmp_path / "c.csv").exists()


def test_empty_or_wrong_dataset_is_exit_3(setup, tmp_path):
    _, checkpoint = setup
    (tmp_path / "empty").mkdir()
    _fails(_run(str(tmp_path / "empty"), "--checkpoint", str(checkpoint)), 3, "holds no prepared samples")
    _fails(_run(str(tmp_path / "missing"), "--checkpoint", str(checkpoint)), 3, "does not exist")


def test_existing_outputs_are_kept_without_overwrite(setup, tmp_path):
    prepared, checkpoint = setup
    (tmp_path / "c.csv").write_text("keep me")
    before = tree(tmp_path)
    _fails(_run(str(prepared), "--checkpoint", str(checkpoint), "--csv", str(tmp_path / "c.csv")), 3,
           "already exists", "--overwrite", "another name with --csv")  # the option at fault, not -o
    _fails(_run(str(prepared), "--checkpoint", str(checkpoint), "--plot", str(tmp_path / "no" / "d.png")), 3,
           "does not exist", "choose another --plot")
    assert tree(tmp_path) == before


def test_a_plot_that_is_not_a_png_is_a_usage_error(setup, tmp_path):
    prepared, checkpoint = setup
    _fails(_run(str(prepared), "--checkpoint", str(checkpoint), "--plot", str(tmp_path / "dice.txt")), 2,
           "--plot", "must end in .png")
    assert not (tmp_path / "dice.txt").exists()


def test_zero_clicks_is_a_usage_error(setup):
    prepared, checkpoint = setup
    _fails(_run(str(prepared), "--checkpoint", str(checkpoint), "--clicks", "0"), 2, "--clicks must be at least 1")
