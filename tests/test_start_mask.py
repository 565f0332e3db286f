"""Starting an object from an existing mask (`Predictor.set_mask`, serve's `PUT …/objects/{name}/mask`).

The rules: without clicks the object IS the mask; a click's crop gets the mask as its first prompt and the
model refines it there; outside every crop the mask stays as given; an exclude click may come first; reset
forgets it; a mask on another grid, or an empty one, is refused naming the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.interactive.predictor import Predictor
from fastsam3d_cli.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("fastsam3d-tiny", attention="auto", device="cpu").eval()


def _long_volume() -> tuple[sitk.Image, np.ndarray]:
    """160×40×30 voxels of 2 mm (320 mm along i: longer than one 192 mm crop) and a bar along all of i."""
    rng = np.random.default_rng(0)
    shape = (160, 40, 30)
    bar = np.zeros(shape, dtype=bool)
    bar[5:155, 15:25, 10:20] = True
    volume = rng.normal(100, 10, shape).astype(np.float32) + 80 * bar
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-100.0, 20.0, 5.0))
    return image, bar


def test_the_object_is_its_starting_mask_until_clicked_and_keeps_it_outside_its_crops(model):
    image, bar = _long_volume()
    predictor = Predictor(model, max_crops=1)
    predictor.set_volume(image)
    predictor.set_mask(bar.astype(np.uint8), object="bar")
    assert np.array_equal(predictor.mask("bar"), bar)
    probabilities = predictor.probabilities("bar")
    assert probabilities[bar].min() > 0.99 and probabilities[~bar].max() < 0.01
    assert predictor.object_report("bar")["initial_mask_voxels"] == int(bar.sum())

    # an exclude click may come first: the object already has a mask
    after = predictor.add_click([20, 20, 15], include=False, space="ijk", object="bar")
    crop = predictor.object_state("bar").crops[0]
    assert crop.transferred is False and crop.logits is not None
    # the crop (192 mm = 96 voxels of 2 mm around i = 20) ends before i = 140: beyond it the mask is as given
    assert np.array_equal(after[140:], bar[140:])
    assert not np.array_equal(after, bar)  # inside the crop the (untrained) model decided

    predictor.reset_object("bar")
    assert "bar" not in predictor.objects


def test_the_first_crop_is_prompted_with_the_mask(model, monkeypatch):
    image, bar = _long_volume()
    predictor = Predictor(model, max_crops=1)
    predictor.set_volume(image)
    predictor.set_mask(bar, object="bar")
    prompts = []
    original = model.decode

    def spy(embedding, points, labels, mask_logits=None):
        prompts.append(mask_logits.clone())
        return original(embedding, points, labels, mask_logits)

    monkeypatch.setattr(model, "decode", spy)
    predictor.add_click([60, 20, 15], space="ijk", object="bar")
    prompt = prompts[0][0, 0]
    assert prompt.shape == (32, 32, 32)
    assert float(prompt.max()) > 9.0 and float(prompt.min()) < -9.0  # the bar (+10) and background (−10)
    # a fresh object gets the usual zero prompt
    predictor.add_click([60, 20, 15], space="ijk", object="fresh")
    assert float(prompts[1].abs().max()) == 0.0


def test_bad_masks_are_refused(model):
    image, bar = _long_volume()
    predictor = Predictor(model, max_crops=1)
    predictor.set_volume(image)
    with pytest.raises(BadInputError, match=r"the mask has \[10, 10, 10\] voxels and the volume \[160, 40, 30\]"):
        predictor.set_mask(np.ones((10, 10, 10), bool), object="x")
    with pytest.raises(BadInputError, match="the mask is empty"):
        predictor.set_mask(np.zeros(bar.shape, bool), object="x")
    assert predictor.objects == []


# ---------------------------------------------------------------------------------------------- serve
def test_serve_starts_an_object_from_a_mask_file(tmp_path):
    import httpx
    import nibabel as nib

    from fastsam3d_cli.serve.app import ServeConfig, decode_mask
    from fastsam3d_cli.serve.server import BackgroundServer
    from fastsam3d_cli.weights.loading import load_inference_model
    from infer_phantoms import make_tiny_checkpoint, phantom, write

    image, _ = phantom()  # 48×40×32, 2×2×3 mm
    root = tmp_path / "root"
    write(image, root / "v.nii.gz")
    labels = np.zeros((48, 40, 32), np.uint8)
    labels[10:30, 10:30, 8:20] = 3
    labels[32:40, 5:12, 5:10] = 5
    mask_image = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    mask_image.CopyInformation(image)
    write(mask_image, tmp_path / "labels.nii.gz")
    other = sitk.GetImageFromArray(np.ones((10, 10, 10), np.uint8))
    write(other, tmp_path / "other.nii.gz")
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pth")
    loaded = load_inference_model(checkpoint=checkpoint, device="cpu")
    with BackgroundServer(ServeConfig(loaded, root=root, max_crops=1)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        sid = client.post("/api/sessions", json={"path": "v.nii.gz"}).json()["id"]
        client.post(f"/api/sessions/{sid}/objects", json={"name": "organ"})
        base = f"/api/sessions/{sid}/objects/organ"

        def put(path: Path, **params):
            return client.put(f"{base}/mask", params={"filename": path.name, **params}, content=path.read_bytes())

        started = put(tmp_path / "labels.nii.gz", label=3)
        assert started.status_code == 200, started.text
        body = started.json()
        assert body["voxels"] == body["initial_mask_voxels"] == 20 * 20 * 12 and body["clicks"] == 0
        assert body["changed"] == {"start": [10, 10, 8], "shape": [20, 20, 12]}
        mask = decode_mask(client.get(f"{base}/mask").content, client.get(f"{base}/mask").headers)
        assert np.array_equal(mask, labels == 3)
        served = tmp_path / "served.nii.gz"
        served.write_bytes(client.get(f"/api/sessions/{sid}/labelmap.nii.gz").content)
        assert np.array_equal(np.asarray(nib.load(str(served)).dataobj), (labels == 3).astype(np.uint8))

        excluded = client.post(f"{base}/clicks", json={"point": [20, 20, 14], "include": False})
        assert excluded.status_code == 200, excluded.text  # an exclude first: the object has a mask already
        undone = client.post(f"{base}/undo").json()
        assert undone["clicks"] == 0 and undone["voxels"] == 20 * 20 * 12  # back to the mask exactly
        exported = client.get(f"/api/sessions/{sid}/clicks.json")
        assert "not reproduced by the click file" in exported.headers["X-Fastsam3d-Warning"]
        assert exported.json()["objects"] == []  # its clicks (none now) are all it could hold

        for response, fragment in ((put(tmp_path / "other.nii.gz"), "is not the volume's"),
                                   (put(tmp_path / "labels.nii.gz", label=9), "no voxel has label 9"),
                                   (client.put(f"{base}/mask", params={"filename": "m.txt"}, content=b"x"),
                                    "no volume suffix"),
                                   (client.put(f"/api/sessions/{sid}/objects/nobody/mask",
                                               params={"filename": "labels.nii.gz"},
                                               content=(tmp_path / "labels.nii.gz").read_bytes()), "no object")):
            assert response.status_code in (400, 404) and fragment in response.json()["error"], response.text
        assert client.get(f"/api/sessions/{sid}/objects/organ/mask").headers["X-Mask-Voxels"] == str(20 * 20 * 12)
        reset = client.post(f"{base}/reset").json()
        assert reset["initial_mask_voxels"] is None and reset["clicks"] == 0
