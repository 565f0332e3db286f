"""Start and stop the server: check the host and token, bind the port, load the model, serve until Ctrl-C.

Order matters for the user: a non-loopback host without a token is a usage error (exit 2) before anything
is bound; a port in use is exit 3 naming it, before the (slow) model load; then the model loads (exit 4 on
a bad checkpoint) and the volumes given on the command line are opened. Ctrl-C stops uvicorn gracefully;
the sessions' temporary upload folders are removed.
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fastsam3d_cli.errors import BadInputError, UsageError

LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeOptions:
    volumes: Sequence[Path] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    root: Path | None = None
    token: str | None = None
    model: str | None = None
    checkpoint: Path | None = None
    device: str = "auto"
    attention: str = "auto"
    dtype: str = "float32"
    max_crops: int = 8
    max_sessions: int = 8
    max_memory_mb: float | None = None
    max_upload_mb: float = 1024.0
    offline: bool | None = None


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> None:
    """Everything that can be refused before binding (UsageError exit 2, BadInputError exit 3)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"fastsam3d serve needs {' and '.join(missing)}, which are not installed",
                         "pip install 'fastsam3d-cli[serve]'")
    if not is_loopback(options.host) and not options.token:
        raise UsageError(f"--host {options.host} is reachable from other machines but no --token is set",
                         "give --token SECRET (clients send 'Authorization: Bearer SECRET'), or keep --host "
                         "127.0.0.1")
    if options.token is not None and len(options.token) < 8:
        raise UsageError("--token is shorter than 8 characters", "use a long random token, e.g. from "
                                                               "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
    if not 0 <= int(options.port) <= 65535:
        raise UsageError(f"--port {options.port} is invalid", "use 0..65535 (0 picks a free port)")
    if int(options.max_sessions) < 1:
        raise UsageError(f"--max-sessions {options.max_sessions} is invalid", "use 1 or more")
    from fastsam3d_cli.interactive.infer import check_usage  # --max-crops and the model options, as infer checks them

    check_usage(options.max_crops, None, (options.model, options.dtype, options.attention, options.device))
    if options.max_upload_mb <= 0 or (options.max_memory_mb is not None and options.max_memory_mb <= 0):
        raise UsageError("--max-upload and --max-memory must be positive", "give a size in MB")
    if options.root is not None:
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise BadInputError(f"--root {root} is not a folder", "give an existing folder")
    for volume in options.volumes:
        if not Path(volume).expanduser().is_file():
            raise BadInputError(f"volume {volume} does not exist", "check the path")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (BadInputError exit 3 when the port is taken or the host unknown)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise BadInputError(f"--host {host} is not an address of this machine", "use 127.0.0.1 or an address "
                                                                                "of a network interface") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Small answers (a click's JSON) go out at once: without this, Nagle's algorithm held each one back until
    # the client's delayed ACK, ~40 ms per request on Linux. Accepted connections inherit it on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                            "the port is in use — choose another with --port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def run_server(options: ServeOptions, say: Callable[[str], None] = lambda line: None) -> None:
    """Serve until Ctrl-C (or SIGTERM). Raises FastSAM3DError for anything the user can fix."""
    check_options(options)
    sock = bind(options.host, int(options.port))
    try:
        import uvicorn

        from fastsam3d_cli.serve.app import ServeConfig, create_app
        from fastsam3d_cli.weights.loading import load_inference_model

        say("loading the model")
        loaded = load_inference_model(options.model, options.checkpoint, options.device, options.attention,
                                      options.offline, progress=False, dtype=options.dtype)
        config = ServeConfig(loaded=loaded, root=Path(options.root).expanduser() if options.root else None,
                             token=options.token, max_sessions=options.max_sessions,
                             max_memory_bytes=int(options.max_memory_mb * 2 ** 20) if options.max_memory_mb else None,
                             max_upload_bytes=int(options.max_upload_mb * 2 ** 20), max_crops=options.max_crops)
        app = create_app(config)
        server_state = app.state.server
        for volume in options.volumes:
            session = server_state.open_path(Path(volume).expanduser(), Path(volume).name)
            say(f"opened {volume} as session {session.id}")
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        say(f"serving {loaded.preset} on http://{shown}:{port}/ (API docs: /docs) — Ctrl-C stops")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal: that is the normal way out.
        previous = signal.signal(signal.SIGTERM, _raise_stop) if _main_thread() else None
        try:
            server.run(sockets=[sock])
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            server_state.store.close_all()
        say("stopped")
    finally:
        sock.close()


class _Stop(Exception):
    """SIGTERM after uvicorn's graceful shutdown."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class BackgroundServer:
    """A real uvicorn server on a loopback port in a thread (tests, benchmarks); a context manager.

        with BackgroundServer(config) as url:   # "http://127.0.0.1:PORT"
            httpx.get(url + "/api/info")
    """

    def __init__(self, config: Any, host: str = "127.0.0.1") -> None:
        from fastsam3d_cli.serve.app import create_app

        self.app = create_app(config)
        self.host = host
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def __enter__(self) -> str:
        import uvicorn

        self._sock = bind(self.host, 0)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.__exit__()
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return f"http://{self.host}:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sock is not None:
            self._sock.close()
        self.app.state.server.store.close_all()


def stderr_say(line: str) -> None:
    sys.stderr.write(f"fastsam3d serve: {line}\n")
    sys.stderr.flush()


__all__ = ["BackgroundServer", "ServeOptions", "bind", "check_options", "is_loopback", "run_server", "stderr_say"]
