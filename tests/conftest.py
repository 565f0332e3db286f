"""Shared test fixtures: where the golden data and the real example data live, CLI runner settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """`FASTSAM3D_GOLDEN_DIR` (default ../shared/golden). Missing: skip locally, FAIL under CI=true."""
    path = Path(os.environ.get("FASTSAM3D_GOLDEN_DIR", SHARED_DIR / "golden"))
    if not (path / "weights_rule.py").exists():
        message = f"golden reference folder not found at {path} (set FASTSAM3D_GOLDEN_DIR)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`FASTSAM3D_DATA_DIR` (default ../shared/data): real example data, read-only."""
    path = Path(os.environ.get("FASTSAM3D_DATA_DIR", SHARED_DIR / "data"))
    if not path.is_dir():
        message = f"example data folder not found at {path} (set FASTSAM3D_DATA_DIR)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture()
def cli_env() -> dict[str, str]:
    """Environment for typer.testing.CliRunner: no colours, wide lines, plain tracebacks."""
    return {"NO_COLOR": "1", "COLUMNS": "200", "_TYPER_STANDARD_TRACEBACK": "1", "TERM": "dumb"}


@pytest.fixture()
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than two fighting over a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """Tests of Ctrl-C handling need Python's own SIGINT handler. A shell that starts pytest as a background
    job (`pytest &`) makes it ignore SIGINT, and the command subprocesses the tests start inherit that; so
    the default handler is installed for the session (exec'd children then get the default again)."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)
