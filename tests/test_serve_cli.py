"""`fastsam3d serve` on the command line: refusals before binding (exit 2), a port in use (exit 3), a missing
--root (exit 3), each one line on stderr; and a real server process that Ctrl-C stops cleanly (exit 0, its
upload folders removed)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, write

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsam3d: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def no_bind(monkeypatch):
    """Fail the test if the server tries to bind."""
    import fastsam3d_cli.serve.server as server

    def refuse(*args, **kwargs):
        raise AssertionError("bind() was called")

    monkeypatch.setattr(server, "bind", refuse)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_non_loopback_host_without_token_is_exit_2_before_binding(no_bind, host):
    result = runner.invoke(app, ["serve", "--host", host, "--port", "0"], env=CLI_ENV)
    _one_line_error(result, 2, f"--host {host}", "--token")


def test_without_the_serve_extra_the_fix_is_named(no_bind, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    _one_line_error(runner.invoke(app, ["serve"], env=CLI_ENV), 2, "uvicorn", "fastsam3d-cli[serve]")


def test_short_token_and_bad_limits_are_usage_errors(no_bind):
    _one_line_error(runner.invoke(app, ["serve", "--token", "abc"], env=CLI_ENV), 2, "--token", "8 characters")
    _one_line_error(runner.invoke(app, ["serve", "--max-upload", "0"], env=CLI_ENV), 2, "--max-upload")


@pytest.mark.parametrize(("args", "fragment"), [(["--dtype", "foo"], "--dtype 'foo'"), (["--device", "gpu7"], "device 'gpu7'"),
                                              (["--attention", "x"], "attention backend 'x'"),
                                              (["--model", "nope"], "model 'nope'")])
def test_bad_model_options_are_usage_errors_before_binding(no_bind, args, fragment):
    _one_line_error(runner.invoke(app, ["serve", *args], env=CLI_ENV), 2, fragment)


def test_missing_root_or_volume_is_exit_3(no_bind, tmp_path):
    _one_line_error(runner.invoke(app, ["serve", "--root", str(tmp_path / "nope")], env=CLI_ENV), 3,
                    "--root", "not a folder")
    _one_line_error(runner.invoke(app, ["serve", str(tmp_path / "ct.nii.gz")], env=CLI_ENV), 3,
                    "ct.nii.gz", "does not exist")


def test_port_in_use_is_exit_3_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--checkpoint", str(tmp_path / "none.pth")],
                               env=CLI_ENV)
    _one_line_error(result, 3, f"127.0.0.1:{port}", "--port")


def test_a_real_server_process_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pth")
    image, _ = phantom()
    volume = write(image, tmp_path / "v.nii.gz")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, **CLI_ENV, "TMPDIR": str(temp), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fastsam3d_cli", "serve", str(volume), "--checkpoint",
                                str(checkpoint), "--device", "cpu", "--port", "0", "--max-crops", "1"],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url, "".join(lines)
        sessions = httpx.get(f"{url}/api/sessions", timeout=30).json()["sessions"]
        assert [s["name"] for s in sessions] == ["v.nii.gz"]
        upload = httpx.post(f"{url}/api/sessions", params={"filename": "u.nii.gz"}, content=volume.read_bytes(),
                            timeout=60)
        assert upload.status_code == 201, upload.text
        assert any(p.name.startswith("fastsam3d-serve-") for p in temp.iterdir())
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err and "error" not in err
    assert not any(p.name.startswith("fastsam3d-serve-") for p in temp.iterdir())
