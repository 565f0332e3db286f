"""Checkpoint loading for every official layout (built here from the key manifests), safety, diffs, saving."""
from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import pytest
import torch

from fastsam3d_cli.errors import ExitCode, WeightsError
from fastsam3d_cli.model import build_model
from fastsam3d_cli.model.checkpoint import (infer_preset, load_model, read_checkpoint, read_checkpoint_info,
                                            save_checkpoint)


def manifest_state_dict(golden_dir: Path, manifest: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict with the official keys/shapes; entry i is filled with the value i (stored as 1 element)."""
    entries = json.loads((golden_dir / manifest).read_text())
    return {prefix + key: torch.full((1,), float(i)).expand(shape) for i, (key, shape) in enumerate(entries)}


def assert_loaded_values(model: torch.nn.Module, source: dict[str, torch.Tensor], strip: str = "") -> None:
    """Every model tensor holds the value its key had in `source` (so nothing was mis-mapped)."""
    loaded = model.state_dict()
    for key, value in source.items():
        name = key[len(strip):] if strip and key.startswith(strip) else key
        assert torch.all(loaded[name] == value.flatten()[0]), name


def test_sam_med3d_turbo_layout(tmp_path, golden_dir):
    state = manifest_state_dict(golden_dir, "keys_sam_med3d.json")
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": state}, path)
    model, info = load_model(path)
    assert info.preset == "sam-med3d" and info.layout == "model_state_dict" and not info.encoder_only
    assert_loaded_values(model, state)


def test_fastsam3d_training_checkpoint_with_its_pickled_extras(tmp_path, golden_dir):
    state = manifest_state_dict(golden_dir, "keys_fastsam3d.json")
    payload = {
        "epoch": 99, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
        "lr_scheduler_state_dict": {"milestones": collections.Counter({60: 1, 90: 1})}, "losses": [0.5, 0.4],
        "dices": [0.6, 0.7], "best_loss": 0.4, "best_dice": 0.7,
        "args": argparse.Namespace(task_name="ft_b2", device=torch.device("cpu"), lr=8e-4),
        "used_datas": collections.Counter({"ct_amos": 3}),
    }
    path = tmp_path / "FastSAM3D.pth"
    torch.save(payload, path)
    model, info = load_model(path)
    assert info.preset == "fastsam3d" and info.layout == "training"
    assert "args" in info.extra_keys
    assert_loaded_values(model, state)


def test_encoder_only_distillation_output_needs_and_uses_a_decoder_checkpoint(tmp_path, golden_dir):
    full = manifest_state_dict(golden_dir, "keys_fastsam3d.json")
    encoder = {k[len("image_encoder."):]: v + 1000 for k, v in full.items() if k.startswith("image_encoder.")}
    encoder_path, full_path = tmp_path / "sam_model_loss_best.pth", tmp_path / "full.pth"
    torch.save({"epoch": 3, "model_state_dict": encoder}, encoder_path)
    torch.save({"model_state_dict": full}, full_path)

    _, info = read_checkpoint_info(encoder_path)
    assert info.encoder_only and info.preset == "fastsam3d"
    with pytest.raises(WeightsError, match="only an image encoder"):
        load_model(encoder_path)
    model, _ = load_model(encoder_path, decoder_checkpoint=full_path)
    assert_loaded_values(model, {f"image_encoder.{k}": v for k, v in encoder.items()})
    assert_loaded_values(model, {k: v for k, v in full.items() if not k.startswith("image_encoder.")})


def test_raw_state_dict_with_ddp_prefixes(tmp_path, golden_dir):
    state = manifest_state_dict(golden_dir, "keys_fastsam3d.json", prefix="module.")
    path = tmp_path / "ddp_raw.pth"
    torch.save(state, path)
    model, info = load_model(path, preset="fastsam3d")
    assert info.layout == "raw"
    assert_loaded_values(model, state, strip="module.")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "payload": Exploit()}, path)
    with pytest.raises(WeightsError, match="refusing to load") as caught:
        read_checkpoint(path)
    assert caught.value.exit_code == ExitCode.WEIGHTS
    assert "os.makedirs" in str(caught.value) or "posix.makedirs" in str(caught.value)
    assert not marker.exists()


def test_mismatched_checkpoint_gives_a_grouped_readable_diff(tmp_path, golden_dir):
    path = tmp_path / "FastSAM3D.pth"
    torch.save({"model_state_dict": manifest_state_dict(golden_dir, "keys_fastsam3d.json")}, path)
    with pytest.raises(WeightsError) as caught:
        load_model(path, preset="sam-med3d")
    error = caught.value
    assert error.exit_code == ExitCode.WEIGHTS
    assert "does not fit model 'sam-med3d'" in error.message and "--model fastsam3d" in error.fix
    details = "\n".join(error.details)
    assert "missing from the checkpoint" in details
    assert "image_encoder.blocks.{0–1,6–11}" in details  # attention of blocks 0–1 and blocks 6–11 missing
    assert "wrong shape" in details and "rel_pos_d: checkpoint (15, 128) vs model" in details
    assert len(error.details) <= 12


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated-zip"])
def test_corrupt_or_foreign_files_are_weights_errors(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)


def test_truncated_real_checkpoint_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, build_model("fastsam3d-tiny").state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)


def test_torch_file_without_weights_and_missing_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="holds no model weights"):
        read_checkpoint(path)
    other = tmp_path / "other_model.pth"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(WeightsError, match="does not contain SAM-Med3D / FastSAM3D weights"):
        read_checkpoint(other)
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


def test_tiny_round_trips_save_then_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("fastsam3d-tiny", attention="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, model.state_dict(), config=model.config.to_dict(), epoch=1)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pth"]  # atomic: no temporary left behind

    plain = torch.load(path, weights_only=True)  # the original code's way of reading it
    assert set(plain["model_state_dict"]) == set(model.state_dict())
    assert infer_preset(plain["model_state_dict"]) == "fastsam3d-tiny"

    loaded, info = load_model(path, attention="sdpa")
    assert info.preset == "fastsam3d-tiny"
    volume = torch.randn(1, 1, 128, 128, 128)
    point, label = torch.tensor([[[30.0, 40.0, 50.0]]]), torch.tensor([[1]])
    with torch.inference_mode():
        expected = model.decode(model.encode(volume), point, label)[0]
        actual = loaded.decode(loaded.encode(volume), point, label)[0]
    assert torch.equal(expected, actual)
