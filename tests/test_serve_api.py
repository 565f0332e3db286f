"""`fastsam3d serve`: the JSON API through httpx against a real uvicorn server on 127.0.0.1, a tiny real model.

The server runs in a thread of the test process (`BackgroundServer`); every fixture stops it. Checks: the
session / object / click / undo / redo / result routes; the exported click file replayed by `fastsam3d infer`
gives the same labelmap; bad input is a 4xx JSON one-liner naming the problem (never a 500); --root
confinement; upload limit; LRU eviction (410); several sessions at once.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app as cli_app
from fastsam3d_cli.serve.app import ServeConfig, decode_mask
from fastsam3d_cli.serve.server import BackgroundServer
from fastsam3d_cli.weights.loading import load_inference_model
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, write

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_inference_model(checkpoint=tiny, device="cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/v.nii.gz (48×40×32, 2×2×3 mm, RAS-stored), root/sub/w.nrrd, and a secret file outside the root."""
    base = tmp_path_factory.mktemp("serve")
    image, _ = phantom()
    write(image, base / "root" / "v.nii.gz")
    write(image, base / "root" / "sub" / "w.nrrd")
    write(image, base / "secret.nii.gz")
    os.symlink(base / "secret.nii.gz", base / "root" / "escape.nii.gz")
    return base / "root"


@pytest.fixture(scope="module")
def server(loaded, root):
    with BackgroundServer(ServeConfig(loaded, root=root, max_crops=1, max_sessions=3,
                                      max_upload_bytes=2_000_000)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client


def _open(client, path: str = "v.nii.gz") -> str:
    response = client.post("/api/sessions", json={"path": path})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def _mask(client, sid: str, name: str) -> np.ndarray:
    response = client.get(f"/api/sessions/{sid}/objects/{name}/mask")
    assert response.status_code == 200, response.text
    return decode_mask(response.content, response.headers)


def _labelmap(client, sid: str, tmp_path: Path) -> nib.Nifti1Image:
    response = client.get(f"/api/sessions/{sid}/labelmap.nii.gz")
    assert response.status_code == 200, response.text
    path = tmp_path / "served.nii.gz"
    path.write_bytes(response.content)
    return nib.load(str(path))


# ------------------------------------------------------------------------------------------ the API
def test_clicks_undo_redo_and_the_exported_click_file_replays_to_the_same_labelmap(server, root, tiny, tmp_path):
    sid = _open(server)
    session = server.get(f"/api/sessions/{sid}").json()
    assert session["size"] == [48, 40, 32] and session["objects"] == []
    assert server.post(f"/api/sessions/{sid}/objects", json={"name": "organ"}).json()["label"] == 1
    assert server.post(f"/api/sessions/{sid}/objects", json={"name": "other", "label": 7,
                                                            "colour": "#00ff00"}).status_code == 201

    first = server.post(f"/api/sessions/{sid}/objects/organ/clicks", json={"point": [24, 20, 16]}).json()
    assert first["clicks"] == 1 and first["timing"]["decode"] > 0
    after_one = _mask(server, sid, "organ")
    assert after_one.shape == (48, 40, 32) and after_one.sum() == first["voxels"] > 0
    second = server.post(f"/api/sessions/{sid}/objects/organ/clicks", json={"point": [25, 20, 16]}).json()
    assert second["timing"]["mode"] == "incremental"  # same crop: one decoder step
    after_two = _mask(server, sid, "organ")
    # an exclude click given in RAS millimetres (converted with the volume's geometry)
    affine = nib.load(str(root / "v.nii.gz")).affine
    ras = (affine @ np.array([30, 28, 20, 1.0]))[:3].tolist()
    third = server.post(f"/api/sessions/{sid}/objects/organ/clicks",
                        json={"point": ras, "include": False, "space": "ras"}).json()
    assert third["clicks"] == 3
    after_three = _mask(server, sid, "organ")
    server.post(f"/api/sessions/{sid}/objects/other/clicks", json={"point": [12, 10, 8]})

    undone = server.post(f"/api/sessions/{sid}/objects/organ/undo").json()
    assert undone["clicks"] == 2 and undone["redo"] == 1
    assert np.array_equal(_mask(server, sid, "organ"), after_two)
    server.post(f"/api/sessions/{sid}/objects/organ/undo")
    assert np.array_equal(_mask(server, sid, "organ"), after_one)
    server.post(f"/api/sessions/{sid}/objects/organ/redo")
    redone = server.post(f"/api/sessions/{sid}/objects/organ/redo").json()
    assert redone["clicks"] == 3 and redone["redo"] == 0
    assert np.array_equal(_mask(server, sid, "organ"), after_three)
    _error(server.post(f"/api/sessions/{sid}/objects/organ/redo"), 409, "nothing to redo")
    timings = server.get(f"/api/sessions/{sid}/objects/organ/timings").json()["timings"]
    assert [t["action"] for t in timings] == ["click", "click", "click", "undo", "undo", "redo", "redo"]

    served = _labelmap(server, sid, tmp_path)
    sidecar = server.get(f"/api/sessions/{sid}/labelmap.json").json()
    assert {o["name"]: o["label"] for o in sidecar["objects"]} == {"organ": 1, "other": 7}
    assert np.allclose(served.affine, affine)
    clicks = server.get(f"/api/sessions/{sid}/clicks.json")
    (tmp_path / "clicks.json").write_text(clicks.text)
    assert json.loads(clicks.text)["space"] == "ijk"
    result = CliRunner().invoke(cli_app, ["infer", str(root / "v.nii.gz"), "-c", str(tmp_path / "clicks.json"),
                                          "-o", str(tmp_path / "replayed.nii.gz"), "--checkpoint", str(tiny),
                                          "--device", "cpu", "--max-crops", "1"], env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    replayed = nib.load(str(tmp_path / "replayed.nii.gz"))
    labels = np.asarray(served.dataobj)
    assert np.array_equal(labels, np.asarray(replayed.dataobj)) and set(np.unique(labels)) <= {0, 1, 7}
    assert (labels == 1).sum() > 0 and (labels == 7).sum() > 0
    assert np.array_equal(served.affine, replayed.affine) and served.get_data_dtype() == replayed.get_data_dtype()
    assert sidecar["objects"][0]["voxels"] == int((labels == 1).sum())
    server.delete(f"/api/sessions/{sid}")


def test_objects_reset_delete_and_probabilities(server, tmp_path):
    sid = _open(server)
    server.post(f"/api/sessions/{sid}/objects", json={"name": "a"})
    server.post(f"/api/sessions/{sid}/objects/a/clicks", json={"point": [24, 20, 16]})
    response = server.get(f"/api/sessions/{sid}/objects/a/probabilities.nii.gz")
    (tmp_path / "p.nii.gz").write_bytes(response.content)
    probabilities = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
    assert probabilities.dtype == np.float32 and 0 <= probabilities.min() and probabilities.max() <= 1
    reset = server.post(f"/api/sessions/{sid}/objects/a/reset").json()
    assert reset["clicks"] == 0 and not _mask(server, sid, "a").any()
    assert server.delete(f"/api/sessions/{sid}/objects/a").json() == {"deleted": "a"}
    _error(server.get(f"/api/sessions/{sid}/objects/a/mask"), 404, "no object 'a'")
    server.delete(f"/api/sessions/{sid}")


def test_upload_opens_a_session_and_the_page_and_viewer_files_are_served(server, root):
    data = (root / "v.nii.gz").read_bytes()
    response = server.post("/api/sessions", params={"filename": "upload.nii.gz"}, content=data,
                           headers={"content-type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    assert server.get(f"/api/sessions/{sid}/volume/upload.nii.gz").content == data
    page = server.get("/")
    assert page.status_code == 200 and "niivue.umd.js" in page.text
    assert server.get("/static/niivue.umd.js").status_code == 200
    assert server.get("/openapi.json").json()["info"]["title"] == "fastsam3d serve"
    assert "sub/w.nrrd" in server.get("/api/files").json()["files"]
    assert "escape.nii.gz" not in server.get("/api/files").json()["files"]
    server.delete(f"/api/sessions/{sid}")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_requests_are_4xx_json_one_liners_naming_the_problem(server):
    sid = _open(server)
    base = f"/api/sessions/{sid}/objects"
    server.post(base, json={"name": "organ"})
    _error(server.get("/api/sessions/0123456789abcdef"), 404, "0123456789abcdef")
    _error(server.post(f"{base}/liver/clicks", json={"point": [1, 2, 3]}), 404, "no object 'liver'", sid)
    _error(server.post(f"{base}/organ/clicks", content=b"{not json", headers={"content-type": "application/json"}),
           422, "JSON")
    _error(server.post(f"{base}/organ/clicks", json={"point": [1, 2]}), 422, "'point'")
    _error(server.post(f"{base}/organ/clicks", json={"point": [1, 2, 3], "space": "xyz"}), 422, "'space'")
    _error(server.post(f"{base}/organ/clicks", json={"point": [60, 2, 3]}), 400, "'point'", "outside the volume")
    _error(server.post(f"{base}/organ/clicks", json={"point": [1, 2, 3], "include": False}), 400, "'include'")
    _error(server.post(base, json={"name": "organ"}), 409, "already exists")
    _error(server.post(base, json={"name": "x", "label": 70000}), 422, "'label'")
    _error(server.post(base, json={"name": "y", "colour": "red"}), 422, "'colour'")
    _error(server.post(base, json={"name": "left/right"}), 422, "'name'", "'/'")
    _error(server.post(f"{base}/organ/undo"), 409, "no click to undo")
    _error(server.get("/no/such/route"), 404, "/no/such/route")
    _error(server.post("/api/sessions", content=b"x" * 10, headers={"content-type": "application/octet-stream"}),
           422, "'filename'")
    _error(server.post("/api/sessions", params={"filename": "bad.nii.gz"}, content=b"not an image"), 400,
           "bad.nii.gz", "not a readable 3D volume")
    _error(server.post("/api/sessions", params={"filename": "notes.txt"}, content=b"hello"), 400, "suffix")
    assert server.get(f"/api/sessions/{sid}").json()["objects"][0]["clicks"] == 0  # nothing was changed
    server.delete(f"/api/sessions/{sid}")


def test_oversized_upload_is_413_and_leaves_no_session(server):
    before = server.get("/api/sessions").json()["sessions"]
    _error(server.post("/api/sessions", params={"filename": "big.nii"}, content=b"\0" * 2_000_001), 413,
           "--max-upload")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"\0" * 100_000

    _error(server.post("/api/sessions", params={"filename": "big.nii"}, content=chunks()), 413, "--max-upload")
    assert server.get("/api/sessions").json()["sessions"] == before


@pytest.mark.parametrize("path, fragment", [("../secret.nii.gz", "'..'"), ("sub/../../secret.nii.gz", "'..'"),
                                            ("/etc/passwd", "absolute"), ("escape.nii.gz", "outside --root")])
def test_paths_outside_root_are_refused_with_403(server, path, fragment):
    _error(server.post("/api/sessions", json={"path": path}), 403, fragment)


def test_missing_file_under_root_is_404(server):
    _error(server.post("/api/sessions", json={"path": "nothere.nii.gz"}), 404, "nothere.nii.gz")


def test_least_recently_used_session_is_evicted_with_a_clear_410(server):
    for sid in [s["id"] for s in server.get("/api/sessions").json()["sessions"]]:
        server.delete(f"/api/sessions/{sid}")
    first, second, third = _open(server), _open(server), _open(server)
    server.get(f"/api/sessions/{first}")  # first is now more recent than second
    fourth = _open(server)  # max_sessions=3: second (least recently used) goes
    _error(server.get(f"/api/sessions/{second}"), 410, second, "--max-sessions", "open the volume again")
    for sid in (first, third, fourth):
        assert server.get(f"/api/sessions/{sid}").status_code == 200
        server.delete(f"/api/sessions/{sid}")
    _error(server.get(f"/api/sessions/{first}"), 410, "was closed")


def test_memory_cap_evicts_the_least_recently_used_session(loaded, root):
    with BackgroundServer(ServeConfig(loaded, root=root, max_crops=1, max_memory_bytes=1)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            first = _open(client)
            second = _open(client)  # over the cap: the idle first session goes, the new one stays
            _error(client.get(f"/api/sessions/{first}"), 410, "--max-memory")
            assert client.get(f"/api/sessions/{second}").status_code == 200


def test_concurrent_sessions_give_the_same_masks_as_one_at_a_time(server):
    points = [[24, 20, 16], [20, 18, 14], [28, 22, 18]]
    sessions = [_open(server) for _ in points]
    for sid in sessions:
        server.post(f"/api/sessions/{sid}/objects", json={"name": "o"})
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with httpx.Client(base_url=str(server.base_url), timeout=120) as client:
                response = client.post(f"/api/sessions/{sessions[n]}/objects/o/clicks", json={"point": points[n]})
                assert response.status_code == 200, response.text
                results[n] = _mask(client, sessions[n], "o")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(points))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for n, sid in enumerate(sessions):  # the same clicks again, one at a time: the same masks
        server.post(f"/api/sessions/{sid}/objects/o/reset")
        server.post(f"/api/sessions/{sid}/objects/o/clicks", json={"point": points[n]})
        assert np.array_equal(_mask(server, sid, "o"), results[n])
        server.delete(f"/api/sessions/{sid}")
    assert not np.array_equal(results[0], results[2])


def test_without_a_token_only_loopback_host_names_are_answered(server):
    """A web page whose DNS name was rebound to 127.0.0.1 sends its own name in Host: refused."""
    _error(server.get("/api/info", headers={"Host": "attacker.example:8000"}), 403, "127.0.0.1 or localhost")
    _error(server.get("/api/files", headers={"Host": "evil.test"}), 403)
    port = server.base_url.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert server.get("/api/info", headers={"Host": host}).status_code == 200


def test_a_token_guards_every_route_but_the_page(loaded, root):
    token = "s3cret-token-value"
    with BackgroundServer(ServeConfig(loaded, root=root, token=token, max_crops=1)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            _error(client.get("/api/info"), 401, "Authorization: Bearer")
            _error(client.get("/api/info", headers={"Authorization": "Bearer wrong"}), 401, "token")
            _error(client.get("/info/"), 401)
            assert client.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200


def test_a_labelmap_read_keeps_the_merged_logits_for_the_next_click(loaded, root):
    import threading as _threading

    from fastsam3d_cli.interactive.predictor import Predictor
    from fastsam3d_cli.serve.session import Session

    predictor = Predictor(loaded.model, loaded.device, max_crops=1)
    predictor.set_volume(root / "v.nii.gz")
    session = Session("s", predictor, root / "v.nii.gz", "v.nii.gz", _threading.Lock())
    session.add_object("a")
    session.click("a", [24, 20, 16], True, "ijk")
    labels = session.labelmap()
    assert np.array_equal(labels > 0, session.mask("a"))
    assert predictor.object_state("a").canvas is not None  # infer frees it; an interactive session does not


def _box(client, sid: str, start, shape) -> np.ndarray:
    response = client.get(f"/api/sessions/{sid}/labelmap.raw",
                          params={"start": ",".join(map(str, start)), "shape": ",".join(map(str, shape))})
    assert response.status_code == 200, response.text
    dtype = np.dtype(response.headers["X-Labelmap-Dtype"]).newbyteorder("<")
    return np.frombuffer(response.content, dtype=dtype).reshape(tuple(shape), order="F")


def test_a_click_names_the_box_it_changed_and_that_box_of_the_labelmap_is_served_raw(server, tmp_path):
    """What the page does after a click: patch its overlay with the changed box only; the result must be the
    full labelmap (checked voxel for voxel against labelmap.nii.gz after every click, undo and redo)."""
    sid = _open(server)
    server.post(f"/api/sessions/{sid}/objects", json={"name": "a"})
    server.post(f"/api/sessions/{sid}/objects", json={"name": "b", "label": 300})  # uint16 labelmap
    overlay = np.zeros((48, 40, 32), dtype=np.uint16)
    steps = [("a", "clicks", {"point": [24, 20, 16]}), ("b", "clicks", {"point": [26, 21, 16]}),
             ("a", "clicks", {"point": [28, 24, 18], "include": False}), ("a", "undo", None), ("a", "redo", None)]
    for name, action, body in steps:
        answer = server.post(f"/api/sessions/{sid}/objects/{name}/{action}", json=body).json()
        changed = answer["changed"]
        if changed is not None:
            start, shape = changed["start"], changed["shape"]
            overlay[tuple(slice(a, a + n) for a, n in zip(start, shape))] = _box(server, sid, start, shape)
        full = np.asarray(_labelmap(server, sid, tmp_path).dataobj)
        assert np.array_equal(overlay, full), (name, action)
    assert set(np.unique(overlay)) == {0, 1, 300}
    _error(server.get(f"/api/sessions/{sid}/labelmap.raw", params={"start": "0,0", "shape": "1,1,1"}),
           422, "field 'start'")
    _error(server.get(f"/api/sessions/{sid}/labelmap.raw", params={"start": "40,0,0", "shape": "9,1,1"}),
           422, "field 'shape'", "leaves the volume")
    _error(server.get(f"/api/sessions/{sid}/labelmap.raw", params={"start": "0,0,0", "shape": "0,1,1"}),
           422, "field 'shape'")
    server.delete(f"/api/sessions/{sid}")
