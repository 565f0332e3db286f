"""atomic_group: several outputs appear together, or none of them."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from fastsam3d_cli.imaging import atomic
from fastsam3d_cli.imaging.atomic import atomic_group


def test_all_outputs_appear_on_success(tmp_path):
    with atomic_group() as group:
        for name in ("a.txt", "b.txt"):
            group.path(tmp_path / name).write_text(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "b.txt").read_text() == "b.txt"


def test_an_error_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_group() as group:
            group.path(tmp_path / "a.txt").write_text("a")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_takes_back_the_ones_before_it(tmp_path, monkeypatch):
    real_replace = os.replace

    def refuse_b(src, dst):
        if str(dst).endswith("b.txt"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", refuse_b)
    with pytest.raises(OSError):
        with atomic_group() as group:
            for name in ("a.txt", "b.txt", "c.txt"):
                group.path(tmp_path / name).write_text(name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals go to the main thread")
def test_ctrl_c_during_the_renames_lands_after_the_last_one(tmp_path, monkeypatch):
    real_replace, renamed = os.replace, []

    def replace_and_interrupt(src, dst):
        if not renamed:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the renames
        real_replace(src, dst)
        renamed.append(dst)

    monkeypatch.setattr(atomic.os, "replace", replace_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_group() as group:
            for name in ("a.txt", "b.txt", "c.txt"):
                group.path(tmp_path / name).write_text(name)
    assert len(renamed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]
