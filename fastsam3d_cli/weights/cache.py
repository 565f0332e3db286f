"""Named model checkpoints: registry, local cache, verified and resumable downloads, import, removal.

Users name a checkpoint (`fastsam3d`, `sam-med3d-turbo`) and never handle paths. The cache folder
(`cache_dir()`: `$FASTSAM3D_HOME/weights`, else the platform's user cache folder) holds:

    <upstream file name>   one checkpoint per registry name, e.g. `FastSAM3D.pth`
    index.json             sha256, size, source and time recorded for each checkpoint (written atomically)
    .<file name>.lock      exists while one process downloads, imports or removes that checkpoint
    .<file name>.partial   an interrupted download (Ctrl-C, kill), continued with HTTP Range next time
    .<file name>.partial.json  its note: URL, ETag/Last-Modified and total size (the bytes so far are the
                           .partial file's size); both are only read and written under the lock

A cached checkpoint is *verified* when its sha256 equals the one pinned in the registry or, when the
registry cannot pin one, the one recorded when it was first downloaded or imported (trust on first use).
Every load through `resolve_weights` re-checks it. Nothing half-written is ever left at a checkpoint's
path: downloads and imports go to a temporary file beside it and are renamed only once verified. Only
an interruption keeps a download's `.partial` file (and its note); any error deletes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib  # noqa: F401 - tests/test_weights.py reaches it as cache.hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

from fastsam3d_cli import __version__
from fastsam3d_cli.imaging.atomic import atomic_path, write_text_atomic
from fastsam3d_cli.imaging.digest import sha256_file as hash_file
from fastsam3d_cli.errors import UsageError, WeightsError
from fastsam3d_cli.imaging.filelock import OwnerLock

HOME_ENV = "FASTSAM3D_HOME"
OFFLINE_ENV = "FASTSAM3D_OFFLINE"
TIMEOUT_ENV = "FASTSAM3D_DOWNLOAD_TIMEOUT"
URL_ENV_PREFIX = "FASTSAM3D_WEIGHTS_URL_"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ATTEMPTS = 5  # a download that keeps making progress is resumed this many times in all
NETWORK_CHUNK_BYTES = 1 << 16  # small: a cut-off connection loses the partly read chunk (urllib3)


class UnreachableWeightsError(WeightsError):
    """Named weights that are not cached and cannot be fetched because the network cannot be used: offline
    mode, or a download that failed to connect (DNS, refused, timeout, proxy/TLS). Loading the default model
    may then fall back to the bundled one (weights/loading.py); every other weights error never does."""


@dataclass(frozen=True)
class WeightsSpec:
    """One named checkpoint in the registry.

    `size_bytes` / `sha256` are None where they are not known exactly; then the download's
    Content-Length is checked, and the sha256 is recorded on first download (trust on first use).
    """

    name: str
    preset: str  # model preset the checkpoint loads into (fastsam3d_cli.model.PRESETS)
    filename: str  # upstream file name, also the name in the cache folder
    url: str
    approx_size_mb: int  # for display only
    licence: str
    description: str
    size_bytes: Optional[int] = None
    sha256: Optional[str] = None
    url_from: str = "registry"  # where `url` came from: registry, an environment variable or config.json


_BUILTIN = (
    WeightsSpec(
        name="fastsam3d", preset="fastsam3d", filename="FastSAM3D.pth",
        url="https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth",
        approx_size_mb=638, licence="Apache-2.0 (techlove/FastSAM3D on Hugging Face)",
        description="FastSAM3D student as released (training checkpoint; only model_state_dict is used)"),
    WeightsSpec(
        name="sam-med3d-turbo", preset="sam-med3d", filename="sam_med3d_turbo.pth",
        url="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        approx_size_mb=402, licence="Apache-2.0 (blueyo0/SAM-Med3D on Hugging Face)",
        description="SAM-Med3D turbo (the teacher), state dict under model_state_dict"),
)
BUILTIN_REGISTRY: dict[str, WeightsSpec] = {spec.name: spec for spec in _BUILTIN}


@dataclass(frozen=True)
class WeightsEntry:
    """The state of one named checkpoint in the cache (what `list`, `verify`, `download`, `import` report)."""

    name: str
    preset: str
    path: Path
    cached: bool
    size_bytes: Optional[int]  # of the cached file, else the expected size when known
    approx_size_mb: int
    check: str  # what the sha256 is compared with: "pinned" | "recorded" | "unverified" (nothing yet)
    verified: Optional[bool]  # None: not cached, or nothing to compare with
    sha256: Optional[str]  # of the cached file
    expected_sha256: Optional[str]
    source: Optional[str]  # where the cached file came from (URL, "imported from ...")
    url: str
    url_from: str
    licence: str
    downloaded: bool = False  # set by download(): False when a verified copy was already cached

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings). `downloaded` only where it means something: after download()."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data.pop("downloaded")
        return data


# --- locations, configuration, registry -------------------------------------------------------


def home_dir() -> Path:
    """`$FASTSAM3D_HOME`, else the platform's user cache folder for fastsam3d."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fastsam3d"))


def cache_dir() -> Path:
    """Folder holding the downloaded/imported checkpoints and their index (may not exist yet)."""
    return home_dir() / "weights"


def config_path() -> Path:
    """`$FASTSAM3D_HOME/config.json`, else config.json in the platform's user config folder."""
    if os.environ.get(HOME_ENV):
        return home_dir() / "config.json"
    import platformdirs

    return Path(platformdirs.user_config_dir("fastsam3d")) / "config.json"


def url_env_var(name: str) -> str:
    """Environment variable overriding a checkpoint's URL: `fastsam3d` -> FASTSAM3D_WEIGHTS_URL_FASTSAM3D."""
    return URL_ENV_PREFIX + name.upper().replace("-", "_")


def _config_urls() -> dict[str, str]:
    """`weights_urls` of config.json ({name: url}); empty when there is no config file."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        urls = json.loads(path.read_text(encoding="utf-8")).get("weights_urls", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"config file {path} is not a readable JSON object ({type(exc).__name__})",
                         "fix or delete it") from None
    if not isinstance(urls, dict) or not all(isinstance(v, str) for v in urls.values()):
        raise UsageError(f"config file {path}: weights_urls must map names to URL strings", "fix or delete it")
    unknown = sorted(set(urls) - set(BUILTIN_REGISTRY))
    if unknown:
        raise UsageError(f"config file {path} names unknown weights {', '.join(unknown)}",
                         f"use one of: {', '.join(BUILTIN_REGISTRY)}")
    return urls


def registry() -> dict[str, WeightsSpec]:
    """The named checkpoints, with URL overrides applied (environment > config.json > built-in)."""
    config_urls = _config_urls()
    specs = {}
    for name, spec in BUILTIN_REGISTRY.items():
        if os.environ.get(url_env_var(name)):
            spec = dataclasses.replace(spec, url=os.environ[url_env_var(name)], url_from=url_env_var(name))
        elif name in config_urls:
            spec = dataclasses.replace(spec, url=config_urls[name], url_from=str(config_path()))
        specs[name] = spec
    return specs


def _check_url(spec: WeightsSpec) -> None:
    """The URL a download will use must be http(s) with a host: a typo in an override is a bad setting (exit 2),
    not a network error. Checked when downloading only, so a typo never blocks `list`, `import` or loads."""
    parsed = urlparse(spec.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"the URL of '{spec.name}' ({spec.url!r}, from {spec.url_from}) is not an http(s) URL",
                         f"fix {spec.url_from}, e.g. https://host/path/{spec.filename}")


def get_spec(name: str) -> WeightsSpec:
    """The registry entry for `name`; UsageError naming the known names otherwise."""
    specs = registry()
    if name not in specs:
        raise UsageError(f"unknown weights name '{name}'",
                         f"use one of: {', '.join(specs)} (see `fastsam3d weights list`)")
    return specs[name]


def offline_from_env() -> bool:
    """True when FASTSAM3D_OFFLINE asks never to download (1/true/yes/on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def timeout_from_env() -> float:
    """Connect/read timeout in seconds from FASTSAM3D_DOWNLOAD_TIMEOUT (default 30)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds", f"e.g. {TIMEOUT_ENV}=60")
    return value


# --- public operations ---------------------------------------------------------------------------


def list_weights() -> list[WeightsEntry]:
    """Every registry checkpoint with its cache state; cached files are hashed (verified or not)."""
    index = _read_index(cache_dir())
    return [_entry(spec, index.get(spec.name)) for spec in registry().values()]


def verify(name: Optional[str] = None) -> list[WeightsEntry]:
    """Hash the cached checkpoint `name` (or every cached one) and compare with its pinned/recorded sha256.

    Read-only: reports, never deletes. WeightsError if `name` is given but not cached.
    """
    index = _read_index(cache_dir())
    if name is not None:
        spec = get_spec(name)
        entry = _entry(spec, index.get(name))
        if not entry.cached:
            raise WeightsError(f"weights '{name}' are not in the cache ({entry.path})", _get_them(spec))
        return [entry]
    return [_entry(spec, index.get(spec.name)) for spec in registry().values()
            if (cache_dir() / spec.filename).is_file()]


def cached_path(name: str) -> Path:
    """Path of the cached checkpoint `name`, without downloading or hashing; WeightsError if absent."""
    spec = get_spec(name)
    path = cache_dir() / spec.filename
    if not path.is_file():
        raise WeightsError(f"weights '{name}' are not in the cache ({path})", _get_them(spec))
    return path


def download(name: str, *, progress: bool = False, offline: Optional[bool] = None,
             timeout_s: Optional[float] = None, attempts: int = DEFAULT_ATTEMPTS,
             retry_pause_s: float = 1.0) -> WeightsEntry:
    """Make sure a verified copy of `name` is cached, downloading it if needed; return its entry.

    A cached copy that fails its sha256 check is replaced. The download streams to `.<file>.partial`
    beside the target, continues with HTTP Range after a cut-off (up to `attempts` requests in all, as
    long as each one brings bytes), checks size and sha256 and that the file is a checkpoint, and is
    renamed into place. An interrupted download (KeyboardInterrupt, a kill) keeps the partial file and
    a note (URL, ETag/Last-Modified, size); the next call for the same URL asks only for the rest.
    Concurrent downloads of one checkpoint serialise on a lock file; the later one then finds the
    verified file and returns without downloading. Offline (`offline=True`, or None and
    FASTSAM3D_OFFLINE=1) only a verified cached copy is returned; anything else is a WeightsError.
    """
    spec = get_spec(name)
    if offline_from_env() if offline is None else offline:
        cached = _entry(spec, _read_index(cache_dir()).get(name))
        if cached.verified:
            return cached
        raise UnreachableWeightsError(
            f"cannot download '{name}': offline mode is on ({OFFLINE_ENV}=1 or --offline)",
            f"unset {OFFLINE_ENV} / drop --offline, or {_import_hint(spec)}")
    timeout_s = timeout_from_env() if timeout_s is None else timeout_s
    folder = _writable_cache()
    target = folder / spec.filename
    with _cache_lock(_lock_path(target), on_wait=_announce_wait(spec) if progress else None):
        _remove_stale_temps(target)
        record = _read_index(folder).get(name)
        if target.is_file():
            entry = _entry(spec, record)
            if entry.verified is not False:
                _discard_partial(target)  # a usable cached file makes an old partial download useless
            if entry.verified:
                return entry
            if entry.verified is None:  # a file nobody recorded (copied in by hand): check and record it
                return _record_found_file(spec, target, entry.sha256)
        _check_url(spec)
        _fetch(spec, target, record, progress=progress, timeout_s=timeout_s, attempts=attempts,
               retry_pause_s=retry_pause_s)
        record = _read_index(folder).get(name)
        return dataclasses.replace(_entry(spec, record, digest=record["sha256"]), downloaded=True)


def import_file(name: str, file: Path, replace: bool = False) -> WeightsEntry:
    """Copy a checkpoint obtained elsewhere into the cache as `name` and record its sha256.

    The copy must be a checkpoint, and match the pinned sha256 where the registry has one; otherwise
    WeightsError and the cache is unchanged. A copy of `name` whose sha256 is already recorded is only
    replaced by a different file with `replace` (the record is what every later load is checked against).
    """
    spec = get_spec(name)
    source = Path(file).expanduser().absolute()
    if not source.is_file() or not os.access(source, os.R_OK):
        raise WeightsError(f"cannot import '{name}': {source} is not a readable file",
                           f"give the path of a copy of {spec.filename}")
    folder = _writable_cache()
    target = folder / spec.filename
    with _cache_lock(_lock_path(target)), _cache_write_errors(folder), atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        digest = sha256_file(tmp)
        if spec.sha256 and digest != spec.sha256:
            raise WeightsError(f"{source} is not the published '{name}' checkpoint: sha256 {digest} "
                               f"differs from the pinned {spec.sha256}",
                               f"download it with `fastsam3d weights download {name}`")
        check_is_checkpoint(tmp, spec, what=str(source), fix=f"give the path of a copy of {spec.filename}")
        recorded = (_read_index(folder).get(name) or {}).get("sha256")
        if recorded and recorded != digest and not replace and target.is_file():
            raise WeightsError(f"the cache already holds '{name}' with recorded sha256 {recorded[:16]}…, and "
                               f"{source} differs (sha256 {digest[:16]}…)",
                               f"pass --replace to import it anyway (or `fastsam3d weights remove {name}` first)")
        _write_record(folder, name, digest, tmp.stat().st_size, f"imported from {source}")
        _discard_partial(target)
    return _entry(spec, _read_index(folder).get(name), digest=digest)


def remove(name: str) -> list[Path]:
    """Delete the cached checkpoint `name`, its record (so the next download records afresh) and leftovers
    (an interrupted download's partial file and note included).

    Returns the paths deleted (empty when nothing was cached).
    """
    spec = get_spec(name)
    folder = cache_dir()
    target = folder / spec.filename
    if not folder.is_dir():
        return []
    _check_writable(folder)
    removed = []
    with _cache_lock(_lock_path(target)), _cache_write_errors(folder):
        removed = _remove_stale_temps(target) + _discard_partial(target)
        if target.is_file():
            target.unlink()
            removed.append(target)
        if name in _read_index(folder):
            _write_record(folder, name, None)
    return removed


def partial_download(name: str) -> Optional[tuple[Path, int]]:
    """(path, bytes so far) of the partial download an interrupted `download(name)` kept, else None."""
    target = cache_dir() / get_spec(name).filename
    partial = _partial_path(target)
    if partial.is_file() and _note_path(target).is_file():
        return partial, partial.stat().st_size
    return None


def resolve_weights(name: str, *, offline: Optional[bool] = None, progress: bool = False) -> Path:
    """Path of a verified checkpoint `name`, downloading it on first use unless offline.

    What `infer --model NAME` calls. The cached file is hashed on every call and must match its
    pinned/recorded sha256 (WeightsError otherwise). Offline (`offline=True`, or None and
    FASTSAM3D_OFFLINE=1) and not cached: WeightsError naming the exact download/import commands.
    """
    spec = get_spec(name)
    folder = cache_dir()
    target = folder / spec.filename
    if target.is_file():
        entry = _entry(spec, _read_index(folder).get(name))
        if entry.verified:
            return target
        if entry.verified is None:
            if os.access(folder, os.W_OK):  # a read-only shared cache is used as it is
                _record_found_file(spec, target, entry.sha256)
            return target
        raise WeightsError(
            f"cached weights '{name}' ({target}) fail their sha256 check: {entry.sha256} "
            f"!= {entry.check} {entry.expected_sha256}",
            f"fetch a fresh copy with `fastsam3d weights download {name}` "
            f"(or `fastsam3d weights import {name} FILE`)")
    if offline_from_env() if offline is None else offline:
        raise UnreachableWeightsError(f"weights '{name}' are not in the cache ({target}) and offline mode is on",
                                      _get_them(spec, offline=True))
    return download(name, progress=progress, offline=False).path


# --- verification helpers ------------------------------------------------------------------------


_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.absolute()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _remember_verified(path: Path, digest: Optional[str]) -> None:
    if digest:
        _VERIFIED[_stat_key(path)] = digest


def verified_sha256(path: Path) -> Optional[str]:
    """The sha256 `resolve_weights` just checked `path` against, if the file is unchanged since (same size,
    mtime and inode); else None. Lets the loader record the digest without hashing the file a second time
    (0.5 s of CPU for the 638 MB FastSAM3D.pth on every cold `infer`)."""
    try:
        return _VERIFIED.get(_stat_key(path))
    except OSError:
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the result of `start_hashing` when one is pending)."""
    return take_prehashed(path) or _hash_file(path)


def _hash_file(path: Path) -> str:
    """Hex sha256 of the file, read now (imaging.digest)."""
    return hash_file(path)


_PENDING: dict[tuple[str, int, int, int], tuple[Any, dict]] = {}


def start_hashing(path: Path) -> None:
    """Start hashing `path` in a background thread; the next `sha256_file(path)` waits for that result.

    A cold `fastsam3d infer` spends ~2 s importing torch on one core while the other is idle; hashing the
    cached weights there (hashlib and file reads release the GIL) takes their sha256 check (~0.5 s for the
    638 MB FastSAM3D.pth) off the critical path. The result is used only if the file is unchanged since
    (size, mtime, inode); a missing file is ignored (the load reports it).
    """
    import threading

    try:
        key = _stat_key(path)
    except OSError:
        return
    if key in _PENDING:
        return
    done, box = threading.Event(), {}

    def work() -> None:
        try:
            box["digest"] = _hash_file(path)
        except BaseException:  # noqa: BLE001 - the caller hashes again and reports any error itself
            pass
        finally:
            done.set()

    _PENDING[key] = (done, box)
    threading.Thread(target=work, name="fastsam3d-sha256", daemon=True).start()


def take_prehashed(path: Path) -> Optional[str]:
    """The digest `start_hashing(path)` computed (waiting for it), if the file is unchanged; else None."""
    if not _PENDING:
        return None
    try:
        key = _stat_key(path)
    except OSError:
        return None
    pending = _PENDING.pop(key, None)
    if pending is None:
        return None
    done, box = pending
    done.wait()
    try:
        unchanged = _stat_key(path) == key
    except OSError:
        return None
    return box.get("digest") if unchanged else None


def check_is_checkpoint(path: Path, spec: WeightsSpec, what: str, fix: str) -> None:
    """WeightsError unless `path` loads safely as a checkpoint of exactly `spec`'s model.

    The model core reads it (never executing pickled code) and infers its preset from keys and shapes; the file
    must hold exactly the keys and shapes of `spec`'s preset — the check every load makes, so that nothing is
    recorded as verified that a load would then refuse (issue 15 item 13: a checkpoint missing one key was).
    """
    from fastsam3d_cli.model.checkpoint import expected_shapes, read_checkpoint_info, state_dict_diff

    try:
        state_dict, info = read_checkpoint_info(path)
    except WeightsError as exc:
        raise WeightsError(f"{what} is not a usable checkpoint: {exc.message.replace(str(path), 'it')}",
                           fix) from None
    if info.preset is not None and info.preset != spec.preset:
        raise WeightsError(f"{what} is a '{info.preset}' checkpoint, not '{spec.name}' (preset '{spec.preset}')",
                           fix)
    if info.preset is None:
        expected = expected_shapes(spec.preset)
        actual = {key: tuple(value.shape) for key, value in state_dict.items()}
        raise WeightsError(f"{what} does not fit model '{spec.preset}' (keys or shapes differ; it would not load)",
                           fix, details=state_dict_diff(expected, actual))


def _expected_sha256(spec: WeightsSpec, record: Optional[dict]) -> tuple[Optional[str], str]:
    """(sha256 to compare with, how it is known: pinned | recorded | unverified)."""
    if spec.sha256:
        return spec.sha256, "pinned"
    if record and record.get("sha256"):
        return record["sha256"], "recorded"
    return None, "unverified"


def _entry(spec: WeightsSpec, record: Optional[dict], digest: Optional[str] = None) -> WeightsEntry:
    """Cache state of `spec`; hashes the cached file unless its `digest` was just computed. A verified file's
    digest is remembered (`verified_sha256`), so the loader does not hash it again, however it was verified."""
    path = cache_dir() / spec.filename
    expected, check = _expected_sha256(spec, record)
    cached = path.is_file()
    digest = (digest or sha256_file(path)) if cached else None
    size = path.stat().st_size if cached else (spec.size_bytes or (record or {}).get("size_bytes"))
    verified = (digest == expected) if (cached and expected) else None
    if verified:
        _remember_verified(path, digest)
    return WeightsEntry(
        name=spec.name, preset=spec.preset, path=path, cached=cached, size_bytes=size,
        approx_size_mb=spec.approx_size_mb, check=check, verified=verified,
        sha256=digest, expected_sha256=expected, source=(record or {}).get("source") if cached else None,
        url=spec.url, url_from=spec.url_from, licence=spec.licence)


def _record_found_file(spec: WeightsSpec, target: Path, digest: Optional[str] = None) -> WeightsEntry:
    """Trust on first use for a checkpoint found in the cache without a record: check it, record its sha256
    (`digest`: already computed by the caller's `_entry`)."""
    check_is_checkpoint(target, spec, what=str(target),
                        fix=f"delete it, then run `fastsam3d weights download {spec.name}`")
    digest = digest or sha256_file(target)
    _write_record(target.parent, spec.name, digest, target.stat().st_size, "found in the cache")
    return _entry(spec, _read_index(target.parent).get(spec.name), digest=digest)


def _import_hint(spec: WeightsSpec) -> str:
    """Where a copy goes, named: 'copy X to this machine and run import' (it lands in the cache folder)."""
    return (f"copy {spec.filename} to this machine and run `fastsam3d weights import {spec.name} FILE` "
            f"(it is stored in {cache_dir()})")


def _get_them(spec: WeightsSpec, offline: bool = False) -> str:
    """The fix line: the exact commands that put `spec` into the cache."""
    where = f" on a machine with internet access, then copy its cache folder to {cache_dir()}" if offline else ""
    return (f"run `fastsam3d weights download {spec.name}`{where}, or `fastsam3d weights import "
            f"{spec.name} FILE` with a copy of {spec.filename} ({spec.url})")


# --- the index (index.json) ----------------------------------------------------------------------


def _read_index(folder: Path) -> dict[str, dict]:
    """{name: record} from index.json; empty when there is none yet."""
    path = folder / "index.json"
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["weights"]
        if not isinstance(records, dict):
            raise TypeError("weights is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"weights cache index {path} is unreadable ({type(exc).__name__})",
                           "delete it; cached checkpoints are then re-recorded on next use") from None
    return records


def _write_record(folder: Path, name: str, sha256: Optional[str], size_bytes: int = 0, source: str = "") -> None:
    """Set (or with sha256=None delete) the record of `name` in index.json, atomically and under a lock."""
    with _cache_lock(folder / ".index.lock"):
        records = _read_index(folder)
        if sha256 is None:
            records.pop(name, None)
        else:
            records[name] = {"sha256": sha256, "size_bytes": size_bytes, "source": source,
                             "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_text_atomic(folder / "index.json",
                          json.dumps({"version": 1, "weights": records}, indent=2, sort_keys=True) + "\n")


# --- cache folder and locking --------------------------------------------------------------------


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WeightsError(f"weights cache folder {folder} is not writable",
                           f"set {HOME_ENV} to a writable folder, or ask its owner for write access")


def _writable_cache() -> Path:
    """The cache folder, created if needed; WeightsError when it cannot be created or written."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the weights cache folder {folder} ({exc.strerror or exc})",
                           f"set {HOME_ENV} to a writable folder") from None
    _check_writable(folder)
    return folder


@contextlib.contextmanager
def _cache_write_errors(folder: Path) -> Iterator[None]:
    """Turn a failed write into the cache (disk full, permissions) into a WeightsError."""
    try:
        yield
    except OSError as exc:
        raise WeightsError(f"cannot write to the weights cache folder {folder} ({exc.strerror or exc})",
                           f"free some space or set {HOME_ENV} to another folder") from None


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files a killed import left beside `target`, not a resumable download (call under the lock)."""
    keep = {_partial_path(target), _note_path(target)}
    leftovers = [p for p in target.parent.glob(f".{target.stem}.*.partial*") if p.is_file() and p not in keep]
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return leftovers


def _cache_lock(path: Path, on_wait: Optional[Callable[[dict], None]] = None) -> OwnerLock:
    """The cache's lock for `path`; failing to create it is a weights error naming the fix."""
    return OwnerLock(path, on_wait=on_wait,
                     on_error=lambda exc: WeightsError(f"cannot create lock file {path} ({exc.strerror or exc})",
                                                       f"set {HOME_ENV} to a writable folder"))


def _announce_wait(spec: WeightsSpec) -> Callable[[dict], None]:
    def announce(holder: dict) -> None:
        from rich.console import Console

        who = f" (pid {holder['pid']} on {holder.get('host', '?')})" if "pid" in holder else ""
        Console(stderr=True, soft_wrap=True).print(f"waiting for another fastsam3d process{who} that is fetching "
                                   f"'{spec.name}'…", highlight=False, markup=False)
    return announce


# --- downloading ---------------------------------------------------------------------------------


def _fetch(spec: WeightsSpec, target: Path, record: Optional[dict], *, progress: bool, timeout_s: float,
           attempts: int, retry_pause_s: float) -> None:
    """Download `spec` into `.<file>.partial` beside `target`, verify it, record it and rename it into place.

    A partial download left by an interrupted run for the same URL is continued. Any error deletes the
    partial file and its note; an interruption (KeyboardInterrupt, SystemExit) keeps them for the next run.
    """
    expected_size = spec.size_bytes or (record or {}).get("size_bytes") or None
    folder = target.parent
    partial = _partial_path(target)
    note = _resumable_note(target, spec.url)
    try:
        with _cache_write_errors(folder), _progress_bar(progress, spec) as report:
            size = _stream_with_resume(spec, target, note, expected_size=expected_size, timeout_s=timeout_s,
                                       attempts=attempts, retry_pause_s=retry_pause_s, report=report)
            digest = sha256_file(partial)
            expected, check = _expected_sha256(spec, record)
            if expected and digest != expected:
                raise WeightsError(
                    f"checksum mismatch for '{spec.name}' from {spec.url}: sha256 {digest} != {check} "
                    f"{expected}; the file was removed", _mismatch_fix(spec, record, check))
            check_is_checkpoint(partial, spec, what=f"the file downloaded from {spec.url}",
                                fix=f"{_url_origin(spec)} serves something else (a login or error page?); "
                                    f"fix it, or {_import_hint(spec)}")
            _write_record(folder, spec.name, digest, size, spec.url)
            os.replace(partial, target)
    except Exception:
        _discard_partial(target)
        raise
    _discard_partial(target)  # the note


def _mismatch_fix(spec: WeightsSpec, record: Optional[dict], check: str) -> str:
    if check == "pinned":
        return (f"the server sent another file; check {_url_origin(spec)} or import the published "
                f"file with `fastsam3d weights import {spec.name} FILE`")
    when = f" ({record['recorded_utc']})" if record and record.get("recorded_utc") else ""
    return (f"the file changed since it was recorded{when}; if the new one is expected, run "
            f"`fastsam3d weights remove {spec.name}` and download again")


# --- resumable partial downloads -----------------------------------------------------------------


@dataclass(frozen=True)
class _PartialNote:
    """What `.<file>.partial.json` says about `.<file>.partial`; the bytes so far are that file's size."""

    url: str
    etag: Optional[str] = None  # strong ETags only (weak ones are not allowed in If-Range)
    last_modified: Optional[str] = None
    total: Optional[int] = None  # full size announced by the server

    @property
    def validator(self) -> Optional[str]:
        """The If-Range value: the ETag, else Last-Modified."""
        return self.etag or self.last_modified


def _partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def _note_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial.json")


def _read_note(target: Path) -> Optional[_PartialNote]:
    """The partial download's note, or None when there is none or it is unreadable."""
    try:
        data = json.loads(_note_path(target).read_text(encoding="utf-8"))
        note = _PartialNote(**{key: data.get(key) for key in ("url", "etag", "last_modified", "total")})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    texts_ok = all(isinstance(v, (str, type(None))) for v in (note.etag, note.last_modified))
    total_ok = note.total is None or (isinstance(note.total, int) and note.total > 0)
    ok = isinstance(note.url, str) and texts_ok and total_ok
    return note if ok else None


def _write_note(target: Path, note: _PartialNote) -> None:
    """Write the note (plainly: a torn note is unreadable JSON, which discards the partial file)."""
    _note_path(target).write_text(json.dumps(dataclasses.asdict(note)) + "\n", encoding="utf-8")


def _discard_partial(target: Path) -> list[Path]:
    """Delete the partial download of `target` and its note (call under the lock); returns what was deleted."""
    removed = []
    for path in (_partial_path(target), _note_path(target)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _resumable_note(target: Path, url: str) -> Optional[_PartialNote]:
    """The note of a partial download that can be continued from `url`; otherwise both are deleted.

    Continued only when the URL is the same, a validator (ETag/Last-Modified) guards against splicing
    two versions of the file, and the partial file is no longer than the announced total.
    """
    note = _read_note(target)
    partial = _partial_path(target)
    size = partial.stat().st_size if partial.is_file() else 0
    if note and note.url == url and note.validator and size and (note.total is None or size <= note.total):
        return note
    _discard_partial(target)
    return None


# --- downloading: HTTP ---------------------------------------------------------------------------


def _stream_with_resume(spec: WeightsSpec, target: Path, note: Optional[_PartialNote], *,
                        expected_size: Optional[int], timeout_s: float, attempts: int, retry_pause_s: float,
                        report: Callable[[int, Optional[int]], None]) -> int:
    """GET spec.url into `.<file>.partial`, from its current size on; after a cut-off, ask for the rest.

    Returns the size. Every Range request carries If-Range (ETag/Last-Modified) when one is known; a
    server that ignores Range or has another version (200 instead of 206) restarts from byte 0. The note
    beside the partial file is updated before body bytes are written. Retries only after a request that
    brought bytes; an error before any byte (refused, HTTP error, timeout) ends at once.
    """
    import requests

    tmp = _partial_path(target)
    total = expected_size or (note.total if note else None)
    if note and total and _file_size(tmp) == total:
        return total  # interrupted after the last byte (while verifying): nothing left to fetch
    validator = note.validator if note else None  # so a resumed request never splices two versions
    with requests.Session() as session:
        session.headers["User-Agent"] = f"fastsam3d/{__version__}"
        session.headers["Accept-Encoding"] = "identity"  # byte counts must match Content-Length
        for attempt in range(1, attempts + 1):
            offset = _file_size(tmp)
            received = 0
            unreachable = False  # this attempt failed to connect or timed out (not an HTTP or content error)
            try:
                with _request(session, spec.url, offset, validator, timeout_s) as response:
                    if response.status_code >= 400:
                        raise _http_error(spec, response)
                    resumed = bool(offset) and response.status_code == 206 and _range_start(response) == offset
                    offset = offset if resumed else 0
                    total = _checked_total(spec, response, offset, total, expected_size, resumed)
                    validator = _validator(response) or (validator if resumed else None)
                    with open(tmp, "ab" if resumed else "wb") as out:  # truncated before the note changes
                        note = _update_note(target, note, spec.url, response, total, resumed)
                        report(offset, total)
                        for chunk in response.iter_content(NETWORK_CHUNK_BYTES):
                            out.write(chunk)
                            received += len(chunk)
                            report(offset + received, total)
                size = _file_size(tmp)
                if total is None or size == total:
                    return size
                if size > total:
                    raise WeightsError(f"{spec.url} sent {size} bytes, more than the {total} announced",
                                       "the server or mirror is misbehaving; try again later or use another URL")
                problem = f"the connection closed after {size} of {total} bytes"
            except requests.RequestException as exc:
                problem = _describe_network_error(exc, spec.url, timeout_s, _file_size(tmp), total)
                unreachable = isinstance(exc, (requests.ConnectionError, requests.Timeout))
            if received == 0 or attempt == attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                error = UnreachableWeightsError if unreachable else WeightsError
                raise error(f"download of '{spec.name}' from {spec.url} failed: {problem}{tries}", _network_fix(spec))
            time.sleep(retry_pause_s)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _checked_total(spec: WeightsSpec, response: Any, offset: int, total: Optional[int],
                   expected_size: Optional[int], resumed: bool) -> Optional[int]:
    """The full size to expect after `response`; WeightsError when it contradicts the pinned/recorded one.

    Without a pinned/recorded size, a fresh (non-resumed) response defines it: the file may have changed.
    """
    announced = _announced_total(response, offset)
    if total is None or (not resumed and not expected_size):
        return announced
    if announced is None or announced == total:
        return total
    if expected_size:
        check = "pinned" if spec.size_bytes else "recorded"
        raise WeightsError(f"{spec.url} announces {announced} bytes for '{spec.name}' but the {check} size is "
                           f"{total}", _mismatch_fix(spec, None, check))
    raise WeightsError(f"{spec.url} announces {announced} bytes for '{spec.name}' while continuing a download "
                       f"of {total} bytes; the partial file was removed", "run the same command again")


def _request(session: Any, url: str, offset: int, validator: Optional[str], timeout_s: float) -> Any:
    """Streamed GET, for the bytes from `offset` on (Range + If-Range) when offset > 0.

    A 416 (the partial file is not a prefix of what the server has now) is answered by a plain GET.
    """
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    response = session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s))
    if response.status_code == 416 and offset:
        response.close()
        response = session.get(url, stream=True, timeout=(timeout_s, timeout_s))
    return response


def _update_note(target: Path, note: Optional[_PartialNote], url: str, response: Any, total: Optional[int],
                 resumed: bool) -> _PartialNote:
    """The note for the response about to be written to the partial file; rewritten when it changed."""
    headers = response.headers
    etag = headers.get("ETag")
    fresh = _PartialNote(url=url, etag=etag if etag and not etag.startswith("W/") else None,
                         last_modified=headers.get("Last-Modified"), total=total)
    if resumed and note is not None:  # a 206 may omit the validators; keep the ones the file was started with
        fresh = _PartialNote(url=url, etag=fresh.etag or note.etag,
                             last_modified=fresh.last_modified or note.last_modified, total=total)
    if fresh != note:
        _write_note(target, fresh)
    return fresh


def _range_start(response: Any) -> Optional[int]:
    """First byte of a 206 response, from `Content-Range: bytes START-END/TOTAL`."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _announced_total(response: Any, offset: int) -> Optional[int]:
    """Full file size the server announces: Content-Range's total, else offset + Content-Length."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length", "")
    return offset + int(length) if length.strip().isdigit() else None


def _validator(response: Any) -> Optional[str]:
    """A strong ETag or Last-Modified for If-Range (weak ETags are not allowed there)."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _http_error(spec: WeightsSpec, response: Any) -> WeightsError:
    code = response.status_code
    hint = {404: "the file is not at that address", 401: "the server wants credentials",
            403: "access denied"}.get(code, "the server failed" if code >= 500 else "the request was refused")
    return WeightsError(f"download of '{spec.name}' from {spec.url} failed: HTTP {code} {response.reason or ''}",
                        f"{hint}; check {_url_origin(spec)} or set {url_env_var(spec.name)} to a mirror, or "
                        f"{_import_hint(spec)}")


def _describe_network_error(exc: Exception, url: str, timeout_s: float, have: int, total: Optional[int]) -> str:
    import requests

    host = urlparse(url).netloc
    text = str(exc)
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return f"'{url}' is not a valid http(s) URL"
    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection to {host} within {timeout_s:g} s"
    if isinstance(exc, requests.ReadTimeout) or "timed out" in text.lower():
        return f"{host} sent nothing for {timeout_s:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection closed after {have} of {total if total is not None else '?'} bytes"
    if isinstance(exc, requests.ConnectionError) and "refused" in text.lower():
        return f"connection to {host} refused"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot reach {host} ({type(exc).__name__})"
    return f"{type(exc).__name__} while talking to {host}"


def _url_origin(spec: WeightsSpec) -> str:
    return "the built-in URL" if spec.url_from == "registry" else f"the URL set by {spec.url_from}"


def _network_fix(spec: WeightsSpec) -> str:
    return (f"check the network/proxy (HTTPS_PROXY), raise {TIMEOUT_ENV}, set {url_env_var(spec.name)} to a "
            f"mirror, or {_import_hint(spec)}")


@contextlib.contextmanager
def _progress_bar(enabled: bool, spec: WeightsSpec) -> Iterator[Callable[[int, Optional[int]], None]]:
    """Yield report(done_bytes, total_bytes): a Rich bar on stderr (size, speed, ETA), or a no-op."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(f"downloading {spec.name}", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
