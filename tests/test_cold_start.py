"""Cold-start costs of loading a model: no torch._dynamo/sympy import, memory-mapped checkpoints, no model built
per preset when the preset is known, and nothing heavy imported for `fastsam3d --help`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsam3d_cli.model import PRESETS, build_model, get_config
from fastsam3d_cli.model import checkpoint as checkpoint_module
from fastsam3d_cli.model.checkpoint import load_model, load_payload, meta_model, save_checkpoint
from fastsam3d_cli.model.sam3d import Sam3D
from infer_phantoms import make_tiny_checkpoint

HEAVY_FOR_LOADING = ("torch._dynamo", "sympy")


def _fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_meta_model_has_the_plain_meta_models_keys_shapes_and_dtypes(preset):
    with torch.device("meta"):
        plain = Sam3D(get_config(preset))
    fast = meta_model(get_config(preset))
    expect = {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in plain.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in fast.state_dict().items()} == expect
    assert all(v.device.type == "meta" for v in fast.state_dict().values())


def test_meta_build_leaves_real_tensors_and_random_init_elsewhere_alone():
    torch.manual_seed(0)
    real = build_model("fastsam3d-tiny")  # outside meta_model: initialised as always
    torch.manual_seed(0)
    again = build_model("fastsam3d-tiny")
    meta_model(get_config("fastsam3d-tiny"))
    weight = real.prompt_encoder.point_embeddings[0].weight
    assert weight.abs().sum() > 0 and torch.equal(weight, again.prompt_encoder.point_embeddings[0].weight)


def test_loading_a_checkpoint_imports_neither_dynamo_nor_sympy(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny.pth")
    out = _fresh_python(
        "import sys\n"
        "from fastsam3d_cli.weights.loading import load_inference_model\n"
        f"load_inference_model(None, {str(path)!r}, 'cpu')\n"
        f"print(','.join(m for m in {HEAVY_FOR_LOADING!r} if m in sys.modules))\n")
    assert out == "", f"imported while loading: {out}"


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_checkpoints_are_memory_mapped_and_legacy_files_still_load(tmp_path):
    state = {k: v for k, v in build_model("fastsam3d-tiny").state_dict().items()}
    save_checkpoint(tmp_path / "zip.pth", state)
    torch.save({"model_state_dict": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    mapped = load_payload(tmp_path / "zip.pth")["model_state_dict"]
    legacy = load_payload(tmp_path / "legacy.pth")["model_state_dict"]
    maps = _mapped_files()
    assert str(tmp_path / "zip.pth") in maps and str(tmp_path / "legacy.pth") not in maps
    for loaded in (mapped, legacy):
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_mapped_model_computes_what_a_copied_one_does_and_never_writes_the_file(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny.pth")
    before = path.read_bytes()
    legacy = tmp_path / "legacy.pth"  # the same weights in the format that cannot be mapped: read as a copy
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    model, _ = load_model(path, "fastsam3d-tiny")
    copied, _ = load_model(legacy, "fastsam3d-tiny")
    volume = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.encode(volume), copied.encode(volume))
        for parameter in model.parameters():  # in-place change of mapped weights: private copy-on-write pages
            parameter.add_(1.0)
    assert path.read_bytes() == before


def test_a_known_preset_builds_one_model_not_one_per_preset(tmp_path, monkeypatch):
    path = make_tiny_checkpoint(tmp_path / "tiny.pth")
    built: list[str] = []
    real = checkpoint_module.meta_model
    monkeypatch.setattr(checkpoint_module, "meta_model", lambda config: built.append(config.name) or real(config))
    checkpoint_module.expected_shapes.cache_clear()
    try:
        load_model(path, "fastsam3d-tiny")
        assert built == ["fastsam3d-tiny"]
        built.clear()
        checkpoint_module.expected_shapes.cache_clear()
        _, info = load_model(path)  # no preset: matched against the presets, as before
        assert info.preset == "fastsam3d-tiny" and "fastsam3d-tiny" in built
    finally:
        checkpoint_module.expected_shapes.cache_clear()


def test_help_imports_no_numeric_library():
    out = _fresh_python(
        "import sys\n"
        "from fastsam3d_cli.cli import app\n"
        "print(','.join(m for m in ('torch', 'numpy', 'SimpleITK', 'nibabel', 'matplotlib', 'requests') "
        "if m in sys.modules))\n")
    assert out == "", f"imported for --help: {out}"


def test_verified_cached_weights_are_hashed_once_per_load(tmp_path, monkeypatch):
    """resolve_weights hashes the cached file to verify it; the loader reuses that digest instead of hashing the
    file again, unless the file changed since."""
    from fastsam3d_cli.weights import cache, loading

    monkeypatch.setenv(cache.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setattr(cache, "check_is_checkpoint", lambda *args, **kwargs: None)  # any bytes will do here
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(b"weights" * 1000)
    cache.import_file("fastsam3d", source)
    hashed: list[Path] = []
    real_cache_hash, real_loading_hash = cache.sha256_file, loading.sha256_of
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(Path(p)) or real_cache_hash(p))
    monkeypatch.setattr(loading, "sha256_of", lambda p: hashed.append(Path(p)) or real_loading_hash(p))
    path = cache.resolve_weights("fastsam3d", offline=True)
    assert loading.sha256_cached(path) == real_cache_hash(source)
    assert hashed == [path]  # the verification only

    path.write_bytes(b"changed")  # another size: the remembered digest no longer applies
    hashed.clear()
    assert loading.sha256_cached(path) == real_cache_hash(path) and hashed == [path]


def test_nibabel_is_preloaded_without_pydicom_and_pydicom_still_imports_after():
    pytest.importorskip("pydicom")
    out = _fresh_python(
        "import sys\n"
        "from fastsam3d_cli.imaging import preload_nibabel\n"
        "preload_nibabel()\n"
        "print('nibabel' in sys.modules, 'pydicom' in sys.modules)\n"
        "import nibabel, numpy as np, pydicom\n"
        "image = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))\n"
        "print(image.shape, hasattr(pydicom, 'dcmread'))\n")
    assert out.splitlines() == ["True False", "(2, 2, 2) True"]


def test_a_file_hashed_in_the_background_is_not_read_again(tmp_path, monkeypatch):
    from fastsam3d_cli.weights import cache

    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 3_000_000)
    expected = cache._hash_file(path)
    reads: list[Path] = []
    real = cache._hash_file
    monkeypatch.setattr(cache, "_hash_file", lambda p: reads.append(Path(p)) or real(p))
    cache.start_hashing(path)
    assert cache.sha256_file(path) == expected and reads == [path]  # the background thread's read only
    assert cache.sha256_file(path) == expected and reads == [path, path]  # used once; later calls hash again


def test_a_file_changed_while_hashed_in_the_background_is_hashed_again(tmp_path):
    from fastsam3d_cli.weights import cache

    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 1000)
    cache.start_hashing(path)
    path.write_bytes(b"y" * 2000)  # another size: the background digest no longer applies
    assert cache.sha256_file(path) == cache._hash_file(path)
    cache.start_hashing(tmp_path / "missing.pth")  # nothing to hash: ignored
    assert cache.take_prehashed(tmp_path / "missing.pth") is None


def test_the_checkpoint_the_cli_will_load_is_hashed_once_while_torch_imports(tmp_path, monkeypatch):
    from fastsam3d_cli.weights import cache, loading

    path = make_tiny_checkpoint(tmp_path / "tiny.pth")
    reads: list[Path] = []
    real_cache, real_loading = cache._hash_file, loading.sha256_of
    monkeypatch.setattr(cache, "_hash_file", lambda p: reads.append(Path(p)) or real_cache(p))
    monkeypatch.setattr(loading, "sha256_of", lambda p: reads.append(Path(p)) or real_loading(p))
    loading._SHA_CACHE.clear()
    loading.start_hashing_weights(None, path)
    loaded = loading.load_inference_model(None, path, "cpu")
    assert loaded.checkpoint_sha256 == real_cache(path) and reads == [path]
    loading.start_hashing_weights("no-such-model", None)  # left to the load to report: no error here


# ------------------------------------------------------------------------------------------ ending the process
EXIT_CHILD = """
import atexit, sys, threading, time
from fastsam3d_cli.cli.process_exit import exit_now
atexit.register(lambda: print("atexit ran", flush=True))
def late():
    time.sleep(0.2)
    print("thread finished")
threading.Thread(target=late).start()
print("buffered output", end="")
sys.stderr.write("stderr line\\n")
exit_now({code!r})
"""


@pytest.mark.parametrize("code, status", [(None, 0), (3, 3), (130, 130), (True, 1), ("a message", 1)])
def test_exit_now_keeps_what_the_normal_exit_does_outside_the_process(code, status):
    """Streams flushed, non-daemon threads joined, atexit handlers run, and the status Python would give —
    only the interpreter's teardown is skipped (cli/process_exit.py)."""
    result = subprocess.run([sys.executable, "-c", EXIT_CHILD.format(code=code)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == status
    assert result.stdout.splitlines() == ["buffered outputthread finished", "atexit ran"]
    assert result.stderr.splitlines()[0] == "stderr line"
    if isinstance(code, str):
        assert result.stderr.splitlines()[1:] == [code]


def test_the_cli_exits_through_exit_now_with_its_exit_code(tmp_path):
    """A usage error (2) and a bad input (3) keep their codes and their one stderr line."""
    bad = subprocess.run([sys.executable, "-m", "fastsam3d_cli", "infer", str(tmp_path / "missing.nii.gz"), "-c",
                          str(tmp_path / "c.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3 and bad.stderr.count("fastsam3d: error:") == 1
    usage = subprocess.run([sys.executable, "-m", "fastsam3d_cli", "infer", "--max-crops", "0"], capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.count("fastsam3d: error:") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("size, slice_bytes", [(0, None), (5, None), ((8 << 20) - 1, None),
                                               ((8 << 20) + 12_345, None), ((8 << 20) + 12_345, 1 << 20)])
def test_sha256_file_matches_hashlib_below_and_above_the_mapped_size(tmp_path, monkeypatch, size, slice_bytes):
    """Files from 8 MiB are hashed through a map in slices (the last one partial): the same digest."""
    import hashlib

    from fastsam3d_cli.imaging import digest

    if slice_bytes is not None:
        monkeypatch.setattr(digest, "MAPPED_SLICE_BYTES", slice_bytes)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert digest.sha256_file(path) == hashlib.sha256(data).hexdigest()
