"""`fastsam3d weights` and `fastsam3d_cli.weights.cache`: cache, verified resumable downloads, import, offline use.

Every download test talks to a real HTTP server on 127.0.0.1 started inside the test (never the
internet). The server serves one checkpoint and, per query flag, cuts the body off, ignores Range,
sends a short body, answers with an error status, stalls, or sends another file. It honours If-Range
against its current ETag (`server.etag`, which a test can change to stand for a new upstream version).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from typer.testing import CliRunner

from fastsam3d_cli.imaging import filelock

from fastsam3d_cli.weights import cache as weights
from fastsam3d_cli.errors import ExitCode, UsageError, WeightsError

from micro_weights import MICRO, micro_checkpoint_bytes, use_micro_preset

CLI_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
CUT_AT = 300_000  # bytes a cut-off response delivers before the connection drops


def _checkpoint_bytes(seed: int) -> bytes:
    """A small real checkpoint in the official layout {'model_state_dict': ...} (about 1.7 MB) of the micro preset
    that the published name 'fastsam3d' stands for in these tests (`micro_published`)."""
    return micro_checkpoint_bytes(seed)


@functools.cache
def _tiny_model_checkpoint() -> bytes:
    """A real `fastsam3d-tiny` checkpoint (random init, about 61 MB): keys and shapes the loader recognises."""
    from fastsam3d_cli.model import build_model

    buffer = io.BytesIO()
    torch.save({"model_state_dict": build_model("fastsam3d-tiny").state_dict(), "epoch": 3}, buffer)
    return buffer.getvalue()


PAYLOAD = _checkpoint_bytes(0)
OTHER_SAME_SIZE = bytes(b ^ 0xFF if i == len(PAYLOAD) // 2 else b for i, b in enumerate(PAYLOAD))
NOT_A_CHECKPOINT = b"<html><body>Please log in to continue</body></html>\n" * 2000
SHA = weights.hashlib.sha256(PAYLOAD).hexdigest()
REAL_REGISTRY = dict(weights.BUILTIN_REGISTRY)
# A child process gets the same stand-in as `micro_published` gives this one, then runs its code.
CHILD_SETUP = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import pytest, micro_weights; "
               "micro_weights.use_micro_preset(pytest.MonkeyPatch()); ")


@pytest.fixture(autouse=True)
def micro_published(monkeypatch):
    """'fastsam3d' stands for the micro preset in this file: downloads and imports are checked as strictly as
    loading is, so the served and imported files are whole checkpoints (of a 1.7 MB model, not 640 MB)."""
    use_micro_preset(monkeypatch)


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /file?flags: serves PAYLOAD with Range support; flags change the behaviour (see module doc)."""

    protocol_version = "HTTP/1.1"
    server: "_TestServer"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        flags = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
        with self.server.lock:
            self.server.requests.append({"range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
                                         "flags": flags})
            number = len(self.server.requests)
        if "status" in flags:
            self._send_status(int(flags["status"]))
            return
        if "stall" in flags:  # no answer at all
            self.server.release.wait(10)
            return
        body = {"other": lambda: OTHER_SAME_SIZE, "html": lambda: NOT_A_CHECKPOINT,
                "tiny": _tiny_model_checkpoint}.get(flags.get("body", ""), lambda: PAYLOAD)()
        start = self._range_start()
        current = self.headers.get("If-Range") in (None, self.server.etag)
        if start is not None and "norange" not in flags and start < len(body) and current:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", self.server.etag)
        self.end_headers()
        cut = ("cut_once" in flags and number == 1) or "short" in flags or "stall_body" in flags
        remaining = body[start:start + CUT_AT] if cut else body[start:]
        if "hold" in flags:  # part of the body, then the rest once the test releases it
            self._write_slowly(remaining[:CUT_AT], 0)
            self.server.hold.wait(30)
            remaining = remaining[CUT_AT:]
        self._write_slowly(remaining, float(flags.get("delay", self.server.delay_s)))
        self.server.bytes_sent += len(remaining)
        self.server.sent_by_request[number] = len(remaining)
        if "stall_body" in flags:  # part of the body, then silence
            self.server.release.wait(10)
        if cut:
            self.close_connection = True

    def _range_start(self) -> int | None:
        value = self.headers.get("Range", "")
        if not value.startswith("bytes="):
            return None
        return int(value[len("bytes="):].split("-")[0])

    def _send_status(self, code: int) -> None:
        message = b"nope\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        self.wfile.write(message)

    def _write_slowly(self, data: bytes, delay_s: float) -> None:
        piece = 20_000 if delay_s else len(data) or 1
        for offset in range(0, len(data), piece):
            self.wfile.write(data[offset:offset + piece])
            self.wfile.flush()
            time.sleep(delay_s)


class _TestServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.bytes_sent = 0
        self.sent_by_request: dict[int, int] = {}  # request number (1-based) → body bytes it finished sending
        self.release = threading.Event()
        self.hold = threading.Event()
        self.etag = '"v1"'
        self.delay_s = 0.0  # pause per 20 kB when the URL sets no delay (same URL, slow or fast)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-body (the point of several tests) is not an error here

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/FastSAM3D.pth" + (f"?{query}" if query else "")


@pytest.fixture
def server():
    httpd = _TestServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.hold.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty FASTSAM3D_HOME; no URL overrides, online, short timeouts, no pause between retries."""
    for key in list(os.environ):
        if key.startswith(weights.URL_ENV_PREFIX) or key in {weights.OFFLINE_ENV, weights.TIMEOUT_ENV}:
            monkeypatch.delenv(key)
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(weights.TIMEOUT_ENV, "2")
    return tmp_path / "home"


def _serve_fastsam3d(monkeypatch, url: str) -> None:
    monkeypatch.setenv(weights.url_env_var("fastsam3d"), url)


def _cache_files(home: Path) -> list[str]:
    folder = home / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _fast_download(name: str = "fastsam3d", **kwargs):
    kwargs.setdefault("retry_pause_s", 0.0)
    return weights.download(name, **kwargs)


def _download_within(seconds: float):
    """download() in a thread, so a lock that is never released fails the test instead of hanging it."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_fast_download()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"download did not finish within {seconds} s (still waiting for the lock?)"
    return outcome[0]


def _pin(monkeypatch, sha256: str) -> None:
    spec = weights.BUILTIN_REGISTRY["fastsam3d"]
    monkeypatch.setitem(weights.BUILTIN_REGISTRY, "fastsam3d", dataclasses.replace(spec, sha256=sha256))


# --- registry, configuration ---------------------------------------------------------------------


def test_registry_names_presets_and_huggingface_urls(home):
    specs = weights.registry()
    assert specs["fastsam3d"].preset == MICRO.name  # this file's stand-in (`micro_published`); the real entry:
    assert REAL_REGISTRY["fastsam3d"].preset == "fastsam3d"
    assert specs["fastsam3d"].url == "https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth"
    assert specs["sam-med3d-turbo"].preset == "sam-med3d"
    assert specs["sam-med3d-turbo"].url.endswith("blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth")
    assert all(spec.sha256 is None and spec.size_bytes is None for spec in specs.values())  # not invented
    assert weights.url_env_var("sam-med3d-turbo") == "FASTSAM3D_WEIGHTS_URL_SAM_MED3D_TURBO"


def test_url_override_precedence_env_over_config_over_registry(home, monkeypatch):
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"weights_urls": {
        "fastsam3d": "http://mirror.example/fs.pth", "sam-med3d-turbo": "http://mirror.example/t.pth"}}))
    monkeypatch.setenv("FASTSAM3D_WEIGHTS_URL_SAM_MED3D_TURBO", "http://env.example/t.pth")
    specs = weights.registry()
    assert (specs["fastsam3d"].url, specs["fastsam3d"].url_from) == ("http://mirror.example/fs.pth",
                                                                     str(home / "config.json"))
    assert (specs["sam-med3d-turbo"].url, specs["sam-med3d-turbo"].url_from) == (
        "http://env.example/t.pth", "FASTSAM3D_WEIGHTS_URL_SAM_MED3D_TURBO")


@pytest.mark.parametrize("config, expected", [
    ("{not json", "is not a readable JSON object"),
    ('{"weights_urls": {"fastsam3": "http://x"}}', "names unknown weights fastsam3"),
])
def test_bad_config_file_is_a_usage_error(home, config, expected):
    home.mkdir()
    (home / "config.json").write_text(config)
    with pytest.raises(UsageError, match=expected):
        weights.registry()


def test_unknown_name_is_a_usage_error(home):
    with pytest.raises(UsageError, match="unknown weights name 'fastsam'.*fastsam3d, sam-med3d-turbo"):
        weights.resolve_weights("fastsam", offline=True)


def test_bad_timeout_variable_is_a_usage_error(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    monkeypatch.setenv(weights.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match="FASTSAM3D_DOWNLOAD_TIMEOUT='soon'"):
        _fast_download()
    assert server.requests == []


# --- downloading ---------------------------------------------------------------------------------


def test_fresh_download_records_sha256_and_second_call_reuses_it(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    entry = _fast_download()
    assert entry.downloaded and entry.verified and entry.check == "recorded"
    assert entry.path == home / "weights" / "FastSAM3D.pth"
    assert entry.path.read_bytes() == PAYLOAD
    assert entry.sha256 == SHA and entry.size_bytes == len(PAYLOAD)
    record = json.loads((home / "weights" / "index.json").read_text())["weights"]["fastsam3d"]
    assert record["sha256"] == SHA and record["size_bytes"] == len(PAYLOAD) and record["source"] == server.url()
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]  # no temporary or lock file left

    again = _fast_download()
    assert not again.downloaded and again.verified
    assert len(server.requests) == 1


def test_resume_after_cut_off_asks_for_the_rest_with_range(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("cut_once=1"))
    entry = _fast_download()
    assert entry.path.read_bytes() == PAYLOAD
    first, second = [r["range"] for r in server.requests]
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 0 < resumed_at <= CUT_AT  # at most the last partly read chunk is lost
    assert server.bytes_sent == CUT_AT + len(PAYLOAD) - resumed_at
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_server_that_ignores_range_restarts_from_zero(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("cut_once=1&norange=1"))
    assert _fast_download().path.read_bytes() == PAYLOAD
    assert len(server.requests) == 2 and server.bytes_sent == CUT_AT + len(PAYLOAD)


def test_body_shorter_than_announced_fails_after_retries_and_leaves_nothing(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("short=1&norange=1"))
    with pytest.raises(WeightsError, match=rf"closed after \d+ of {len(PAYLOAD)} bytes \(after 3 attempts\)") as info:
        _fast_download(attempts=3)
    assert info.value.exit_code == ExitCode.WEIGHTS
    assert len(server.requests) == 3
    assert _cache_files(home) == []


@pytest.mark.parametrize("status, text", [(404, "HTTP 404 Not Found"), (500, "HTTP 500 Internal Server Error")])
def test_http_error_fails_at_once_and_leaves_nothing(home, monkeypatch, server, status, text):
    _serve_fastsam3d(monkeypatch, server.url(f"status={status}"))
    with pytest.raises(WeightsError, match=text) as info:
        _fast_download()
    assert "FASTSAM3D_WEIGHTS_URL_FASTSAM3D" in info.value.fix and "weights import fastsam3d FILE" in info.value.fix
    assert len(server.requests) == 1
    assert _cache_files(home) == []


def test_connection_refused(home, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _serve_fastsam3d(monkeypatch, f"http://127.0.0.1:{port}/FastSAM3D.pth")
    with pytest.raises(WeightsError, match=f"connection to 127.0.0.1:{port} refused"):
        _fast_download()
    assert _cache_files(home) == []


def test_stalled_server_times_out(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("stall=1"))
    started = time.monotonic()
    with pytest.raises(WeightsError, match="sent nothing for 0.3 s"):
        _fast_download(timeout_s=0.3)
    assert time.monotonic() - started < 3
    assert _cache_files(home) == []


def test_server_that_stalls_mid_body_is_resumed_then_given_up(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("stall_body=1&norange=1"))
    with pytest.raises(WeightsError, match=r"sent nothing for 0.3 s \(after 2 attempts\)"):
        _fast_download(timeout_s=0.3, attempts=2)
    assert len(server.requests) == 2 and server.requests[1]["range"] is not None
    assert _cache_files(home) == []


def test_pinned_checksum_mismatch_removes_the_file(home, monkeypatch, server):
    _pin(monkeypatch, SHA)
    _serve_fastsam3d(monkeypatch, server.url("body=other"))
    with pytest.raises(WeightsError, match="checksum mismatch for 'fastsam3d'.*!= pinned .*the file was removed"):
        _fast_download()
    assert _cache_files(home) == []


def test_pinned_checksum_match_lists_as_pinned(home, monkeypatch, server):
    _pin(monkeypatch, SHA)
    _serve_fastsam3d(monkeypatch, server.url())
    entry = _fast_download()
    assert entry.verified and entry.check == "pinned"


def test_recorded_checksum_is_enforced_on_a_later_download(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    first = _fast_download()
    first.path.unlink()  # the file is gone, its record stays
    _serve_fastsam3d(monkeypatch, server.url("body=other"))  # upstream now serves another file
    with pytest.raises(WeightsError, match="checksum mismatch.*!= recorded") as info:
        _fast_download()
    assert "weights remove fastsam3d" in info.value.fix
    assert _cache_files(home) == ["index.json"]


def test_recorded_size_is_enforced_before_downloading(home, monkeypatch, server, tmp_path):
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(PAYLOAD[:-1000])  # recorded size differs from what the server announces
    monkeypatch.setattr(weights, "check_is_checkpoint", lambda *args, **kwargs: None)
    weights.import_file("fastsam3d", source)
    (home / "weights" / "FastSAM3D.pth").unlink()
    _serve_fastsam3d(monkeypatch, server.url())
    with pytest.raises(WeightsError, match=f"announces {len(PAYLOAD)} bytes .* recorded size is {len(PAYLOAD) - 1000}"):
        _fast_download()
    assert _cache_files(home) == ["index.json"]


def test_download_that_is_not_a_checkpoint_is_refused(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("body=html"))
    with pytest.raises(WeightsError, match="is not a usable checkpoint"):
        _fast_download()
    assert _cache_files(home) == []


def test_concurrent_downloads_of_one_file_download_once(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("delay=0.01"))  # about 0.5 s of body
    results, errors = [], []

    def fetch() -> None:
        try:
            results.append(_fast_download())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(r.downloaded for r in results) == [False, True]
    assert len(server.requests) == 1
    assert (home / "weights" / "FastSAM3D.pth").read_bytes() == PAYLOAD
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def _line_within(stream, seconds: float) -> str:
    """The next line of a subprocess pipe, or '' if none comes within `seconds`."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return lines[0] if lines else ""


def test_two_processes_downloading_at_once_share_one_download(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("hold=1"))  # the body pauses until the test says go
    code = CHILD_SETUP + ("import json; from fastsam3d_cli.weights.cache import download; "
            "entry = download('fastsam3d', progress=True, retry_pause_s=0); "
            "print(json.dumps({'downloaded': entry.downloaded, 'sha256': entry.sha256}))")
    # the first child's read waits while the second starts (torch imports): more than the file's usual 2 s timeout
    env = {**os.environ, weights.TIMEOUT_ENV: "30"}
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    second = None
    try:
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:  # first is mid-download, holding the lock
            time.sleep(0.05)
        second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        waiting = _line_within(second.stderr, 60)
        assert f"waiting for another fastsam3d process (pid {first.pid}" in waiting
        server.hold.set()
        results = [json.loads(proc.communicate(timeout=60)[0]) for proc in (first, second)]
    finally:
        server.hold.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert results == [{"downloaded": True, "sha256": SHA}, {"downloaded": False, "sha256": SHA}]
    assert len(server.requests) == 1
    assert (home / "weights" / "FastSAM3D.pth").read_bytes() == PAYLOAD
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_lock_of_a_dead_process_is_broken(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    (home / "weights").mkdir(parents=True)
    lock = home / "weights" / ".FastSAM3D.pth.lock"
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "since": 0}))
    assert _download_within(10).path.read_bytes() == PAYLOAD
    assert not lock.exists()


def test_lock_not_refreshed_for_a_minute_is_broken(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    (home / "weights").mkdir(parents=True)
    lock = home / "weights" / ".FastSAM3D.pth.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "another-node", "since": 0}))
    old = time.time() - filelock.LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    assert _download_within(10).path.read_bytes() == PAYLOAD
    assert not lock.exists()


def test_leftover_partial_of_a_killed_download_is_cleaned(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    (home / "weights").mkdir(parents=True)
    (home / "weights" / ".FastSAM3D.abc123.partial.pth").write_bytes(b"half")
    _fast_download()
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


# --- resuming an interrupted download in a later run ---------------------------------------------

PARTIAL_FILES = [".FastSAM3D.pth.partial", ".FastSAM3D.pth.partial.json"]


def _sent_by_last_request(server, timeout_s: float = 10.0) -> int:
    """Body bytes the server's latest request sent. Read per request: the interrupted request before it may still
    be writing into the socket's buffers when the next download starts, so a running total would race."""
    number = len(server.requests)
    deadline = time.monotonic() + timeout_s
    while number not in server.sent_by_request and time.monotonic() < deadline:  # the handler's last line
        time.sleep(0.01)
    return server.sent_by_request[number]


def _interrupt_at(monkeypatch, nbytes: int) -> None:
    """Make the next download raise KeyboardInterrupt (like Ctrl-C) once `nbytes` have been written."""
    @contextlib.contextmanager
    def progress_bar(enabled, spec):
        def report(done, total):
            if done >= nbytes:
                raise KeyboardInterrupt
        yield report
    monkeypatch.setattr(weights, "_progress_bar", progress_bar)


def _interrupted_download(monkeypatch, nbytes: int = 200_000) -> int:
    """Run a download that Ctrl-C stops after `nbytes`; return the size of the partial file it keeps."""
    with monkeypatch.context() as patch:
        _interrupt_at(patch, nbytes)
        with pytest.raises(KeyboardInterrupt):
            _fast_download()
    return weights.partial_download("fastsam3d")[1]


def _note(home: Path) -> dict:
    return json.loads((home / "weights" / ".FastSAM3D.pth.partial.json").read_text())


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_killed_cli_download_keeps_partial_and_the_next_run_resumes_with_range(home, monkeypatch, server, how):
    _serve_fastsam3d(monkeypatch, server.url())
    server.delay_s = 0.1  # about 5 s of body: time to stop the command mid-way
    cli = CHILD_SETUP + "sys.argv = ['fastsam3d', 'weights', 'download', 'fastsam3d']; from fastsam3d_cli.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", cli],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CLI_ENV})
    partial = home / "weights" / ".FastSAM3D.pth.partial"
    try:
        deadline = time.monotonic() + 60
        while (not partial.is_file() or partial.stat().st_size < 100_000) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(getattr(signal, how))
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = partial.stat().st_size
    assert 100_000 <= kept < len(PAYLOAD)
    if how == "SIGINT":
        assert proc.returncode == 130
        assert stderr.strip().splitlines()[-1] == (f"fastsam3d: error: interrupted — kept {kept} bytes in {partial}; "
                                                   "run the same command again to resume")
        assert _cache_files(home) == PARTIAL_FILES  # no final file, no lock, nothing else
    else:  # no chance to clean up: the lock of the dead process stays until the next run breaks it
        assert _cache_files(home) == [".FastSAM3D.pth.lock"] + PARTIAL_FILES
    assert _note(home) == {"url": server.url(), "etag": '"v1"', "last_modified": None, "total": len(PAYLOAD)}

    server.delay_s = 0.0
    entry = _fast_download()
    assert server.requests[-1]["range"] == f"bytes={kept}-" and server.requests[-1]["if_range"] == '"v1"'
    assert entry.downloaded and entry.sha256 == SHA and entry.path.read_bytes() == PAYLOAD
    assert server.bytes_sent == len(PAYLOAD) - kept  # the killed request never finished sending
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_interrupted_download_resumes_in_the_next_call(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    kept = _interrupted_download(monkeypatch)
    assert 200_000 <= kept < len(PAYLOAD)
    assert _cache_files(home) == PARTIAL_FILES
    entry = _fast_download()
    assert (server.requests[-1]["range"], server.requests[-1]["if_range"]) == (f"bytes={kept}-", '"v1"')
    assert _sent_by_last_request(server) == len(PAYLOAD) - kept
    assert entry.sha256 == SHA and entry.path.read_bytes() == PAYLOAD
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_interrupted_while_verifying_needs_no_request_next_time(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    with monkeypatch.context() as patch:
        patch.setattr(weights, "check_is_checkpoint", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _fast_download()
    assert _cache_files(home) == PARTIAL_FILES and weights.partial_download("fastsam3d")[1] == len(PAYLOAD)
    assert _fast_download().path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


@pytest.mark.parametrize("change", ["server ignores Range", "new version upstream"])
def test_next_call_restarts_from_zero_on_a_full_response(home, monkeypatch, server, change):
    _serve_fastsam3d(monkeypatch, server.url("norange=1" if change == "server ignores Range" else ""))
    kept = _interrupted_download(monkeypatch)
    if change == "new version upstream":
        server.etag = '"v2"'  # If-Range "v1" no longer matches: the server answers 200 with the whole file
    entry = _fast_download()
    assert (server.requests[-1]["range"], server.requests[-1]["if_range"]) == (f"bytes={kept}-", '"v1"')
    assert _sent_by_last_request(server) == len(PAYLOAD)  # all of it, nothing spliced
    assert entry.sha256 == SHA and entry.path.read_bytes() == PAYLOAD
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_changed_url_discards_the_partial_download(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    _interrupted_download(monkeypatch)
    _serve_fastsam3d(monkeypatch, server.url("mirror=1"))
    entry = _fast_download()
    assert server.requests[-1]["range"] is None
    assert entry.path.read_bytes() == PAYLOAD and entry.source == server.url("mirror=1")
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


def test_checksum_mismatch_after_resuming_deletes_the_partial_download(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    _interrupted_download(monkeypatch)
    _pin(monkeypatch, "0" * 64)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        _fast_download()
    assert server.requests[-1]["range"] is not None
    assert _cache_files(home) == []


def test_note_that_does_not_fit_the_partial_file_restarts(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    _interrupted_download(monkeypatch)
    note = home / "weights" / ".FastSAM3D.pth.partial.json"
    note.write_text(json.dumps({**_note(home), "total": 1000}))  # shorter than the partial file
    assert _fast_download().path.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] is None


def test_remove_deletes_a_partial_download(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    _interrupted_download(monkeypatch)
    folder = home / "weights"
    assert weights.remove("fastsam3d") == [folder / name for name in PARTIAL_FILES]
    assert _cache_files(home) == [] and weights.partial_download("fastsam3d") is None


def test_cache_folder_that_cannot_be_created(tmp_path, home, monkeypatch, server):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(weights.HOME_ENV, str(blocker / "home"))
    _serve_fastsam3d(monkeypatch, server.url())
    with pytest.raises(WeightsError, match="cannot create the weights cache folder .*a-file/home/weights"):
        _fast_download()
    assert server.requests == [] and blocker.read_text() == "not a folder"


def test_cache_folder_reported_not_writable_is_refused(home, monkeypatch, server):
    """Same rule as below for runs as root (which ignores permissions): the access check is faked."""
    folder = home / "weights"
    folder.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(weights.os, "access", lambda path, mode: Path(path) != folder and real_access(path, mode))
    _serve_fastsam3d(monkeypatch, server.url())
    with pytest.raises(WeightsError, match=f"weights cache folder {folder} is not writable") as info:
        _fast_download()
    assert "FASTSAM3D_HOME" in info.value.fix
    assert server.requests == [] and _cache_files(home) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_cache_folder_that_is_not_writable(home, monkeypatch, server):
    (home / "weights").mkdir(parents=True)
    (home / "weights").chmod(0o500)
    _serve_fastsam3d(monkeypatch, server.url())
    try:
        with pytest.raises(WeightsError, match="is not writable"):
            _fast_download()
    finally:
        (home / "weights").chmod(0o700)
    assert server.requests == [] and _cache_files(home) == []


# --- resolve (what `infer` calls), offline ------------------------------------------------------


def test_resolve_downloads_on_first_use_then_only_verifies(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    path = weights.resolve_weights("fastsam3d", offline=False)
    assert path.read_bytes() == PAYLOAD
    assert weights.resolve_weights("fastsam3d", offline=True) == path
    assert len(server.requests) == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_and_missing_names_the_exact_commands(home, monkeypatch, server, how):
    _serve_fastsam3d(monkeypatch, server.url())
    if how == "environment":
        monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(WeightsError) as info:
        weights.resolve_weights("fastsam3d", offline=True if how == "argument" else None)
    line = info.value.one_line()
    assert "not in the cache" in line and "offline mode is on" in line
    assert "`fastsam3d weights download fastsam3d`" in line and "`fastsam3d weights import fastsam3d FILE`" in line
    assert "\n" not in line and info.value.exit_code == 4
    assert server.requests == [] and _cache_files(home) == []


def test_altered_file_fails_verify_and_resolve_then_download_repairs_it(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    path = _fast_download().path
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))

    [entry] = weights.verify("fastsam3d")
    assert entry.verified is False and entry.expected_sha256 == SHA and entry.sha256 != SHA
    assert [e.verified for e in weights.list_weights() if e.name == "fastsam3d"] == [False]
    with pytest.raises(WeightsError, match="fail their sha256 check"):
        weights.resolve_weights("fastsam3d", offline=True)
    assert path.read_bytes() == bytes(data)  # verify and resolve never delete evidence

    repaired = _fast_download()
    assert repaired.downloaded and repaired.verified and path.read_bytes() == PAYLOAD


def test_file_copied_into_the_cache_by_hand_is_recorded_on_first_load(home):
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "FastSAM3D.pth").write_bytes(PAYLOAD)
    assert weights.list_weights()[0].check == "unverified"
    path = weights.resolve_weights("fastsam3d", offline=True)
    [entry] = weights.verify("fastsam3d")
    assert path == entry.path and entry.check == "recorded" and entry.verified
    assert entry.source == "found in the cache"


def test_read_only_shared_cache_is_used_without_writing(home, monkeypatch, tmp_path):
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(PAYLOAD)
    weights.import_file("fastsam3d", source)
    folder = home / "weights"
    (folder / "sam_med3d_turbo.pth").write_bytes(PAYLOAD)  # placed by an admin, never recorded
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    real_access = os.access
    monkeypatch.setattr(weights.os, "access", lambda path, mode: Path(path) != folder and real_access(path, mode))
    assert weights.resolve_weights("fastsam3d", offline=True) == folder / "FastSAM3D.pth"
    assert weights.resolve_weights("sam-med3d-turbo", offline=True) == folder / "sam_med3d_turbo.pth"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


# --- import, remove ------------------------------------------------------------------------------


def test_import_copies_and_records_sha256(home, tmp_path):
    source = tmp_path / "from-a-usb-stick.pth"
    source.write_bytes(PAYLOAD)
    entry = weights.import_file("fastsam3d", source)
    assert entry.path.read_bytes() == PAYLOAD and source.read_bytes() == PAYLOAD
    assert entry.verified and entry.check == "recorded" and entry.sha256 == SHA
    assert entry.source == f"imported from {source}"
    assert _cache_files(home) == ["FastSAM3D.pth", "index.json"]


@pytest.mark.parametrize("content, expected", [
    (NOT_A_CHECKPOINT, "is not a usable checkpoint"),
    (None, "is not a readable file"),
])
def test_import_refuses_what_is_not_a_checkpoint(home, tmp_path, content, expected):
    source = tmp_path / "model.pth"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(WeightsError, match=expected):
        weights.import_file("fastsam3d", source)
    assert _cache_files(home) == []


def test_import_of_another_file_than_the_pinned_one_is_refused(home, tmp_path, monkeypatch):
    _pin(monkeypatch, SHA)
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(_checkpoint_bytes(1))
    with pytest.raises(WeightsError, match="is not the published 'fastsam3d' checkpoint"):
        weights.import_file("fastsam3d", source)
    assert _cache_files(home) == []


def test_import_of_a_checkpoint_for_another_model_is_refused(home, tmp_path):
    source = tmp_path / "student.pth"
    source.write_bytes(_tiny_model_checkpoint())
    with pytest.raises(WeightsError, match=f"{source} is a 'fastsam3d-tiny' checkpoint, not 'fastsam3d'"):
        weights.import_file("fastsam3d", source)
    assert _cache_files(home) == []


@pytest.mark.parametrize("keys", ["one missing", "three only"])
def test_import_of_a_checkpoint_missing_keys_is_refused_with_the_difference(home, tmp_path, keys):
    """Issue 15 item 13: import records nothing a load would refuse, however few of the model's keys a file has."""
    state = micro_checkpoint_bytes(drop=("mask_decoder.iou_token.weight",)) if keys == "one missing" else None
    if state is None:
        buffer = io.BytesIO()
        torch.save({"model_state_dict": {"mask_decoder.iou_token.weight": torch.zeros(1, 32),
                                         "image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 64),
                                         "prompt_encoder.point_embeddings.0.weight": torch.zeros(1, 32)}}, buffer)
        state = buffer.getvalue()
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(state)
    with pytest.raises(WeightsError, match=f"{source} does not fit model '{MICRO.name}'") as info:
        weights.import_file("fastsam3d", source)
    assert any("missing from the checkpoint" in line for line in info.value.details)
    assert _cache_files(home) == []


def test_downloaded_checkpoint_loads_into_its_model(home, monkeypatch, server):
    """End to end: resolve (download on first use) -> the model core loads the file into its preset."""
    from fastsam3d_cli.model.checkpoint import load_model

    spec = weights.BUILTIN_REGISTRY["fastsam3d"]
    monkeypatch.setitem(weights.BUILTIN_REGISTRY, "fastsam3d", dataclasses.replace(spec, preset="fastsam3d-tiny"))
    _serve_fastsam3d(monkeypatch, server.url("body=tiny"))
    path = weights.resolve_weights("fastsam3d", offline=False)
    model, info = load_model(path, preset="fastsam3d-tiny")
    assert info.preset == "fastsam3d-tiny" and info.layout == "training"
    assert weights.verify("fastsam3d")[0].verified


def test_remove_deletes_file_and_record(home, tmp_path):
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(PAYLOAD)
    weights.import_file("fastsam3d", source)
    removed = weights.remove("fastsam3d")
    assert removed == [home / "weights" / "FastSAM3D.pth"]
    assert _cache_files(home) == ["index.json"]
    assert json.loads((home / "weights" / "index.json").read_text())["weights"] == {}
    assert weights.remove("fastsam3d") == []


# --- the command line ----------------------------------------------------------------------------


def _cli(*args: str, env: dict | None = None):
    from fastsam3d_cli.cli import app

    return CliRunner().invoke(app, list(args), env={**CLI_ENV, **(env or {})})


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_list_json_is_one_object(home):
    result = _cli("weights", "list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cache_dir"] == str(home / "weights")
    rows = {row["name"]: row for row in data["weights"]}
    assert set(rows) == {"fastsam3d", "sam-med3d-turbo"}
    assert rows["fastsam3d"]["cached"] is False and rows["fastsam3d"]["check"] == "unverified"
    assert rows["fastsam3d"]["path"] == str(home / "weights" / "FastSAM3D.pth")
    assert "downloaded" not in rows["fastsam3d"]  # only `download` says whether it downloaded


def test_cli_download_list_path_verify_remove(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    result = _cli("weights", "download", "fastsam3d", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sha256"] == SHA and json.loads(result.stdout)["downloaded"] is True

    table = _cli("weights", "list")
    row = next(line for line in table.stdout.splitlines() if "FastSAM3D.pth" in line)
    assert "fastsam3d" in row and "yes" in row and "recorded" in row

    path = _cli("weights", "path", "fastsam3d")
    assert path.exit_code == 0 and path.stdout.strip() == str(home / "weights" / "FastSAM3D.pth")

    verify = _cli("weights", "verify", "--json")
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"] is True

    removed = _cli("weights", "remove", "fastsam3d")
    assert removed.exit_code == 0 and "removed fastsam3d" in removed.stdout
    assert _cache_files(home) == ["index.json"]


def test_cli_verify_after_alteration_exits_4_with_one_line(home, tmp_path):
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(PAYLOAD)
    assert _cli("weights", "import", "fastsam3d", str(source)).exit_code == 0
    cached = home / "weights" / "FastSAM3D.pth"
    cached.write_bytes(PAYLOAD[:-10])
    result = _cli("weights", "verify", "fastsam3d", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["ok"] is False
    assert _error_line(result) == ("fastsam3d: error: sha256 mismatch for cached weights: fastsam3d — "
                                   "fetch a fresh copy with `fastsam3d weights download fastsam3d`")
    assert cached.exists()


def test_cli_offline_download_and_path_exit_4(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url())
    result = _cli("weights", "download", "sam-med3d-turbo", env={"FASTSAM3D_OFFLINE": "1"})
    assert result.exit_code == 4
    assert "offline mode is on" in _error_line(result)
    result = _cli("weights", "path", "fastsam3d")
    assert result.exit_code == 4
    assert "`fastsam3d weights download fastsam3d`" in _error_line(result)
    assert server.requests == [] and _cache_files(home) == []


def test_cli_http_error_exits_4_with_one_line(home, monkeypatch, server):
    _serve_fastsam3d(monkeypatch, server.url("status=404"))
    result = _cli("weights", "download", "fastsam3d")
    assert result.exit_code == 4 and result.stdout == ""
    assert "HTTP 404" in _error_line(result)
    assert _cache_files(home) == []


def test_cli_import_not_a_checkpoint_exits_4(home, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_bytes(NOT_A_CHECKPOINT)
    result = _cli("weights", "import", "fastsam3d", str(source))
    assert result.exit_code == 4
    assert f"{source} is not a usable checkpoint" in _error_line(result)
    assert _cache_files(home) == []


def test_cli_import_over_a_recorded_copy_needs_replace(home, tmp_path):
    """The recorded sha256 is what every later load is checked against: a different file does not replace it
    silently. The same file again is fine; --replace imports a different one."""
    first, other = tmp_path / "first.pth", tmp_path / "other.pth"
    first.write_bytes(PAYLOAD)
    other.write_bytes(_checkpoint_bytes(1))
    assert _cli("weights", "import", "fastsam3d", str(first)).exit_code == 0
    assert _cli("weights", "import", "fastsam3d", str(first)).exit_code == 0  # the same file: nothing changes
    before = {p.name: p.read_bytes() for p in (home / "weights").iterdir() if p.is_file()}
    refused = _cli("weights", "import", "fastsam3d", str(other))
    assert refused.exit_code == 4
    assert "already holds 'fastsam3d' with recorded sha256" in _error_line(refused)
    assert "pass --replace" in _error_line(refused)
    assert {p.name: p.read_bytes() for p in (home / "weights").iterdir() if p.is_file()} == before
    replaced = _cli("weights", "import", "fastsam3d", str(other), "--replace", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert (home / "weights" / "FastSAM3D.pth").read_bytes() == other.read_bytes()


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/FastSAM3D.pth", "https:///no-host.pth"])
def test_cli_a_url_override_that_is_not_an_http_url_is_a_bad_setting_exit_2(home, url):
    result = _cli("weights", "download", "fastsam3d", env={weights.url_env_var("fastsam3d"): url})
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"the URL of 'fastsam3d' ({url!r}, from FASTSAM3D_WEIGHTS_URL_FASTSAM3D) is not an http(s) URL" in line
    assert "fix FASTSAM3D_WEIGHTS_URL_FASTSAM3D" in line
    assert _cache_files(home) == []
    # Only a download uses the URL: the typo does not block listing or importing.
    assert _cli("weights", "list", env={weights.url_env_var("fastsam3d"): url}).exit_code == 0


def test_cli_unknown_name_exits_2(home):
    result = _cli("weights", "download", "fastsam")
    assert result.exit_code == 2
    assert "unknown weights name 'fastsam'" in _error_line(result)
