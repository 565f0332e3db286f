"""Open sessions, least recently used first out: at most `max_sessions`, and about `max_bytes` of memory.

An evicted (or closed) id is remembered, so a client asking for it gets 410 "was closed" rather than a
puzzling 404. Every use of a session goes through `use(id)`, which holds the session's lock: requests on one
session run one after another; sessions in use are never evicted.
"""
from __future__ import annotations

import contextlib
import secrets
import shutil
import threading
from collections import OrderedDict
from typing import Callable, Iterator

from fastsam3d_cli.serve.errors import ApiError
from fastsam3d_cli.serve.session import Session

FORGET_AFTER = 10_000  # closed ids remembered (for the 410 message)


class SessionStore:
    def __init__(self, max_sessions: int = 8, max_bytes: int | None = None) -> None:
        self.max_sessions = max(1, int(max_sessions))
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._closed: OrderedDict[str, str] = OrderedDict()  # id → why it is gone
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def add(self, make: Callable[[str], Session]) -> Session:
        """Create a session with `make(id)` (outside the store lock: it reads a volume), then admit it."""
        session = make(self.new_id())
        with self._lock:
            self._sessions[session.id] = session
            self._evict_locked(keep=session.id)
        return session

    @contextlib.contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """The session, locked for this request (404 unknown id, 410 evicted or closed)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                if session_id in self._closed:
                    raise ApiError(410, f"session {session_id} {self._closed[session_id]}; open the volume again")
                raise ApiError(404, f"no session {session_id}")
            self._sessions.move_to_end(session_id)
            self._busy[session_id] = self._busy.get(session_id, 0) + 1
        try:
            with session.lock:
                if session_id in self._closed:  # closed while this request waited for the lock
                    raise ApiError(410, f"session {session_id} {self._closed[session_id]}; open the volume again")
                try:
                    yield session
                finally:  # measured while the session is locked; eviction reads only this number
                    session.bytes_estimate = session.approximate_bytes()
        finally:
            with self._lock:
                self._busy[session_id] -= 1
                if not self._busy[session_id]:
                    del self._busy[session_id]
                self._evict_locked(keep=session_id)

    def close(self, session_id: str) -> None:
        with self.use(session_id) as session:
            with self._lock:
                self._drop_locked(session, "was closed")

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def close_all(self) -> None:
        with self._lock:
            for session in list(self._sessions.values()):
                self._drop_locked(session, "was closed when the server stopped")

    def _evict_locked(self, keep: str) -> None:
        """Drop idle sessions, least recently used first, until the limits hold (never `keep` or a busy one)."""
        def over() -> bool:
            if len(self._sessions) > self.max_sessions:
                return True
            if self.max_bytes is None:
                return False
            return sum(s.bytes_estimate for s in self._sessions.values()) > self.max_bytes

        for session_id in list(self._sessions):
            if not over():
                return
            if session_id == keep or session_id in self._busy:
                continue
            why = ("was closed to stay within --max-sessions (least recently used)"
                   if len(self._sessions) > self.max_sessions else
                   "was closed to stay within --max-memory (least recently used)")
            self._drop_locked(self._sessions[session_id], why)

    def _drop_locked(self, session: Session, why: str) -> None:
        self._sessions.pop(session.id, None)
        self._closed[session.id] = why
        while len(self._closed) > FORGET_AFTER:
            self._closed.popitem(last=False)
        if session.owned_dir is not None:
            shutil.rmtree(session.owned_dir, ignore_errors=True)
