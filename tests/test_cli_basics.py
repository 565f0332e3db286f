"""`fastsam3d --version`, `--help`, the documented exit codes, and the generated completion scripts."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastsam3d_cli import __version__
from fastsam3d_cli.cli import COMMAND_MODULES, app
from fastsam3d_cli.cli.completion import completion_scripts
from fastsam3d_cli.errors import BadInputError, ExitCode, WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_version_reports_package_torch_cuda_and_flash_attn(cli_env):
    result = CliRunner().invoke(app, ["--version"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert f"fastsam3d: {__version__}" in result.output
    assert re.search(r"^torch: \d+\.\d+", result.output, re.M)
    assert re.search(r"^cuda: (available|not available)", result.output, re.M)
    assert re.search(r"^flash-attn: ", result.output, re.M)
    assert "[flash]" in result.output or "(installed)" in result.output  # install hint is not eaten by markup


def test_help_lists_every_subcommand_with_a_description(cli_env):
    result = CliRunner().invoke(app, ["--help"], env=cli_env)
    assert result.exit_code == 0
    for name in COMMAND_MODULES:
        line = next((ln for ln in result.output.splitlines() if re.search(rf"│ {name}\s", ln)), None)
        assert line is not None, f"{name} missing from --help"
        assert len(line.split(name, 1)[1].strip(" │")) > 10, f"{name} has no description"


def test_console_script_runs_from_a_fresh_process():
    """The installed entry point works (what a user types), and `python -m fastsam3d_cli` too."""
    exe = shutil.which("fastsam3d") or str(Path(sys.executable).parent / "fastsam3d")
    for command in ([exe, "--help"], [sys.executable, "-m", "fastsam3d_cli", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "infer" in done.stdout


def test_unknown_option_is_a_usage_error(cli_env):
    result = CliRunner().invoke(app, ["--no-such-option"], env=cli_env)
    assert result.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("args, problem, command", [
    (["--no-such-option"], "No such option: --no-such-option", "fastsam3d"),
    (["no-such-command"], "No such command 'no-such-command'", "fastsam3d"),
    (["infer"], "Missing argument 'VOLUME'", "fastsam3d infer"),
    (["infer", "ct.nii.gz"], "Missing option '--clicks' / '-c'", "fastsam3d infer"),
    (["infer", "ct.nii.gz", "-c", "c.json", "--max-crops", "0"], "Invalid value for '--max-crops'", "fastsam3d infer"),
    (["weights", "import"], "Missing argument 'NAME'", "fastsam3d weights import"),
    (["train", "prepared", "--epochs", "many"], "Invalid value for '--epochs'", "fastsam3d train"),
])
def test_command_line_mistakes_end_with_one_line(args, problem, command, cli_env, tmp_path, monkeypatch):
    """Click's own usage errors follow the documented format: one line naming the problem and where help is."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args, env=cli_env)
    assert result.exit_code == ExitCode.USAGE, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"fastsam3d: error: {problem} — see '{command} --help'"] or (
        len(lines) == 1 and lines[0].startswith(f"fastsam3d: error: {problem}")
        and lines[0].endswith(f" — see '{command} --help'")), result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("columns", [None, "60"])
def test_tables_keep_their_width_when_piped_unless_columns_is_set(columns, tmp_path):
    """Piped into a file or `tee`, a table is not cut to 80 columns (Rich's guess); COLUMNS still rules."""
    import os

    home = tmp_path / "a-rather-long-cache-folder-name-that-pushes-the-table-past-eighty-columns"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"FASTSAM3D_HOME": str(home)}
    if columns:
        env["COLUMNS"] = columns
    exe = shutil.which("fastsam3d") or str(Path(sys.executable).parent / "fastsam3d")
    done = subprocess.run([exe, "weights", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    whole_path = str(home / "weights" / "FastSAM3D.pth")
    if columns:
        assert all(len(line) <= 60 for line in rows) and not any(whole_path in line for line in rows)
        # the shipped model's sha256 stays whole at 60 columns: folded over lines, never cut with "…"
        from fastsam3d_cli.weights import bundled

        cells = "".join(line.replace("│", "").replace(" ", "") for line in rows)
        assert bundled.installed().sha256 in cells, done.stdout
    else:
        cache_rows = [line for line in rows if str(home) in line]  # the shipped bundled model has its own table
        assert len(cache_rows) == 2 and any(whole_path in line for line in cache_rows), done.stdout
        assert "…" not in done.stdout


def test_a_bare_group_still_shows_its_help(cli_env):
    for args in ([], ["weights"]):
        result = CliRunner().invoke(app, args, env=cli_env)
        assert result.exit_code in (ExitCode.OK, ExitCode.USAGE)  # Click < 8.2 exits 0 here, 8.2+ exits 2
        assert "Usage: fastsam3d" in result.stdout and result.stderr == ""


def test_exit_codes_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 130]
    assert BadInputError("x").exit_code == 3 and WeightsError("x").exit_code == 4
    readme = (REPO_ROOT / "README.md").read_text()
    for code in ExitCode:
        assert re.search(rf"\|\s*`?{int(code)}`?\s*\|", readme), f"exit code {int(code)} not documented in README"


def test_error_message_is_one_line_with_the_fix():
    error = BadInputError("click 2 of 'liver' is outside the volume\n", fix="use ijk within the image")
    assert error.one_line() == "click 2 of 'liver' is outside the volume — use ijk within the image"


@pytest.mark.parametrize("name", ["fastsam3d.bash", "_fastsam3d", "fastsam3d.fish"])
def test_completion_scripts_are_current(name):
    """completions/ must equal what the current app generates (python -m fastsam3d_cli.cli.completion)."""
    expected = completion_scripts()[name]
    committed = (REPO_ROOT / "completions" / name).read_text(encoding="utf-8")
    assert committed == expected, "completions/ is stale: run `python -m fastsam3d_cli.cli.completion completions/`"


def _bash_complete(words: list[str]) -> list[str]:
    script = REPO_ROOT / "completions" / "fastsam3d.bash"
    quoted = " ".join(f"'{w}'" for w in words)
    program = (f"source '{script}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
               "_fastsam3d_completion; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completion_completes_commands_subcommands_and_options():
    assert "infer" in _bash_complete(["fastsam3d", "in"])
    assert _bash_complete(["fastsam3d", "weights", "dow"]) == ["download"]
    assert "--clicks" in _bash_complete(["fastsam3d", "infer", "--cli"])


def test_python_api_is_importable_from_the_package():
    import fastsam3d_cli
    from fastsam3d_cli.training.distill import distill
    from fastsam3d_cli.training.train import train
    from fastsam3d_cli.training.validate import validate

    for name in ("Predictor", "infer_file", "prepare_datasets", "list_prepared_samples", "run_benchmark",
                 "resolve_weights", "build_model", "load_model"):
        assert callable(getattr(fastsam3d_cli, name)), name
    assert all(callable(f) for f in (train, validate, distill))
    with pytest.raises(AttributeError):
        fastsam3d_cli.no_such_thing  # noqa: B018
