"""The bundled model: export (float16 + manifest), `weights list/verify/path/bundle`, its sha256 check, and the
default model resolution (published `fastsam3d` if cached, else downloaded, else — offline or unreachable —
the bundled one with one note on stderr; never for a model named explicitly).

A small stand-in model is built here (64³ crops, 48-channel decoder) and bundled into a temporary folder that
`bundled.BUNDLED_DIR` points to; no test touches the network (refused ports, a local 404 server, a faked
DNS failure).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill_builders import small_config
from fastsam3d_cli.cli import app
from fastsam3d_cli.errors import UsageError, WeightsError
from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import expected_shapes, load_model, save_checkpoint
from fastsam3d_cli.weights import bundled
from fastsam3d_cli.weights import cache as weights
from fastsam3d_cli.weights.loading import load_inference_model, resolve_model_source
from infer_phantoms import phantom, write
from micro_weights import micro_checkpoint_bytes, use_micro_preset

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
STAND_IN = small_config("test-bundled", 24, 2, img_size=64)
OBJECT = {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}
runner = CliRunner()


def _training_checkpoint(path: Path, config=STAND_IN, seed: int = 0) -> Path:
    """What `fastsam3d train` writes: weights + optimizer state, counters, arguments, config."""
    torch.manual_seed(seed)
    model = build_model(config)
    save_checkpoint(path, model.state_dict(), config=config.to_dict(), preset=config.name, epoch=4,
                    global_step=1234, args={"seed": 2023, "lr": 8e-4, "epochs": 5}, task="train",
                    saved_at="2026-12-03T10:00:00+00:00", optimizer_state_dict={"state": {}, "param_groups": []})
    return path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A bundled folder made once from the stand-in's training checkpoint."""
    root = tmp_path_factory.mktemp("bundle")
    checkpoint = _training_checkpoint(root / "best.pth")
    bundled.export_bundled(checkpoint, name="test-bundled-model", output_dir=root / "bundled",
                           commands=["fastsam3d train prepared -o runs/x --seed 2023"], cpu_hours=1.5)
    return root / "bundled"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty cache, online, short timeouts, no URL overrides, no bundled model unless a test installs one."""
    for key in list(__import__("os").environ):
        if key.startswith(weights.URL_ENV_PREFIX) or key in {weights.OFFLINE_ENV, weights.TIMEOUT_ENV}:
            monkeypatch.delenv(key)
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(weights.TIMEOUT_ENV, "2")
    monkeypatch.setattr(bundled, "BUNDLED_DIR", tmp_path / "no-bundle")
    return tmp_path / "home"


@pytest.fixture
def installed(home, shipped, tmp_path, monkeypatch) -> bundled.BundledModel:
    """The stand-in installed as this copy's bundled model (a private copy: tests may damage it)."""
    folder = tmp_path / "pkg-bundled"
    shutil.copytree(shipped, folder)
    monkeypatch.setattr(bundled, "BUNDLED_DIR", folder)
    model = bundled.installed()
    assert model is not None
    return model


@pytest.fixture
def case(tmp_path) -> Path:
    image, _ = phantom(spacing=(2.0, 2.0, 3.0))
    write(image, tmp_path / "v.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"space": "ijk", "objects": [OBJECT]}))
    return tmp_path


def _cli(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={**CLI_ENV, **(env or {})})


def _one_error_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastsam3d: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _refused_url() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/FastSAM3D.pth"


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- export: float16, official layout, manifest --------------------------------------------------


def test_float16_export_of_fastsam3d_tiny_loads_into_the_preset_and_runs(tmp_path):
    torch.manual_seed(1)
    model = build_model("fastsam3d-tiny")
    source = tmp_path / "best.pth"
    save_checkpoint(source, model.state_dict(), config=model.config.to_dict(), preset="fastsam3d-tiny",
                    global_step=77, epoch=2, args={"seed": 11})
    result = bundled.export_bundled(source, output_dir=tmp_path / "out", commands=["a", "b"], cpu_hours=2.25,
                                    notes="stand-in", provenance={"data": {"mix": {"synthetic": 0.5}}})
    weights_file = tmp_path / "out" / "fastsam3d-bundled.pt"
    assert result.path == weights_file and result.preset == "fastsam3d-tiny"
    assert weights_file.stat().st_size <= bundled.MAX_BYTES  # 15.2 M parameters × 2 bytes
    payload = torch.load(weights_file, map_location="cpu", weights_only=True)  # no allow-list needed
    state = payload["model_state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes("fastsam3d-tiny")  # official keys
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert manifest["size_bytes"] == weights_file.stat().st_size and manifest["dtype"] == "float16"
    assert manifest["config"] == model.config.to_dict() and manifest["name"] == "fastsam3d-bundled"
    provenance = manifest["provenance"]
    assert (provenance["steps"], provenance["epochs"], provenance["seed"]) == (77, 2, 11)
    assert provenance["commands"] == ["a", "b"] and provenance["cpu_hours"] == 2.25
    assert provenance["data"] == {"mix": {"synthetic": 0.5}} and provenance["notes"] == "stand-in"
    assert provenance["source_checkpoint"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    loaded, info = load_model(weights_file, preset="fastsam3d-tiny", device="cpu", attention="exact")
    assert info.preset == "fastsam3d-tiny"
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    points, labels = torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        low_ref, _ = model.eval().decode(model.encode(image), points, labels, None)
        low_half, _ = loaded.decode(loaded.encode(image), points, labels, None)
    assert torch.isfinite(low_half).all()
    error = (low_half - low_ref).abs().max() / low_ref.abs().max()
    assert error < 2e-2, float(error)  # float16 rounding of the weights only


def test_export_refuses_weights_beyond_float16_range(tmp_path):
    model = build_model(STAND_IN)
    state = model.state_dict()
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] * 0 + 1e6
    save_checkpoint(tmp_path / "big.pth", state, config=STAND_IN.to_dict())
    with pytest.raises(WeightsError, match="beyond float16's range"):
        bundled.export_bundled(tmp_path / "big.pth", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bundle_writes_weights_and_manifest(home, tmp_path):
    source = _training_checkpoint(tmp_path / "best.pth")
    (tmp_path / "prov.json").write_text(json.dumps({"seeds": [1, 2]}))
    result = _cli("weights", "bundle", str(source), "--name", "my-model", "--output-dir", str(tmp_path / "out"),
                  "--command", "fastsam3d prepare x", "--command", "fastsam3d train y", "--cpu-hours", "3",
                  "--provenance", str(tmp_path / "prov.json"), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["name"] == "my-model" and data["preset"] == "test-bundled"
    assert data["provenance"]["commands"] == ["fastsam3d prepare x", "fastsam3d train y"]
    assert data["provenance"]["seeds"] == [1, 2] and data["provenance"]["steps"] == 1234
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "my-model.pt"]
    inline = _cli("weights", "bundle", str(source), "--name", "my-model", "--output-dir", str(tmp_path / "out"),
                  "--provenance", '{"stages": [{"stage": 2}]}', "--overwrite", "--json")
    assert inline.exit_code == 0, inline.stderr
    assert json.loads(inline.stdout)["provenance"]["stages"] == [{"stage": 2}]


@pytest.mark.parametrize("args, code, fragments", [
    (["--name", "Bad Name"], 2, ["not a valid bundled model name"]),
    (["--name", "fastsam3d"], 2, ["already a model name"]),
    (["--name", "bundled"], 2, ["already a model name"]),
    (["--cpu-hours", "-1"], 2, ["--cpu-hours -1.0 is invalid"]),
    (["--provenance", "MISSING"], 3, ["is not a readable JSON file"]),
    (["--provenance", "LIST"], 3, ["holds a JSON list, not an object"]),
    (["--provenance", '{"seeds": [1,'], 3, ["--provenance (inline JSON) is not valid JSON"]),
])
def test_cli_bundle_bad_options_write_nothing(home, tmp_path, args, code, fragments):
    source = _training_checkpoint(tmp_path / "best.pth")
    (tmp_path / "list.json").write_text("[1, 2]")
    args = [str(tmp_path / "nope.json") if a == "MISSING" else str(tmp_path / "list.json") if a == "LIST" else a
            for a in args]
    result = _cli("weights", "bundle", str(source), "--output-dir", str(tmp_path / "out"), *args)
    _one_error_line(result, code, *fragments)
    assert not (tmp_path / "out").exists()


def test_cli_bundle_of_a_bad_checkpoint_is_exit_4(home, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _one_error_line(_cli("weights", "bundle", str(tmp_path / "junk.pth"), "--output-dir", str(tmp_path / "out")),
                    4, "not a readable PyTorch checkpoint")
    encoder_only = {k[len("image_encoder."):]: v for k, v in build_model(STAND_IN).state_dict().items()
                    if k.startswith("image_encoder.")}
    torch.save(encoder_only, tmp_path / "enc.pth")
    _one_error_line(_cli("weights", "bundle", str(tmp_path / "enc.pth"), "--output-dir", str(tmp_path / "out")),
                    4, "only an image encoder")
    assert not (tmp_path / "out").exists()


def test_cli_bundle_over_the_size_limit_is_refused_and_leaves_nothing(home, tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "MAX_BYTES", 1000)
    source = _training_checkpoint(tmp_path / "best.pth")
    result = _cli("weights", "bundle", str(source), "--output-dir", str(tmp_path / "out"))
    _one_error_line(result, 3, "over the 0 MB a bundled model may take", "smaller model")
    assert not (tmp_path / "out").exists()


def test_cli_bundle_does_not_replace_a_bundled_model_without_overwrite(home, shipped, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(shipped, folder)
    before = _files(folder)
    source = _training_checkpoint(tmp_path / "best.pth", seed=5)
    _one_error_line(_cli("weights", "bundle", str(source), "--output-dir", str(folder)), 3,
                    "already exists", "--overwrite")
    assert _files(folder) == before
    result = _cli("weights", "bundle", str(source), "--name", "next-model", "--output-dir", str(folder),
                  "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert sorted(_files(folder)) == ["manifest.json", "next-model.pt"]  # the old weights file is gone
    assert bundled.installed(folder).name == "next-model"


# --- listing and checking -------------------------------------------------------------------------


def test_list_shows_the_bundled_model_with_sha256_and_size(installed):
    result = _cli("weights", "list", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["bundled"]
    assert row["name"] == "test-bundled-model" and row["verified"] is True
    assert row["sha256"] == hashlib.sha256(installed.path.read_bytes()).hexdigest() == row["file_sha256"]
    assert row["size_bytes"] == installed.path.stat().st_size
    assert row["provenance"]["cpu_hours"] == 1.5
    table = _cli("weights", "list")
    assert table.exit_code == 0 and installed.sha256 in table.stdout and "test-bundled-model" in table.stdout


def test_list_without_a_bundled_model_says_so(home):
    result = _cli("weights", "list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["bundled"] is None
    assert "none shipped" in _cli("weights", "list").stdout


def test_path_and_verify_of_the_bundled_model(installed):
    result = _cli("weights", "path", "bundled")
    assert result.exit_code == 0 and result.stdout.strip() == str(installed.path)
    result = _cli("weights", "verify", "bundled", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True


def test_corrupted_bundled_file_is_exit_4_naming_reinstall_everywhere(installed, case):
    _corrupt(installed.path)
    for args in (["weights", "list"], ["weights", "list", "--json"], ["weights", "verify"],
                 ["weights", "path", "bundled"]):
        line = _one_error_line_allowing_stdout(_cli(*args), 4)
        assert "fails its sha256 check" in line and "reinstall fastsam3d-cli" in line, args
    before = _files(case)
    for args in (["--model", "bundled"], ["--model", "test-bundled-model"], ["--offline"]):  # last: fallback
        result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), *args)
        _one_error_line(result, 4, "fails its sha256 check", "reinstall")
        assert _files(case) == before


def _one_error_line_allowing_stdout(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsam3d: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["manifest", "missing-file"])
def test_damaged_bundled_installation_is_exit_4_naming_reinstall(installed, case, damage):
    if damage == "manifest":
        bundled.manifest_path().write_text("{not json")
    else:
        installed.path.unlink()
    line = _one_error_line_allowing_stdout(_cli("weights", "list"), 4)
    assert "reinstall fastsam3d-cli" in line
    _one_error_line(_cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--model",
                         "bundled"), 4, "reinstall")


# --- default model resolution ---------------------------------------------------------------------


def test_no_bundled_model_offline_default_stays_exit_4(home, case):
    before = _files(case)
    result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--offline")
    _one_error_line(result, 4, "weights 'fastsam3d' are not in the cache", "offline mode is on",
                    "fastsam3d weights download fastsam3d")
    assert _files(case) == before
    _one_error_line(_cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--model",
                         "bundled"), 4, "ships no bundled model")


@pytest.mark.parametrize("how", ["--offline", "env"])
def test_offline_default_runs_the_bundled_model_with_one_note(installed, case, how):
    args = ["--offline"] if how == "--offline" else []
    env = {"FASTSAM3D_OFFLINE": "1"} if how == "env" else {}
    result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--json", "--max-crops",
                  "1", *args, env=env)
    assert result.exit_code == 0, result.stderr
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("fastsam3d: note: using the bundled model 'test-bundled-model'")
    assert "offline mode is on" in notes[0] and "fastsam3d weights download fastsam3d" in notes[0]
    sidecar = json.loads(result.stdout)
    assert sidecar == json.loads((case / "v_mask.json").read_text())
    model = sidecar["model"]
    assert model["weights_name"] == "test-bundled-model" and model["preset"] == "test-bundled"
    assert model["checkpoint_sha256"] == installed.sha256 and model["checkpoint"] == str(installed.path)
    assert model["fallback"] == {"instead_of": "fastsam3d", "reason": "offline mode is on"}


def test_unreachable_network_falls_back_to_the_bundled_model(installed, monkeypatch):
    monkeypatch.setenv(weights.url_env_var("fastsam3d"), _refused_url())
    notes: list[str] = []
    loaded = load_inference_model(device="cpu", notify=notes.append)
    assert loaded.weights_name == "test-bundled-model" and loaded.checkpoint_sha256 == installed.sha256
    assert loaded.fallback["instead_of"] == "fastsam3d" and "refused" in loaded.fallback["reason"]
    assert len(notes) == 1 and "refused" in notes[0]
    assert not (weights.cache_dir() / "FastSAM3D.pth").exists()


def test_dns_failure_and_timeout_fall_back_too(installed, monkeypatch):
    import requests

    def no_dns(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure in name "
                                       "resolution)")

    monkeypatch.setattr(requests.Session, "get", no_dns)
    source = resolve_model_source()
    assert source.weights_name == "test-bundled-model" and "cannot reach huggingface.co" in source.fallback["reason"]

    def too_slow(*args, **kwargs):
        raise requests.ConnectTimeout("connect timed out")

    monkeypatch.setattr(requests.Session, "get", too_slow)
    source = resolve_model_source()
    assert source.weights_name == "test-bundled-model" and "no connection to" in source.fallback["reason"]


def test_unreachable_without_a_bundled_model_is_the_download_error(home, monkeypatch):
    monkeypatch.setenv(weights.url_env_var("fastsam3d"), _refused_url())
    with pytest.raises(weights.UnreachableWeightsError, match="refused"):
        resolve_model_source()


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_reachable_server_that_fails_is_never_replaced_by_the_bundled_model(installed, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(weights.url_env_var("fastsam3d"), f"http://127.0.0.1:{server.server_address[1]}/x.pth")
        with pytest.raises(WeightsError, match="HTTP 404") as info:
            resolve_model_source()
        assert not isinstance(info.value, weights.UnreachableWeightsError)
    finally:
        server.shutdown()
        server.server_close()


def test_explicit_published_model_offline_is_still_exit_4(installed, case):
    before = _files(case)
    result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--model", "fastsam3d",
                  "--offline")
    _one_error_line(result, 4, "weights 'fastsam3d' are not in the cache", "offline mode is on")
    assert _files(case) == before


def test_cached_published_model_is_the_default_even_offline(installed, tmp_path, monkeypatch):
    use_micro_preset(monkeypatch)  # 'fastsam3d' stands for a 1.7 MB model: import checks every key and shape
    fake = tmp_path / "FastSAM3D.pth"
    fake.write_bytes(micro_checkpoint_bytes())
    weights.import_file("fastsam3d", fake)
    source = resolve_model_source(offline=True)
    assert source.weights_name == "fastsam3d" and source.fallback is None and source.notice is None
    assert source.path == weights.cache_dir() / "FastSAM3D.pth"


def test_model_bundled_selects_it_explicitly_without_a_note(installed, case):
    result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--model", "bundled",
                  "--json", "--max-crops", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    model = json.loads(result.stdout)["model"]
    assert model["weights_name"] == "test-bundled-model" and model["fallback"] is None
    assert model["checkpoint_sha256"] == installed.sha256
    for name in ("test-bundled-model", "BUNDLED"):  # its own name too, any case
        source = resolve_model_source(name, offline=True)
        assert (source.path, source.weights_name, source.notice) == (installed.path, "test-bundled-model", None)


def test_model_bundled_with_a_checkpoint_is_a_usage_error(installed, case, tmp_path):
    before = _files(case)
    result = _cli("infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"), "--model", "bundled",
                  "--checkpoint", str(installed.path))
    _one_error_line(result, 2, "names the bundled weights")
    assert _files(case) == before


def test_predictor_default_falls_back_offline_with_a_note(installed, capsys):
    from fastsam3d_cli import Predictor

    predictor = Predictor.from_pretrained(device="cpu", offline=True)
    assert predictor.crop_size == 64  # the stand-in's crops
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "using the bundled model 'test-bundled-model'" in err[0]
    with pytest.raises(WeightsError, match="offline mode is on"):
        Predictor.from_pretrained("fastsam3d", device="cpu", offline=True)


def test_unknown_model_lists_bundled(home):
    with pytest.raises(UsageError, match="bundled"):
        resolve_model_source("no-such-model")


# --- what ships -------------------------------------------------------------------------------------


def test_package_data_includes_the_bundled_folder():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fastsam3d_cli.weights"]
    assert "bundled/*.pt" in patterns and "bundled/manifest.json" in patterns


SHIPPED_FOLDER = Path(bundled.__file__).resolve().parent / "bundled"


def test_shipped_bundled_model_matches_its_manifest_and_runs():
    assert bundled.manifest_path(SHIPPED_FOLDER).is_file(), "the package must ship its bundled model (issue 16)"
    model = bundled.installed(SHIPPED_FOLDER)
    path, digest = bundled.verified_path(model)
    assert digest == model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size == model.size_bytes <= bundled.MAX_BYTES
    loaded, info = load_model(path, device="cpu", attention="exact")
    assert info.preset == model.preset and model.provenance.get("commands")
    assert all(v.dtype == torch.float16 for v in torch.load(path, weights_only=True)["model_state_dict"].values()
               if v.is_floating_point())


def _noisy_phantom():
    """A bright ellipsoid in a dim body with Gaussian noise (σ 15 on a contrast of 180), RAS-stored,
    anisotropic voxels; returns (image, truth mask, ijk voxel at the object's centre)."""
    from fastsam3d_cli.imaging.volumes import array_ijk, image_from_array_ijk

    image, truth = phantom(shape=(72, 64, 48), spacing=(1.2, 1.2, 2.0), semi_axes_mm=(22.0, 18.0, 20.0))
    noise = np.random.default_rng(7).normal(0, 15, truth.shape).astype(np.float32)
    noisy = image_from_array_ijk(array_ijk(image, np.float32) + noise, reference=image)
    centre = [int(v) for v in np.argwhere(truth).mean(axis=0).round()]
    return noisy, truth, centre


def _dice(mask, truth) -> float:
    mask, truth = mask.astype(bool), truth.astype(bool)
    return float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))


def test_shipped_bundled_model_segments_a_noisy_phantom_from_one_click():
    """The shipped weights really segment: one include click at the centre, mask compared with the known
    geometry on the input grid (a flipped, shifted or empty mask fails)."""
    from fastsam3d_cli.interactive.predictor import Predictor

    image, truth, centre = _noisy_phantom()
    model, _ = load_model(bundled.installed(SHIPPED_FOLDER).path, device="cpu", attention="exact")
    predictor = Predictor(model)
    predictor.set_volume(image)
    mask = predictor.add_click(centre, include=True, space="ijk", object="o")
    assert _dice(mask, truth) >= 0.85


def test_shipped_bundled_model_is_the_offline_default_of_infer(tmp_path):
    """The README's promise: with no cached weights and no network, `infer` without --model runs the shipped
    model, says so in one line, records it in the sidecar and writes a mask that matches the object."""
    from fastsam3d_cli.imaging.volumes import array_ijk, read_image

    image, truth, centre = _noisy_phantom()
    volume = write(image, tmp_path / "phantom.nii.gz")
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"space": "ijk", "objects": [{"name": "blob", "label": 3, "points": [centre],
                                                               "point_labels": [1]}]}))
    result = _cli("infer", str(volume), "--clicks", str(clicks), "--json",
                  env={"FASTSAM3D_HOME": str(tmp_path / "home"), "FASTSAM3D_OFFLINE": "1"})
    assert result.exit_code == 0, result.stderr
    notes = result.stderr.strip().splitlines()
    shipped = bundled.installed(SHIPPED_FOLDER)
    assert len(notes) == 1 and f"using the bundled model '{shipped.name}'" in notes[0]
    model = json.loads(result.stdout)["model"]
    assert model["weights_name"] == shipped.name and model["checkpoint_sha256"] == shipped.sha256
    labels = array_ijk(read_image(tmp_path / "phantom_mask.nii.gz"))
    assert set(np.unique(labels)) == {0, 3}
    assert _dice(labels == 3, truth) >= 0.85



# --- validate and benchmark: `--model bundled` stands for the shipped file --------------------------


class _Captured(Exception):
    pass


def _capture(monkeypatch, module: str, function: str) -> dict:
    """Replace `module.function` by a spy that records its call and stops the command (exit 1)."""
    import importlib

    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Captured()

    monkeypatch.setattr(importlib.import_module(module), function, spy)
    return seen


def test_validate_model_bundled_scores_the_shipped_file(installed, tmp_path, monkeypatch):
    seen = _capture(monkeypatch, "fastsam3d_cli.training.validate", "validate")
    result = _cli("validate", str(tmp_path), "--model", "bundled")
    assert isinstance(result.exception, _Captured) or result.exit_code == 1, result.stderr
    assert seen["args"][1:] == (installed.path, None)  # the checked file; its own config decides the model


@pytest.mark.parametrize("args, code, text", [
    (["--model", "bundled", "--checkpoint", "x.pth"], 2, "has nothing to do"),
    ([], 2, "no checkpoint to validate"),
])
def test_validate_bad_model_and_checkpoint_combinations(installed, tmp_path, monkeypatch, args, code, text):
    _capture(monkeypatch, "fastsam3d_cli.training.validate", "validate")
    _one_error_line(_cli("validate", str(tmp_path), *args), code, text)


def test_validate_model_bundled_without_one_or_damaged_is_exit_4(home, shipped, tmp_path, monkeypatch):
    _capture(monkeypatch, "fastsam3d_cli.training.validate", "validate")
    _one_error_line(_cli("validate", str(tmp_path), "--model", "bundled"), 4, "ships no bundled model")
    folder = tmp_path / "pkg"
    shutil.copytree(shipped, folder)
    monkeypatch.setattr(bundled, "BUNDLED_DIR", folder)
    _corrupt(bundled.installed().path)
    _one_error_line(_cli("validate", str(tmp_path), "--model", "bundled"), 4, "reinstall")


def test_benchmark_model_bundled_times_the_shipped_file(installed, monkeypatch):
    seen = _capture(monkeypatch, "fastsam3d_cli.benchmark.speed", "run_benchmark")
    result = _cli("benchmark", "-m", "fastsam3d-tiny", "-m", "bundled", "--device", "cpu")
    assert isinstance(result.exception, _Captured) or result.exit_code == 1, result.stderr
    assert seen["kwargs"]["models"] == ["fastsam3d-tiny"] and seen["kwargs"]["checkpoints"] == [installed.path]
