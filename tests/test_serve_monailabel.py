"""MONAI Label routes, driven by a faithful replay of the requests MONAI Label's own client sends
(`monailabel/client/client.py`; the package itself does not install without its heavy dependencies):

* `info()`: `GET /info/` with http.client;
* `create_session(image_in)`: `requests.put(url + "/session/", files=[("files", (name, fh))],
  data={"client_id": None})`;
* `get_session(id)`: `GET /session/{id}`;
* `infer(model, image, params, session_id=...)`: `POST /infer/{model}?image=..&session_id=..` with its hand-made
  multipart body (boundary `----------lImIt_of_THE_fIle_eW_$`, a `params` field holding JSON with
  `client_id` added, a `file` part only without a session), and the answer read as a multipart form: the
  `params` field and one file.
"""
from __future__ import annotations

import http.client
import json
import warnings
from pathlib import Path
from urllib.parse import quote_plus, urlparse

import nibabel as nib
import numpy as np
import pytest
import requests

from fastsam3d_cli.serve.app import ServeConfig, decode_mask
from fastsam3d_cli.serve.server import BackgroundServer
from fastsam3d_cli.weights.loading import load_inference_model
from infer_phantoms import make_tiny_checkpoint, phantom, write

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = "----------lImIt_of_THE_fIle_eW_$"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("monailabel")
    loaded = load_inference_model(checkpoint=make_tiny_checkpoint(base / "tiny.pth"), device="cpu")
    image, _ = phantom()
    write(image, base / "root" / "v.nii.gz")
    with BackgroundServer(ServeConfig(loaded, root=base / "root", max_crops=1)) as url:
        yield url, base / "root" / "v.nii.gz"


# ------------------------------------------------------------------------------- the client's requests
def _http(method: str, url: str, selector: str, body: bytes | None = None, headers: dict | None = None):
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    connection.request(method, selector, body=body, headers=headers or {})
    response = connection.getresponse()
    return response


def _encode_multipart(fields: dict, files: dict) -> tuple[str, bytes]:
    lines: list = []
    for key, value in fields.items():
        lines += ["--" + LIMIT, f'Content-Disposition: form-data; name="{key}"', "", value]
    for key, (filename, data) in files.items():
        lines += ["--" + LIMIT, f'Content-Disposition: form-data; name="{key}"; filename="{filename}"',
                  "Content-Type: application/octet-stream", "", data]
    lines += ["--" + LIMIT + "--", ""]
    body = bytearray()
    for line in lines:
        body.extend(line if isinstance(line, bytes) else line.encode("utf-8"))
        body.extend(b"\r\n")
    return f"multipart/form-data; boundary={LIMIT}", bytes(body)


def _parse_multipart(response) -> tuple[dict, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import cgi

        storage = cgi.FieldStorage(fp=response.fp, environ={"REQUEST_METHOD": "POST"}, headers=response.msg,
                                   keep_blank_values=True)
    form, files = {}, {}
    for item in storage.list:
        if item.filename:
            files[item.filename] = item.value
        else:
            form[item.name] = item.value
    return form, files


def client_info(url: str) -> dict:
    response = _http("GET", url, "/info/")
    assert response.status == 200
    return json.loads(response.read().decode())


def client_create_session(url: str, image: Path) -> dict:
    with open(image, "rb") as handle:
        response = requests.put(url.rstrip("/") + "/session/", files=[("files", (image.name, handle))],
                                data={"client_id": None}, timeout=120)
    assert response.status_code == 200, response.text
    return json.loads(response.text)


def client_get_session(url: str, session_id: str):
    return _http("GET", url, f"/session/{quote_plus(session_id)}")


def client_infer(url: str, model: str, image: str, params: dict, session_id: str | None = None,
                 file: Path | None = None):
    selector = f"/infer/{quote_plus(model)}?image={quote_plus(image)}"
    if session_id:
        selector += f"&session_id={quote_plus(session_id)}"
    params = {**params, "client_id": None}
    fields = {"params": json.dumps(params)}
    files = {"file": (file.name, file.read_bytes())} if file and not session_id else {}
    content_type, body = _encode_multipart(fields, files)
    response = _http("POST", url, selector, body, {"content-type": content_type, "content-length": str(len(body))})
    if response.status != 200:
        return response.status, json.loads(response.read().decode()), None
    form, result_files = _parse_multipart(response)
    return 200, json.loads(form["params"]), result_files


def _mask_of(data: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "result.nii.gz"
    path.write_bytes(data)
    return np.asarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------------------------ tests
def test_info_session_and_infer_as_3d_slicer_drives_them(served, tmp_path):
    url, volume = served
    info = client_info(url)
    (model, spec), = info["models"].items()
    assert model == "fastsam3d-tiny" and spec["type"] == "deepgrow" and spec["dimension"] == 3

    session = client_create_session(url, volume)
    sid = session["session_id"]
    assert session["session_info"]["size"] == [48, 40, 32]
    response = client_get_session(url, sid)
    assert response.status == 200 and json.loads(response.read())["session_id"] == sid

    status, params, files = client_infer(url, model, "v", {"label": "liver", "foreground": [[24, 20, 16]],
                                                           "background": []}, session_id=sid)
    assert status == 200 and params["label_names"] == {"liver": 1} and params["fastsam3d"]["clicks"] == 1
    (name, data), = files.items()
    first = _mask_of(data, tmp_path)
    assert name == "result.nii.gz" and first.dtype == np.uint8 and set(np.unique(first)) <= {0, 1} and first.any()

    # Slicer sends all points each time: the known one is kept, the new background point is appended
    status, params, files = client_infer(url, model, "v", {"label": "liver", "foreground": [[24, 20, 16]],
                                                           "background": [[25, 20, 16]]}, session_id=sid)
    assert status == 200 and params["fastsam3d"]["clicks"] == 2
    assert params["fastsam3d"]["timing_ms"]["mode"] == "incremental"  # one new point, same crop: one step
    second = _mask_of(next(iter(files.values())), tmp_path)
    status, params, files = client_infer(url, model, "v", {"label": "liver", "foreground": [[24, 20, 16]],
                                                           "background": [[25, 20, 16]]}, session_id=sid)
    assert params["fastsam3d"]["timing_ms"]["mode"] == "unchanged" and params["fastsam3d"]["clicks"] == 2
    assert np.array_equal(_mask_of(next(iter(files.values())), tmp_path), second)  # the same points again

    # the same clicks through the JSON API give the same mask
    api = requests.post(f"{url}/api/sessions", json={"path": "v.nii.gz"}, timeout=120).json()["id"]
    requests.post(f"{url}/api/sessions/{api}/objects", json={"name": "liver"}, timeout=60)
    requests.post(f"{url}/api/sessions/{api}/objects/liver/clicks", json={"point": [24, 20, 16]}, timeout=120)
    requests.post(f"{url}/api/sessions/{api}/objects/liver/clicks", json={"point": [25, 20, 16], "include": False},
                  timeout=120)
    mask = requests.get(f"{url}/api/sessions/{api}/objects/liver/mask", timeout=60)
    assert np.array_equal(decode_mask(mask.content, mask.headers), second.astype(bool))
    requests.delete(f"{url}/api/sessions/{api}", timeout=30)

    assert requests.delete(f"{url}/session/{sid}", timeout=30).status_code == 200
    gone = client_get_session(url, sid)
    assert gone.status == 410 and sid in json.loads(gone.read())["error"]


def test_infer_without_a_session_uses_the_sent_file_or_a_volume_under_root(served, tmp_path):
    url, volume = served
    params = {"label": "organ", "foreground": [[24, 20, 16]], "background": []}
    before = requests.get(f"{url}/api/sessions", timeout=30).json()["sessions"]
    status, _, files = client_infer(url, "fastsam3d-tiny", "v", params, file=volume)
    by_file = _mask_of(next(iter(files.values())), tmp_path)
    status2, _, files2 = client_infer(url, "fastsam3d-tiny", "v.nii.gz", params)
    assert status == status2 == 200
    assert np.array_equal(by_file, _mask_of(next(iter(files2.values())), tmp_path))
    assert requests.get(f"{url}/api/sessions", timeout=30).json()["sessions"] == before  # one-off: none kept


@pytest.mark.parametrize("params, status, fragment", [
    ({"label": "x", "foreground": [[24, 20]]}, 422, "'foreground'"),
    ({"label": "x", "foreground": [[99, 20, 16]]}, 400, "outside the volume"),
    ({"label": "x", "foreground": [], "background": [[1, 2, 3]]}, 422, "foreground point"),
    ({"label": "x", "foreground": [[24, 20, 16]], "result_extension": ".exe"}, 422, "'result_extension'"),
])
def test_bad_infer_requests_are_4xx_one_liners(served, params, status, fragment):
    url, _ = served
    got, body, _ = client_infer(url, "fastsam3d-tiny", "v.nii.gz", params)
    assert got == status and fragment in body["error"] and "\n" not in body["error"]


def test_unknown_model_path_and_session_are_refused(served):
    url, _ = served
    got, body, _ = client_infer(url, "deepedit", "v.nii.gz", {"foreground": [[1, 1, 1]]})
    assert got == 404 and "fastsam3d-tiny" in body["error"]
    got, body, _ = client_infer(url, "fastsam3d-tiny", "../secret.nii.gz", {"foreground": [[1, 1, 1]]})
    assert got == 403
    response = client_get_session(url, "nosuchsession")
    assert response.status == 404 and "nosuchsession" in json.loads(response.read())["error"]


def test_multipart_parser_round_trips_binary_parts_and_refuses_broken_bodies():
    from fastsam3d_cli.serve.errors import ApiError
    from fastsam3d_cli.serve.multipart import build_form, parse_form

    data = b"\r\n--\x00\xff" * 1000 + b"\r\n"
    content_type, body = build_form({"params": '{"label": "x"}'}, {"file": ("a b.nii.gz", data, "application/gzip")})
    parts = parse_form(content_type, b"preamble\r\n" + body)
    assert [(p.name, p.filename, p.data) for p in parts] == [("params", None, b'{"label": "x"}'),
                                                              ("file", "a b.nii.gz", data)]
    for bad_type, bad_body, fragment in [("application/json", body, "multipart/form-data"),
                                         ("multipart/form-data", body, "boundary"),
                                         (content_type, b"no delimiter", "could not be parsed"),
                                         (content_type, body[: len(body) // 2], "not terminated")]:
        with pytest.raises(ApiError, match=fragment) as caught:
            parse_form(bad_type, bad_body)
        assert caught.value.status == 400
