"""A lock file that records its owner, so waiters can tell a live holder from a dead one.

Used by the weights cache: two processes downloading the same checkpoint must not write the same file.
Works across processes, threads and hosts sharing a file system (O_CREAT|O_EXCL plus a heartbeat).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_POLL_S = 0.1
LOCK_HEARTBEAT_S = 5.0  # a lock holder refreshes the lock file's mtime this often ...
LOCK_STALE_S = 60.0  # ... so a lock untouched for this long belongs to a dead process


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; rely on the heartbeat age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """An exclusive lock file created with O_CREAT|O_EXCL (works across processes and threads).

    The holder writes its pid/host into it and refreshes its mtime every few seconds. A waiter breaks
    the lock when its holder is a dead process on this host, or when it has not been refreshed for
    LOCK_STALE_S (a holder that died on another host of a shared file system).
    """

    def __init__(self, path: Path, on_wait: Optional[Callable[[dict], None]] = None,
                 on_error: Optional[Callable[[OSError], Exception]] = None) -> None:
        self.path = path
        self.on_wait = on_wait  # called once with the holder's {pid, host, since} when we have to wait
        self.on_error = on_error  # turns an OSError creating the lock into the caller's own error
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def __enter__(self) -> "OwnerLock":
        announced = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = self._stale_identity(holder)
                if stale is not None:
                    self._break(stale)
                    continue
                if self.on_wait and not announced:
                    self.on_wait(holder)
                    announced = True
                time.sleep(LOCK_POLL_S)
                continue
            except OSError as exc:
                if self.on_error is None:
                    raise
                raise self.on_error(exc) from None
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, handle)
            break
        self._heartbeat = threading.Thread(target=self._beat, name="fastsam3d-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # gone, or being written right now
            return {}
        return holder if isinstance(holder, dict) else {}

    def _identity(self, path: Path, holder: dict) -> tuple:
        status = path.stat()
        return status.st_ino, status.st_mtime_ns, json.dumps(holder, sort_keys=True)

    def _stale_identity(self, holder: dict) -> Optional[tuple]:
        """(inode, mtime, holder) of the lock file if it is stale (dead holder or no heartbeat), else None."""
        try:
            identity = self._identity(self.path, holder)
        except FileNotFoundError:
            return None  # released meanwhile; the next attempt takes it
        if time.time() - identity[1] / 1e9 > LOCK_STALE_S:
            return identity
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return identity
        return None

    def _break(self, stale: tuple) -> None:
        """Remove the stale lock file judged by `stale` (its inode, mtime and holder). Renamed first, so two
        waiters cannot both delete it; if what was renamed is not that file (a second waiter broke it and
        took the lock in between, or its holder refreshed it), it is put back."""
        grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{threading.get_ident()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        try:
            try:
                holder = json.loads(grave.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            if self._identity(grave, holder if isinstance(holder, dict) else {}) != stale:
                try:
                    os.link(grave, self.path)  # atomic: never replaces a lock created meanwhile
                except FileExistsError:
                    pass
                except OSError:  # a file system without hard links
                    if not self.path.exists():
                        os.rename(grave, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                grave.unlink()
