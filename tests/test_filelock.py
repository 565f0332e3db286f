"""OwnerLock: breaking a stale lock never removes a fresh one taken in the meantime."""
from __future__ import annotations

import json
import os
import socket

from fastsam3d_cli.imaging import filelock
from fastsam3d_cli.imaging.filelock import OwnerLock

DEAD_PID = 2 ** 22 + 12345


def _write_lock(path, pid: int, since: float = 0.0) -> tuple:
    holder = {"pid": pid, "host": socket.gethostname(), "since": since}
    path.write_text(json.dumps(holder))
    return OwnerLock(path)._identity(path, holder)


def test_a_stale_lock_is_broken_and_taken(tmp_path):
    path = tmp_path / ".x.lock"
    _write_lock(path, DEAD_PID)
    with OwnerLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_fresh_lock_that_replaced_the_stale_one_is_put_back(tmp_path, monkeypatch):
    """Waiters A and B both judge the dead holder's lock stale; B breaks it and takes the lock first. A's
    rename then catches B's fresh lock: it must restore it, not delete it."""
    path = tmp_path / ".x.lock"
    stale = _write_lock(path, DEAD_PID)
    path.unlink()  # B broke the stale lock ...
    fresh = tmp_path / "fresh"
    _write_lock(fresh, os.getpid(), since=1.5)  # ... and took the lock (the file system may reuse the inode)
    os.rename(fresh, path)
    OwnerLock(path)._break(stale)  # A acts on its outdated judgement
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.lock"]  # no grave file left


def test_breaking_the_stale_lock_itself_removes_it(tmp_path):
    path = tmp_path / ".x.lock"
    stale = _write_lock(path, DEAD_PID)
    OwnerLock(path)._break(stale)
    assert list(tmp_path.iterdir()) == []
    OwnerLock(path)._break(stale)  # already gone: nothing happens
    assert filelock.LOCK_STALE_S > filelock.LOCK_HEARTBEAT_S
