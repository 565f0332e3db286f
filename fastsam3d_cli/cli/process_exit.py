"""Ending the `fastsam3d` process without the interpreter's teardown.

Once torch is imported, Python's normal exit spends 0.3–0.5 s (2-core CPU) clearing module dictionaries and
running libtorch's static destructors: work that frees memory the operating system frees anyway. A user who runs
`fastsam3d infer` once per volume pays it on every call (issue 15, item 19). `exit_now` keeps everything the
normal exit does that has an effect outside the process — the streams are flushed, non-daemon threads are joined,
`atexit` handlers run (temporary folders, multiprocessing's children, logging) — and then ends the process with
`os._exit`, skipping only the teardown. Every output file is already complete by then: outputs are written to a
temporary file and renamed (imaging/atomic.py), never left to a finaliser.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any


def exit_code_of(code: Any) -> int:
    """The process exit status for a `SystemExit.code`, as Python's own exit computes it (a message: 1)."""
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code % 256
    sys.stderr.write(f"{code}\n")  # sys.exit("message") prints the message and exits with 1
    return 1


def exit_now(code: Any) -> None:
    """Flush, join, run the atexit handlers, then `os._exit(status)`: the normal exit minus the teardown."""
    status = exit_code_of(code)
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # the reader went away (`| head`) or the stream was closed: nothing to keep
            pass
    os._exit(status)
