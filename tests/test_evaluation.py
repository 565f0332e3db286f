"""The unseen-data evaluation: the click protocol (deepest point, largest error, sign, spacing), the Dice
bookkeeping, the outputs, the validation loader's physical resampling, and a real tiny model through the
Predictor."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from fastsam3d_cli.imaging.volumes import array_ijk, image_from_array_ijk, read_image
from fastsam3d_cli.training import evaluation as ev

DATA_DIR = Path(os.environ.get("FASTSAM3D_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


class Oracle:
    """Returns the target itself whatever the clicks: a perfect segmenter."""

    def __init__(self, target: np.ndarray) -> None:
        self.target, self.calls, self.resets = target, [], 0

    def set_volume(self, volume) -> None:
        pass

    def add_click(self, point, include=True, space="ijk", object="object"):  # noqa: A002
        self.calls.append((tuple(point), include, space, object))
        return self.target.copy()

    def reset_object(self, object=None) -> None:  # noqa: A002
        self.resets += 1


class Scripted(Oracle):
    """Returns the given masks in turn (one per click)."""

    def __init__(self, masks) -> None:
        super().__init__(masks[0])
        self.masks = list(masks)

    def add_click(self, point, include=True, space="ijk", object="object"):  # noqa: A002
        super().add_click(point, include, space, object)
        return self.masks[min(len(self.calls), len(self.masks)) - 1]


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_a_perfect_segmenter_scores_one_from_the_first_click():
    target = _box((30, 30, 16), (5, 6, 2), (16, 17, 13))  # an 11³ cube: a unique deepest voxel
    oracle = Oracle(target)
    scores, clicks = ev.score_target(oracle, target, (1.0, 1.0, 1.0), clicks=10)
    assert scores == [1.0] * 10
    assert clicks == [[10, 11, 7, 1]]  # the cube's centre, include; then no error left: no more clicks
    assert oracle.calls == [((10, 11, 7), True, "ijk", "target")] and oracle.resets == 1


def test_first_click_is_the_deepest_voxel_in_millimetres():
    # 21 × 21 × 5 voxels at 1 × 1 × 5 mm: 21 × 21 × 25 mm; the deepest voxel is the centre (10, 10, 2)
    target = _box((40, 40, 12), (3, 4, 5), (24, 25, 10))
    assert ev.first_click(target, (1.0, 1.0, 5.0)) == ((13, 14, 7), True)
    # in voxel units the same region would not have a unique centre on the thin axis; spacing matters
    distance = ev.distance_inside_mm(target, (1.0, 1.0, 5.0))
    assert distance[13, 14, 7] == pytest.approx(10.0 + 1.0)  # 11 voxels to the outside along i and j
    assert distance[13, 14, 5] == pytest.approx(5.0)  # one 5 mm step to the outside along k


def test_distance_matches_an_independent_transform():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    region = rng.random((20, 18, 9)) > 0.3
    spacing = (0.8, 1.1, 3.0)
    expected = scipy_ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    np.testing.assert_allclose(ev.distance_inside_mm(region, spacing), np.where(region, expected, 0), rtol=1e-5)


def test_next_click_goes_to_the_centre_of_the_largest_error_with_its_sign():
    shape = (40, 40, 20)
    target = _box(shape, (5, 5, 2), (35, 35, 18))
    missed = _box(shape, (8, 9, 4), (17, 18, 13))  # a 9³ cube (729 voxels) missed, centre (12, 13, 8)
    leak = _box(shape, (36, 10, 5), (40, 14, 9))  # 64 voxels leaked
    prediction = (target & ~missed) | leak
    assert ev.next_click(prediction, target, (1.0, 1.0, 1.0)) == ((12, 13, 8), True)
    big_leak = _box(shape, (0, 0, 0), (40, 40, 2))  # 3200 voxels: now the leak is the largest error
    position, include = ev.next_click((target & ~missed) | big_leak, target, (1.0, 1.0, 1.0))
    assert include is False and big_leak[position]
    assert ev.next_click(target, target, (1.0, 1.0, 1.0)) is None


def test_largest_error_is_by_size_not_by_depth():
    shape = (60, 20, 20)
    target = np.zeros(shape, dtype=bool)
    cube = _box(shape, (2, 2, 2), (12, 12, 12))  # 1000 voxels, deep
    sheet = _box(shape, (20, 0, 0), (60, 20, 2))  # 1600 voxels, 1 voxel deep
    position, include = ev.next_click(cube | sheet, target, (1.0, 1.0, 1.0))
    assert include is False and sheet[position]


def test_dice_and_the_scores_of_a_scripted_segmenter():
    target = _box((20, 20, 10), (2, 2, 2), (12, 12, 8))
    half = target.copy()
    half[7:] = False
    segmenter = Scripted([half, target])
    scores, clicks = ev.score_target(segmenter, target, (1.0, 1.0, 2.0), clicks=5)
    assert scores[0] == pytest.approx(2 * half.sum() / (half.sum() + target.sum()))
    assert scores[1:] == [1.0] * 4
    assert clicks[1][3] == 1 and target[tuple(clicks[1][:3])] and not half[tuple(clicks[1][:3])]
    assert math.isnan(ev.dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_select_classes_spreads_deterministically():
    assert ev.select_classes(10, None) == list(range(10))
    assert ev.select_classes(10, 3) == [0, 4, 9] or ev.select_classes(10, 3) == [0, 5, 9]
    assert ev.select_classes(116, 8) == ev.select_classes(116, 8) and len(ev.select_classes(116, 8)) == 8
    assert ev.select_classes(5, 1) == [0] and ev.select_classes(5, 0) == []


def _phantom_volume():
    shape, spacing = (48, 40, 16), (1.5, 1.5, 3.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), axis=-1)
    ball = ((grid - np.array([36.0, 30.0, 24.0])) ** 2).sum(-1) <= 12.0 ** 2
    array = np.where(ball, 180.0, 30.0) + np.random.default_rng(0).normal(0, 3, shape)
    image = image_from_array_ijk(array.astype(np.float32))
    image.SetSpacing(spacing)
    return ev.TargetVolume("unseen", "phantoms/ball", image, [("ball", ball)]), ball


def test_evaluate_writes_a_table_json_and_plot(tmp_path):
    volume, ball = _phantom_volume()
    seen = ev.TargetVolume("seen", "phantoms/seen", volume.image, [("ball", ball)])
    methods = [ev.Method("oracle", lambda: Oracle(ball)), ev.classical_method()]
    results = ev.evaluate([volume, seen], methods, clicks=3)
    assert [r.group for r in results] == ["unseen", "seen"]
    assert results[0].dice["oracle"] == [1.0, 1.0, 1.0]
    assert results[0].dice["floor"][0] > 0.9
    table = ev.markdown_table(results, ["oracle", "floor"], 3)
    assert "Unseen" in table and "Seen" in table and "oracle @1" in table and "floor @3" in table
    assert "@5" not in table and "**mean of 1**" in table
    data = ev.results_json(results, ["oracle", "floor"], 3, command="test")
    text = json.dumps(data)  # serialisable
    assert json.loads(text)["summary"]["unseen"]["oracle"]["dice@1"] == 1.0
    ev.plot_curves(results, ["oracle", "floor"], 3, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_model():
    """A small Sam3D (64³ crops, narrow encoder and decoder), seeded: the model path without the cost."""
    from dataclasses import replace

    import torch

    from fastsam3d_cli.model import build_model
    from fastsam3d_cli.model.config import get_config, with_overrides

    config = with_overrides(get_config("fastsam3d-tiny"), embed_dim=48, depth=2, num_heads=2, img_size=64, out_chans=48)
    config = replace(config, prompt_embed_dim=48, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
    torch.manual_seed(0)
    return build_model(config, attention="sdpa")


def test_a_model_runs_through_the_predictor():
    volume, ball = _phantom_volume()
    method = ev.model_method("tiny", _tiny_model())
    results = ev.evaluate([volume], [method], clicks=3)
    scores, clicks = results[0].dice["tiny"], results[0].clicks["tiny"]
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert clicks[0] == [*ev.first_click(ball, volume.image.GetSpacing())[0], 1]
    assert all(0 <= c < n for click in clicks for c, n in zip(click[:3], volume.image.GetSize()))


def test_untrained_model_is_the_seeded_initialisation():
    import torch

    a, b = ev.untrained_model(), ev.untrained_model()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.skipif(not (DATA_DIR / "validation" / "abdomen_ct_dicom").is_dir(), reason="no shared validation data")
def test_validation_labels_are_resampled_by_physical_position():
    volumes = ev.load_validation(DATA_DIR)
    ct = next(volumes)
    stored = array_ijk(read_image(DATA_DIR / "validation" / "abdomen_ct_dicom_seg.nii.gz"))
    assert tuple(ct.image.GetSize()) == (512, 512, 20)
    # the labelmap's y axis runs the other way: physical resampling equals flipping its array along j
    liver = dict(ct.targets)["liver"]
    np.testing.assert_array_equal(liver, stored[:, ::-1, :] == 5)
    assert not np.array_equal(liver, stored == 5)
    names = json.loads((DATA_DIR / "validation" / "abdomen_ct_dicom_seg_labels.json").read_text())
    assert len(names) == 31 and len(ct.targets) <= 31
    brains = list(volumes)
    assert [b.source for b in brains] == ["validation/brain1_mr", "validation/brain2_mr"]
    assert [int(b.targets[0][1].sum()) for b in brains] == [4137, 453]


def _script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate_unseen.py"
    spec = importlib.util.spec_from_file_location("evaluate_unseen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_bad_options_and_missing_inputs(tmp_path, capsys):
    script = _script()
    with pytest.raises(SystemExit) as caught:
        script.parse_args(["--sets", "train"])
    assert caught.value.code == 2 and "--sets" in capsys.readouterr().err
    out = tmp_path / "result"
    code = script.main(["--no-untrained", "--data-dir", str(tmp_path / "nowhere"), "--sets", "seen", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("error: ") and "nowhere" in err[-1]
    code = script.main(["--no-floor", "--no-untrained", "--checkpoint", f"x={tmp_path / 'missing.pth'}", "--out", str(out)])
    assert code != 0 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert not list(tmp_path.glob("result*"))  # nothing written
