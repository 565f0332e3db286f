"""Issue 15 (hardening): inputs found by trying to break every command. Each test feeds the input and checks the
one-line message, the exit code, and that nothing partial or stale is left."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, write

runner = CliRunner()


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastsam3d: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture()
def case(tmp_path) -> Path:
    image, _ = phantom()
    write(image, tmp_path / "v.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"space": "ijk", "objects": [
        {"name": "organ", "label": 1, "points": [[24, 20, 16]], "point_labels": [1]}]}))
    return tmp_path


# ------------------------------------------------------------------ 3: header-only output formats
@pytest.mark.parametrize("name, single", [("mask.mhd", "mask.mha"), ("mask.nhdr", "mask.nrrd"),
                                          ("MASK.MHD", "MASK.mha")])
def test_a_header_only_output_format_is_refused_with_its_single_file_form(case, tiny, name, single):
    """The header pointed at a hidden temporary data file; each --overwrite left another orphan."""
    before = _tree(case)
    result = runner.invoke(app, ["infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"),
                                 "--checkpoint", str(tiny), "-o", str(case / name)], env=CLI_ENV)
    _one_line_error(result, 2, f"output {case / name} is a header-only format", f"as one file: {single}")
    assert _tree(case) == before


def test_the_single_file_forms_write_one_file_each(case, tiny):
    for name in ("mask.mha", "mask.nrrd"):
        result = runner.invoke(app, ["infer", str(case / "v.nii.gz"), "--clicks", str(case / "clicks.json"),
                                     "--checkpoint", str(tiny), "-o", str(case / name), "--overwrite"], env=CLI_ENV)
        assert result.exit_code == 0, result.output
    assert set(_tree(case)) == {"v.nii.gz", "clicks.json", "mask.mha", "mask.nrrd", "mask.json"}
