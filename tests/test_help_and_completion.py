"""Issue 15 item 18: --help without Python type placeholders, and one completion story (the shipped scripts)
that completes option values, weight names, and folders where a folder is expected."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from fastsam3d_cli.cli.completion import value_choices
from fastsam3d_cli.model.attention import BACKENDS
from fastsam3d_cli.weights.cache import BUILTIN_REGISTRY
from fastsam3d_cli.weights.loading import DTYPES, MODEL_CHOICES

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = []

    def walk(command, path):
        paths.append(path)
        if hasattr(command, "list_commands"):
            for name in command.list_commands(None):
                walk(command.get_command(None, name), path + [name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "fastsam3d")
def test_help_has_no_python_type_placeholders(path):
    result = CliRunner().invoke(app, [*path, "--help"], env=ENV)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert not re.search(r"<(bool|str|int|float|path|file|list\[|int range|float range)", text, re.IGNORECASE), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage


def test_help_still_shows_value_placeholders_and_flags_have_none():
    text = CliRunner().invoke(app, ["infer", "--help"], env=ENV).stdout
    assert re.search(r"--max-crops\s+INTEGER", text) and re.search(r"--device\s+TEXT", text)
    assert re.search(r"--clicks\s+-c\s+CLICKS_JSON", text)
    assert re.search(r"--overwrite\s+Replace existing outputs", text)  # a flag: no placeholder at all
    assert "Usage: fastsam3d infer [OPTIONS] [VOLUME]" in text  # optional: `infer --batch MANIFEST` takes none


def test_typer_install_completion_is_off():
    result = CliRunner().invoke(app, ["--help"], env=ENV)
    assert "--install-completion" not in result.stdout and "--show-completion" not in result.stdout
    refused = CliRunner().invoke(app, ["--install-completion"], env=ENV)
    assert refused.exit_code == 2
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "completions/" in readme and "--install-completion" in readme


def test_value_choices_come_from_the_code_that_checks_them():
    assert value_choices(["infer"], "--model") == list(MODEL_CHOICES) + ["bundled"]
    assert value_choices(["infer"], "--attention") == list(BACKENDS)
    assert "sparse" not in value_choices(["train"], "--attention")
    assert value_choices(["benchmark"], "--dtype") == list(DTYPES)
    assert value_choices(["weights", "download"], "") == sorted(BUILTIN_REGISTRY)


def _bash(words: list[str], cwd: Path) -> list[str]:
    script = REPO_ROOT / "completions" / "fastsam3d.bash"
    quoted = " ".join(f"'{w}'" for w in words)
    program = (f"source '{script}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
               "_fastsam3d_completion; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return sorted(line for line in done.stdout.splitlines() if line)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_values_names_and_folders(tmp_path):
    (tmp_path / "data_dir").mkdir()
    (tmp_path / "data_file.nii.gz").write_bytes(b"")
    assert _bash(["fastsam3d", "infer", "--model", ""], tmp_path) == sorted([*MODEL_CHOICES, "bundled"])
    assert _bash(["fastsam3d", "infer", "--attention", "sp"], tmp_path) == ["sparse"]
    assert _bash(["fastsam3d", "infer", "--dtype", "bf"], tmp_path) == ["bfloat16"]
    assert _bash(["fastsam3d", "train", "--device", ""], tmp_path) == ["auto", "cpu", "cuda"]
    assert _bash(["fastsam3d", "weights", "download", ""], tmp_path) == sorted(BUILTIN_REGISTRY)
    # Folders where a folder is expected; files where a file is.
    assert _bash(["fastsam3d", "prepare", "-o", "data"], tmp_path) == ["data_dir"]
    assert _bash(["fastsam3d", "train", "data"], tmp_path) == ["data_dir"]
    assert _bash(["fastsam3d", "infer", "--probabilities", "data"], tmp_path) == ["data_dir"]
    assert _bash(["fastsam3d", "infer", "--checkpoint", "data"], tmp_path) == ["data_dir", "data_file.nii.gz"]


def test_zsh_and_fish_scripts_complete_the_same_values():
    zsh = (REPO_ROOT / "completions" / "_fastsam3d").read_text(encoding="utf-8")
    fish = (REPO_ROOT / "completions" / "fastsam3d.fish").read_text(encoding="utf-8")
    backends = " ".join(BACKENDS)
    assert f":value:({backends})" in zsh and f"-a '{backends}'" in fish
    assert ":folder:_files -/" in zsh and "__fish_complete_directories" in fish
    names = " ".join(sorted(BUILTIN_REGISTRY))
    assert f"'1:name:({names})'" in zsh and f"-a '{names}'" in fish
