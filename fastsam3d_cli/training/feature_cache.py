"""The teacher feature cache for distillation (FastSAM3D's `preparelabel`): written once, memory-mapped after.

For every training sample the teacher is run once and we keep, on disk:

* ``crop``   (1, S, S, S)        the z-normalised input crop the teacher saw (S = crop size, 128);
* ``block_N`` (G, G, G, C)       the teacher's token grid after block N (1-based), channels last, for each
                                 block a student stage matches (2, 4, …, 12 for SAM-Med3D → a 6-block student);
* ``neck``   (384, G, G, G)      the teacher's image embedding (G = S/16 = 8).

Layout of a cache folder (no pickle anywhere; every tensor family is one flat little-endian file)::

    DIR/header.json        format, version, dtype, teacher identity (checkpoint SHA-256, preset, config),
                           crop size, block numbers, sample ids, per-tensor shape and file, `complete` flag
    DIR/crop.bin           N records of prod(shape) values each, sample i at byte i·record_bytes
    DIR/block_02.bin …     one file per cached block
    DIR/neck.bin
    DIR/progress.json      only while unfinished: how many records are committed

Values are float16 by default (half the disk; the teacher's features are O(1) so fp16's 3 significant
digits lose nothing a student can learn) or float32 on request. `FeatureCache` opens the files with
`numpy.memmap`, so a cache bigger than memory costs nothing to open and each sample is read on access.

Writing is resumable: records are appended in sample order, flushed, and only then is `progress.json`
advanced (atomically). A re-run with the same identity truncates anything past the committed count and
continues there. `header.json` is rewritten with ``"complete": true`` (atomically) after the last sample;
readers refuse an incomplete cache. On a full disk the data files are cut back to the last committed
sample and a `BadInputError` says how far it got: the folder is a valid, resumable partial cache (or is
removed entirely when no sample had been committed and this run created it).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fastsam3d_cli.imaging.atomic import write_text_atomic
from fastsam3d_cli.errors import BadInputError, UsageError

CACHE_FORMAT = "fastsam3d-teacher-features"
CACHE_VERSION = 1
HEADER_NAME = "header.json"
PROGRESS_NAME = "progress.json"
CACHE_DTYPES = {"float16": "<f2", "float32": "<f4"}
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_REBUILD_FIX = "use another --cache-features folder, or delete {dir} so that it is rebuilt"


def block_file_name(number: int) -> str:
    return f"block_{number:02d}.bin"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (the teacher checkpoint's identity in the header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor family of the cache: per-sample `shape`, stored in `file`."""

    name: str
    shape: tuple[int, ...]
    file: str

    @property
    def values(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides the cache's content; a cache is reused only if all of it matches.

    teacher_sha256: SHA-256 of the teacher checkpoint file (or any stable digest of its weights);
    teacher_config: `ModelConfig.to_dict()` of the teacher; blocks: 1-based teacher block numbers kept;
    sample_ids: one id per sample in cache order (e.g. "class/dataset/case").
    """

    teacher_sha256: str
    teacher_name: str
    teacher_config: Mapping[str, Any]
    crop_size: int
    blocks: tuple[int, ...]
    dtype: str
    sample_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise UsageError(f"feature cache dtype '{self.dtype}' is not supported",
                             f"choose one of: {', '.join(CACHE_DTYPES)}")

    @property
    def grid(self) -> int:
        return self.crop_size // int(self.teacher_config["encoder"]["patch_size"])

    def tensor_specs(self) -> list[TensorSpec]:
        width = int(self.teacher_config["encoder"]["embed_dim"])
        out = int(self.teacher_config["encoder"]["out_chans"])
        g, s = self.grid, self.crop_size
        specs = [TensorSpec("crop", (1, s, s, s), "crop.bin")]
        specs += [TensorSpec(f"block_{n}", (g, g, g, width), block_file_name(n)) for n in self.blocks]
        specs.append(TensorSpec("neck", (out, g, g, g), "neck.bin"))
        return specs

    def bytes_per_sample(self) -> int:
        item = np.dtype(CACHE_DTYPES[self.dtype]).itemsize
        return sum(spec.values for spec in self.tensor_specs()) * item

    def to_header(self, complete: bool) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": complete,
            "dtype": self.dtype, "byte_order": "little",
            "teacher": {"sha256": self.teacher_sha256, "name": self.teacher_name,
                        "config": dict(self.teacher_config)},
            "crop_size": self.crop_size, "blocks": list(self.blocks),
            "num_samples": len(self.sample_ids), "sample_ids": list(self.sample_ids),
            "tensors": [{"name": t.name, "shape": list(t.shape), "file": t.file} for t in self.tensor_specs()],
            "bytes_per_sample": self.bytes_per_sample(),
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> "CacheIdentity":
        teacher = header["teacher"]
        return cls(teacher_sha256=str(teacher["sha256"]), teacher_name=str(teacher["name"]),
                   teacher_config=dict(teacher["config"]), crop_size=int(header["crop_size"]),
                   blocks=tuple(int(b) for b in header["blocks"]), dtype=str(header["dtype"]),
                   sample_ids=tuple(str(s) for s in header["sample_ids"]))


def describe_mismatch(found: CacheIdentity, wanted: CacheIdentity) -> str | None:
    """The first way a cache's identity differs from what a run needs, in words (None when it fits)."""
    if found.crop_size != wanted.crop_size:
        return f"holds {found.crop_size}³ crops; this run uses {wanted.crop_size}³ crops"
    if found.teacher_sha256 != wanted.teacher_sha256 or found.teacher_config != wanted.teacher_config:
        return (f"was made by another teacher ({found.teacher_name}, checkpoint sha256 {found.teacher_sha256[:12]}…; "
                f"this run's teacher is {wanted.teacher_name}, sha256 {wanted.teacher_sha256[:12]}…)")
    if found.blocks != wanted.blocks:
        return (f"holds teacher blocks {list(found.blocks)}; this run's student needs blocks {list(wanted.blocks)}")
    if found.dtype != wanted.dtype:
        return f"is stored as {found.dtype}; this run asked for {wanted.dtype}"
    if found.sample_ids != wanted.sample_ids:
        extra = sorted(set(found.sample_ids) - set(wanted.sample_ids))
        missing = sorted(set(wanted.sample_ids) - set(found.sample_ids))
        what = []
        if missing:
            what.append(f"lacks {len(missing)} of this run's samples (e.g. {missing[0]})")
        if extra:
            what.append(f"has {len(extra)} samples this run does not use (e.g. {extra[0]})")
        return ("was made from other samples: " + "; ".join(what)) if what else "lists the samples in another order"
    return None


# ------------------------------------------------------------------------------------------- reading
def read_header(directory: Path) -> dict[str, Any]:
    """The parsed header of a cache folder; BadInputError when it is absent or not a feature cache."""
    path = Path(directory) / HEADER_NAME
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{directory} is not a teacher feature cache (no {HEADER_NAME})",
                            "point --cache-features to a cache written by fastsam3d distill, or to a new folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read feature cache header {path}: {exc}",
                            f"delete {directory} so that the cache is rebuilt") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
        raise BadInputError(f"{path} is not a fastsam3d teacher feature cache header",
                            "point --cache-features to a cache written by fastsam3d distill, or to a new folder")
    if header.get("version") != CACHE_VERSION:
        raise BadInputError(f"feature cache {directory} has version {header.get('version')!r}; "
                            f"this fastsam3d reads version {CACHE_VERSION}", _REBUILD_FIX.format(dir=directory))
    try:
        CacheIdentity.from_header(header)
    except (KeyError, TypeError, ValueError, UsageError):
        raise BadInputError(f"feature cache header {path} is damaged", _REBUILD_FIX.format(dir=directory)) from None
    return header


@dataclass
class CachedSample:
    """One sample's cached tensors as float32 numpy arrays (copies, safe to modify)."""

    sample_id: str
    crop: np.ndarray  # (1, S, S, S)
    blocks: dict[int, np.ndarray]  # number → (G, G, G, C)
    neck: np.ndarray  # (out_chans, G, G, G)


class FeatureCache:
    """Read-only, memory-mapped view of a complete cache folder."""

    def __init__(self, directory: str | Path, expected: CacheIdentity | None = None) -> None:
        self.directory = Path(directory).expanduser().absolute()
        header = read_header(self.directory)
        self.identity = CacheIdentity.from_header(header)
        if expected is not None:
            problem = describe_mismatch(self.identity, expected)
            if problem:
                raise BadInputError(f"feature cache {self.directory} {problem}",
                                    _REBUILD_FIX.format(dir=self.directory))
        if not header.get("complete"):
            done = read_progress(self.directory)
            raise BadInputError(f"feature cache {self.directory} is incomplete ({done}/{len(self.identity.sample_ids)} "
                                "samples)", "rerun the same fastsam3d distill command to finish it")
        self.header = header
        numpy_dtype = np.dtype(CACHE_DTYPES[self.identity.dtype])
        n = len(self.identity.sample_ids)
        self._maps: dict[str, np.memmap] = {}
        for spec in self.identity.tensor_specs():
            path = self.directory / spec.file
            expected_bytes = n * spec.values * numpy_dtype.itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != expected_bytes:
                raise BadInputError(f"feature cache file {path} has {max(size, 0)} bytes, the header says "
                                    f"{expected_bytes}", _REBUILD_FIX.format(dir=self.directory))
            self._maps[spec.name] = np.memmap(path, dtype=numpy_dtype, mode="r", shape=(n, *spec.shape))

    def __len__(self) -> int:
        return len(self.identity.sample_ids)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        return self.identity.sample_ids

    @property
    def size_bytes(self) -> int:
        return cache_size_bytes(self.directory)

    def array(self, name: str) -> np.memmap:
        """The memory map of one tensor family, (N, *shape), in the stored dtype."""
        return self._maps[name]

    def sample(self, index: int) -> CachedSample:
        def get(name: str) -> np.ndarray:
            return np.asarray(self._maps[name][index], dtype=np.float32)

        return CachedSample(self.identity.sample_ids[index], get("crop"),
                            {n: get(f"block_{n}") for n in self.identity.blocks}, get("neck"))


def cache_size_bytes(directory: Path) -> int:
    """Bytes on disk of a cache folder's files (header included)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def read_progress(directory: Path) -> int:
    """Committed sample count of an unfinished cache (0 when no progress marker exists)."""
    try:
        return int(json.loads((Path(directory) / PROGRESS_NAME).read_text(encoding="utf-8"))["samples_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ------------------------------------------------------------------------------------------- writing
def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def check_cache_folder(directory: str | Path, identity: CacheIdentity) -> None:
    """Before any work: a folder that exists must be empty or a cache of exactly `identity` (BadInputError)."""
    directory = Path(directory).expanduser().absolute()
    if (directory / HEADER_NAME).exists():
        problem = describe_mismatch(CacheIdentity.from_header(read_header(directory)), identity)
        if problem:
            raise BadInputError(f"feature cache {directory} {problem}", _REBUILD_FIX.format(dir=directory))
    elif directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BadInputError(f"--cache-features {directory} is not an empty folder and holds no feature cache",
                            "give a new or empty folder")


class FeatureCacheWriter:
    """Appends samples to a new or unfinished cache folder; `finish()` marks it complete.

    Opening an existing folder checks its identity (BadInputError naming the difference otherwise) and
    resumes after its last committed sample. `samples_done` is how many are committed.
    """

    def __init__(self, directory: str | Path, identity: CacheIdentity) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.identity = identity
        self.specs = identity.tensor_specs()
        self.numpy_dtype = np.dtype(CACHE_DTYPES[identity.dtype])
        self.created = False
        check_cache_folder(self.directory, identity)
        if (self.directory / HEADER_NAME).exists():
            self.samples_done = len(identity.sample_ids) if read_header(self.directory).get("complete") \
                else read_progress(self.directory)
        else:
            if not self.directory.parent.is_dir():
                raise BadInputError(f"folder {self.directory.parent} does not exist",
                                    "create it first or choose another --cache-features folder")
            self.created = not self.directory.exists()
            try:
                self.directory.mkdir(exist_ok=True)
                write_text_atomic(self.directory / HEADER_NAME, json.dumps(identity.to_header(False), indent=1))
            except OSError as exc:
                self._cleanup_if_empty()
                if is_disk_full(exc):
                    raise BadInputError(f"disk full while creating the feature cache in {self.directory}",
                                        "free some space and rerun") from None
                raise BadInputError(f"cannot create the feature cache in {self.directory}: {exc.strerror or exc}",
                                    "choose a writable --cache-features folder") from None
            self.samples_done = 0
        self._truncate_to(self.samples_done)

    @property
    def complete(self) -> bool:
        return self.samples_done >= len(self.identity.sample_ids)

    def remaining_bytes(self) -> int:
        return (len(self.identity.sample_ids) - self.samples_done) * self.identity.bytes_per_sample()

    def check_free_space(self) -> None:
        """Refuse to start when the folder's file system cannot hold the rest of the cache."""
        need = self.remaining_bytes()
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise BadInputError(f"not enough disk space for the feature cache in {self.directory}: "
                                f"needs {need / 1e9:.2f} GB more, {free / 1e9:.2f} GB free",
                                "free some space, choose another --cache-features folder, or use fewer samples")

    def append(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Write the next sample: `tensors` maps every spec name (crop, block_N, neck) to its array."""
        if self.complete:
            raise ValueError("the cache already holds every sample")
        index = self.samples_done
        records = []
        for spec in self.specs:
            value = np.asarray(tensors[spec.name])
            if tuple(value.shape) != spec.shape:
                raise ValueError(f"{spec.name}: expected shape {spec.shape}, got {tuple(value.shape)}")
            with np.errstate(over="ignore"):
                stored = np.ascontiguousarray(value, dtype=self.numpy_dtype)
            if not np.isfinite(stored).all():
                bad = "overflows float16" if np.isfinite(value).all() else "is not finite"
                raise BadInputError(f"teacher output {spec.name} of sample {self.identity.sample_ids[index]} {bad}",
                                    "cache in float32 (--cache-dtype float32)" if bad.startswith("overflows")
                                    else "check the teacher checkpoint and the input data")
            records.append((spec, stored))
        try:
            for spec, stored in records:
                self._write_record(self.directory / spec.file, index * spec.values * self.numpy_dtype.itemsize,
                                   stored.tobytes())
            write_text_atomic(self.directory / PROGRESS_NAME, json.dumps({"samples_done": index + 1}))
        except OSError as exc:
            self._truncate_to(index, ignore_errors=True)
            if self.created and index == 0:
                self._remove_all()
                where = f"nothing was kept ({self.directory} removed)"
            else:
                where = f"{index}/{len(self.identity.sample_ids)} samples are kept in {self.directory}"
            if is_disk_full(exc):
                raise BadInputError(f"disk full while writing the teacher feature cache: {where}",
                                    f"free {self.remaining_bytes() / 1e9:.2f} GB and rerun the same command "
                                    "(the cache resumes), or choose another --cache-features folder") from None
            raise BadInputError(f"cannot write the teacher feature cache ({exc.strerror or exc}): {where}",
                                "check the --cache-features folder and rerun the same command") from None
        self.samples_done = index + 1

    def finish(self) -> "FeatureCache":
        """Mark the cache complete (atomic header rewrite), drop the progress marker, open it for reading."""
        if not self.complete:
            raise ValueError(f"only {self.samples_done}/{len(self.identity.sample_ids)} samples were written")
        header = read_header(self.directory)
        if not header.get("complete"):
            try:
                write_text_atomic(self.directory / HEADER_NAME, json.dumps(self.identity.to_header(True), indent=1))
            except OSError as exc:
                raise BadInputError(f"cannot finish the feature cache header in {self.directory} "
                                    f"({exc.strerror or exc})", "free some space and rerun the same command") from None
        with contextlib.suppress(FileNotFoundError):
            (self.directory / PROGRESS_NAME).unlink()
        return FeatureCache(self.directory, self.identity)

    # ------------------------------------------------------------------ file plumbing
    @staticmethod
    def _write_record(path: Path, offset: int, data: bytes) -> None:
        """Write one record at `offset` (the file is created when missing) and flush it to disk."""
        with open(path, "r+b" if path.exists() else "w+b") as handle:
            handle.seek(offset)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _truncate_to(self, count: int, ignore_errors: bool = False) -> None:
        """Cut every data file back to `count` records (drops anything an interrupted write left)."""
        for spec in self.specs:
            path = self.directory / spec.file
            if not path.exists():
                continue
            try:
                size = count * spec.values * self.numpy_dtype.itemsize
                if path.stat().st_size > size:
                    os.truncate(path, size)
                elif path.stat().st_size < size:
                    raise BadInputError(f"feature cache file {path} is shorter than its progress marker says",
                                        _REBUILD_FIX.format(dir=self.directory))
            except OSError:
                if not ignore_errors:
                    raise

    def _remove_all(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _cleanup_if_empty(self) -> None:
        with contextlib.suppress(OSError):
            if self.created:
                shutil.rmtree(self.directory)


def write_feature_cache(directory: str | Path, identity: CacheIdentity,
                        compute: Callable[[int], Mapping[str, np.ndarray]],
                        progress: Callable[[int, int], None] | None = None) -> tuple[FeatureCache, int]:
    """Fill (or resume) a cache: `compute(i)` returns sample i's tensors. Returns (cache, samples computed now)."""
    writer = FeatureCacheWriter(directory, identity)
    start = writer.samples_done
    if not writer.complete:
        writer.check_free_space()
    total = len(identity.sample_ids)
    for index in range(start, total):
        writer.append(compute(index))
        if progress is not None:
            progress(index + 1, total)
    return writer.finish(), total - start


def cached_blocks_for(teacher_depth: int, student_depth: int) -> tuple[int, ...]:
    """Teacher block numbers matched to student blocks 1..S: k ↔ k·(T/S) (2, 4, …, 12 for 12 → 6)."""
    if student_depth <= 0 or teacher_depth % student_depth:
        raise UsageError(f"a {student_depth}-block student cannot be matched to a {teacher_depth}-block teacher",
                         "the teacher depth must be a multiple of the student depth (12 → 6, 6 → 6, 6 → 3, …)")
    ratio = teacher_depth // student_depth
    return tuple(ratio * k for k in range(1, student_depth + 1))


__all__: Sequence[str] = ["CACHE_FORMAT", "CACHE_VERSION", "CacheIdentity", "CachedSample", "FeatureCache",
                          "FeatureCacheWriter", "TensorSpec", "cached_blocks_for", "check_cache_folder", "describe_mismatch",
                          "read_header", "sha256_file", "write_feature_cache"]
