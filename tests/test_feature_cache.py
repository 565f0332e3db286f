"""Teacher feature cache: layout, memory-mapped reading, identity checks, resume, and the full-disk path."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from fastsam3d_cli.training import feature_cache as fc
from fastsam3d_cli.errors import BadInputError, UsageError
from fastsam3d_cli.model.config import EncoderConfig, ModelConfig

TEACHER = ModelConfig(name="test-teacher", encoder=EncoderConfig(
    embed_dim=16, depth=4, num_heads=2, img_size=32, window_size=0, global_attn_indexes=(), out_chans=8),
    prompt_embed_dim=8)


def identity(**changes) -> fc.CacheIdentity:
    values = dict(teacher_sha256="a" * 64, teacher_name="test-teacher", teacher_config=TEACHER.to_dict(),
                  crop_size=32, blocks=(2, 4), dtype="float16", sample_ids=("c/d/s0", "c/d/s1", "c/d/s2"))
    values.update(changes)
    return fc.CacheIdentity(**values)


def sample_tensors(index: int, ident: fc.CacheIdentity) -> dict[str, np.ndarray]:
    """Distinct, reproducible values per sample and tensor (so a mix-up of records would show)."""
    rng = np.random.default_rng(index)
    return {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in ident.tensor_specs()}


def test_round_trip_memmap_and_header(tmp_path: Path) -> None:
    ident = identity()
    cache, computed = fc.write_feature_cache(tmp_path / "cache", ident, lambda i: sample_tensors(i, ident))
    assert computed == 3 and len(cache) == 3
    header = json.loads((tmp_path / "cache" / "header.json").read_text())
    assert header["complete"] is True and header["dtype"] == "float16" and header["crop_size"] == 32
    assert header["teacher"]["sha256"] == "a" * 64 and header["blocks"] == [2, 4]
    assert not (tmp_path / "cache" / fc.PROGRESS_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == \
        ["block_02.bin", "block_04.bin", "crop.bin", "header.json", "neck.bin"]
    # raw little-endian fp16 records: the file size is exactly N × values × 2 bytes
    assert (tmp_path / "cache" / "block_02.bin").stat().st_size == 3 * 2 ** 3 * 16 * 2  # grid 32/16 = 2, width 16
    assert isinstance(cache.array("neck"), np.memmap)
    for i in range(3):
        want = sample_tensors(i, ident)
        got = cache.sample(i)
        assert got.sample_id == f"c/d/s{i}"
        np.testing.assert_allclose(got.crop, want["crop"], atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(got.blocks[4], want["block_4"], atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(got.neck, want["neck"], atol=2e-3, rtol=1e-3)
    assert cache.size_bytes == sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())


def test_float32_is_exact(tmp_path: Path) -> None:
    ident = identity(dtype="float32", sample_ids=("x",))
    cache, _ = fc.write_feature_cache(tmp_path / "c", ident, lambda i: sample_tensors(i, ident))
    np.testing.assert_array_equal(cache.sample(0).blocks[2], sample_tensors(0, ident)["block_2"])


def test_other_teacher_crop_size_blocks_samples_are_refused(tmp_path: Path) -> None:
    ident = identity()
    fc.write_feature_cache(tmp_path / "cache", ident, lambda i: sample_tensors(i, ident))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    cases = {
        "another teacher": identity(teacher_sha256="b" * 64),
        "32³ crops; this run uses 64³": identity(crop_size=64),
        "teacher blocks [2, 4]; this run's student needs blocks [4]": identity(blocks=(4,)),
        "lacks 1 of this run's samples": identity(sample_ids=("c/d/s0", "c/d/s1", "c/d/s2", "c/d/s3")),
    }
    for fragment, other in cases.items():
        for opener in (fc.FeatureCache, fc.FeatureCacheWriter):
            with pytest.raises(BadInputError) as info:
                opener(tmp_path / "cache", other)
            assert fragment in info.value.one_line()
            assert "--cache-features" in info.value.one_line()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == before


def test_resume_after_interruption_truncates_the_torn_record(tmp_path: Path) -> None:
    ident = identity()
    directory = tmp_path / "cache"

    def interrupted(index: int) -> dict[str, np.ndarray]:
        if index == 2:
            raise KeyboardInterrupt
        return sample_tensors(index, ident)

    with pytest.raises(KeyboardInterrupt):
        fc.write_feature_cache(directory, ident, interrupted)
    assert fc.read_progress(directory) == 2
    with pytest.raises(BadInputError, match=r"incomplete \(2/3 samples\)"):
        fc.FeatureCache(directory, ident)
    # simulate a torn write of sample 2: garbage past the committed records
    with open(directory / "neck.bin", "ab") as handle:
        handle.write(b"\x00" * 100)
    calls: list[int] = []

    def compute(index: int) -> dict[str, np.ndarray]:
        calls.append(index)
        return sample_tensors(index, ident)

    cache, computed = fc.write_feature_cache(directory, ident, compute)
    assert calls == [2] and computed == 1
    np.testing.assert_allclose(cache.sample(2).neck, sample_tensors(2, ident)["neck"], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(cache.sample(1).neck, sample_tensors(1, ident)["neck"], atol=2e-3, rtol=1e-3)
    # a complete cache is reused without computing anything
    _, computed = fc.write_feature_cache(directory, ident, compute)
    assert computed == 0 and calls == [2]


def _full_disk_after(monkeypatch: pytest.MonkeyPatch, good_writes: int) -> None:
    original = fc.FeatureCacheWriter._write_record
    count = {"n": 0}

    def write_record(path: Path, offset: int, data: bytes) -> None:
        count["n"] += 1
        if count["n"] > good_writes:
            with open(path, "r+b" if path.exists() else "w+b") as handle:  # a partial record, then ENOSPC
                handle.seek(offset)
                handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, offset, data)

    monkeypatch.setattr(fc.FeatureCacheWriter, "_write_record", staticmethod(write_record))


def test_full_disk_midway_leaves_a_resumable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ident = identity()
    directory = tmp_path / "cache"
    files_per_sample = len(ident.tensor_specs())
    _full_disk_after(monkeypatch, good_writes=files_per_sample + 2)  # sample 0 fits, sample 1 tears
    with pytest.raises(BadInputError) as info:
        fc.write_feature_cache(directory, ident, lambda i: sample_tensors(i, ident))
    line = info.value.one_line()
    assert "disk full while writing the teacher feature cache: 1/3 samples are kept" in line
    assert "rerun the same command" in line
    # nothing half-written: every data file holds exactly one whole record
    for spec in ident.tensor_specs():
        assert (directory / spec.file).stat().st_size == spec.values * 2
    assert fc.read_progress(directory) == 1
    monkeypatch.undo()
    cache, computed = fc.write_feature_cache(directory, ident, lambda i: sample_tensors(i, ident))
    assert computed == 2 and len(cache) == 3


def test_full_disk_on_first_sample_removes_the_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ident = identity()
    _full_disk_after(monkeypatch, good_writes=1)
    with pytest.raises(BadInputError, match="disk full .* nothing was kept"):
        fc.write_feature_cache(tmp_path / "cache", ident, lambda i: sample_tensors(i, ident))
    assert not (tmp_path / "cache").exists()


def test_not_enough_space_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ident = identity()

    class Usage:
        free = 10

    monkeypatch.setattr(fc.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(BadInputError, match="not enough disk space for the feature cache"):
        fc.write_feature_cache(tmp_path / "cache", ident, lambda i: pytest.fail("must not compute"))


def test_fp16_overflow_asks_for_float32(tmp_path: Path) -> None:
    ident = identity()

    def huge(index: int) -> dict[str, np.ndarray]:
        tensors = sample_tensors(index, ident)
        tensors["block_2"][0, 0, 0, 0] = 1e6
        return tensors

    with pytest.raises(BadInputError, match="overflows float16 — cache in float32"):
        fc.write_feature_cache(tmp_path / "cache", ident, huge)


def test_folders_that_are_not_caches(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="is not an empty folder and holds no feature cache"):
        fc.FeatureCacheWriter(tmp_path / "other", identity())
    with pytest.raises(BadInputError, match="is not a teacher feature cache"):
        fc.FeatureCache(tmp_path / "other")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "header.json").write_text("{\"format\": \"something\"}")
    with pytest.raises(BadInputError, match="is not a fastsam3d teacher feature cache header"):
        fc.FeatureCache(tmp_path / "bad")


def test_truncated_data_file_is_detected(tmp_path: Path) -> None:
    ident = identity()
    fc.write_feature_cache(tmp_path / "cache", ident, lambda i: sample_tensors(i, ident))
    with open(tmp_path / "cache" / "crop.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(BadInputError, match="crop.bin has 10 bytes"):
        fc.FeatureCache(tmp_path / "cache")


def test_block_mapping() -> None:
    assert fc.cached_blocks_for(12, 6) == (2, 4, 6, 8, 10, 12)
    assert fc.cached_blocks_for(6, 6) == (1, 2, 3, 4, 5, 6)
    assert fc.cached_blocks_for(6, 3) == (2, 4, 6)
    with pytest.raises(UsageError, match="multiple of the student depth"):
        fc.cached_blocks_for(12, 5)
