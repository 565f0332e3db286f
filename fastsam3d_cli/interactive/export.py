"""`infer`'s outputs beyond the labelmap: DICOM-SEG (`-o mask.dcm` / `--format dicom-seg`) and meshes (`--mesh`).

Everything is validated before the model runs (usage: exit 2; locations: exit 3), and written into the same
all-or-nothing group as the labelmap and sidecar. The NIfTI labelmap is always written too: with
`-o mask.dcm` it is `mask.nii.gz`, the sidecar `mask.json`, the DICOM-SEG `mask.dcm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastsam3d_cli.errors import BadInputError, UsageError

FORMATS = ("labelmap", "dicom-seg")
MESH_FORMATS = ("stl", "obj")
DICOM_SUFFIX = ".dcm"


def labelmap_and_format(volume: Path, output: Path | None, output_format: str | None) -> tuple[Path | None, bool]:
    """(labelmap output to plan, whether a DICOM-SEG is wanted); UsageError for a contradiction.

    `-o mask.dcm` means DICOM-SEG `mask.dcm` + labelmap `mask.nii.gz`. DICOM-SEG needs a DICOM input.
    The default output of a DICOM folder is `<folder name>_mask.nii.gz` beside the folder (also for `.`).
    """
    from fastsam3d_cli.imaging.dicom import is_dicom_input

    if output_format is not None and output_format not in FORMATS:
        raise UsageError(f"--format {output_format} is unknown", f"use one of {', '.join(FORMATS)}")
    dcm_output = output is not None and Path(output).name.lower().endswith(DICOM_SUFFIX)
    if dcm_output and output_format == "labelmap":
        raise UsageError(f"-o {output} is a DICOM file but --format is labelmap",
                         "drop --format, or give -o a NIfTI name (e.g. mask.nii.gz)")
    want_seg = dcm_output or output_format == "dicom-seg"
    if output is None and Path(volume).is_dir():  # `infer .` in the series folder: beside it, by its real name
        folder = Path(volume).expanduser().resolve()
        output = folder.with_name(f"{folder.name}_mask.nii.gz")
    if not want_seg:
        return output, False
    if not is_dicom_input(volume):
        raise UsageError(f"DICOM-SEG output needs a DICOM series as input, and {volume} is an image file",
                         "drop --format dicom-seg / the .dcm output name (the labelmap is NIfTI), or give the "
                         "DICOM folder")
    from fastsam3d_cli.imaging.dicom_seg import require_highdicom

    require_highdicom()
    if dcm_output:
        output = Path(output).with_name(Path(output).name[: -len(DICOM_SUFFIX)] + ".nii.gz")
    return output, True


@dataclass
class ExtraOutputs:
    """Planned DICOM-SEG file and mesh folder (None when not asked for)."""

    dicom_seg: Path | None
    mesh_dir: Path | None
    stem: str  # the labelmap's file name without its image suffix: the outputs' common stem
    mesh_format: str = "stl"
    mesh_paths: dict[str, Path] = field(default_factory=dict)  # object name → mesh path, once objects are known
    created_dirs: list[Path] = field(default_factory=list)


def plan_extra_outputs(labelmap: Path, stem: str, want_seg: bool, mesh: str | Path | None, overwrite: bool,
                       inputs: Sequence[tuple[Path, str]], mesh_format: str = "stl") -> ExtraOutputs:
    """Check where the DICOM-SEG (`<stem>.dcm` beside the labelmap) and the meshes go (nothing written)."""
    from fastsam3d_cli.imaging.atomic import check_output_folder, check_output_path

    if mesh_format not in MESH_FORMATS:
        raise UsageError(f"--mesh-format {mesh_format} is unknown", f"use one of {', '.join(MESH_FORMATS)}")

    seg = None
    if want_seg:
        seg = check_output_path(labelmap.with_name(stem + DICOM_SUFFIX), overwrite,
                                "DICOM-SEG output (always <output stem>.dcm)", "-o", inputs)
    mesh_dir = None
    if mesh is not None:
        from fastsam3d_cli.imaging.mesh import require_scikit_image

        require_scikit_image()
        mesh_dir = check_output_folder(Path(mesh), "--mesh")
    return ExtraOutputs(seg, mesh_dir, stem, mesh_format)


def mesh_path(folder: Path, stem: str, label: int, name: str, mesh_format: str = "stl") -> Path:
    """`<folder>/<labelmap stem>_<label>_<name>.stl` (or `.obj`)."""
    from fastsam3d_cli.imaging.clickfile import safe_file_part

    return folder / f"{stem}_{label}_{safe_file_part(name)}.{mesh_format}"


def check_mesh_paths(extras: ExtraOutputs, objects: Sequence[Any], overwrite: bool,
                     inputs: Sequence[tuple[Path, str]]) -> None:
    """Every object's mesh may be written (an existing one only with --overwrite, never an input)."""
    from fastsam3d_cli.imaging.atomic import check_output_path

    if extras.mesh_dir is None:
        return
    for obj in objects:
        path = mesh_path(extras.mesh_dir, extras.stem, obj.label, obj.name, extras.mesh_format)
        if extras.mesh_dir.is_dir():
            check_output_path(path, overwrite, "mesh", "--mesh", inputs)
        extras.mesh_paths[obj.name] = path


def describe(extras: ExtraOutputs, result: dict[str, Any], dicom: Any, objects: Sequence[Any]) -> None:
    """Add the DICOM input and the extra outputs to the sidecar."""
    if dicom is not None:
        result["input"]["dicom"] = {"series_uid": dicom.uid, "series_description": dicom.description,
                                    "modality": dicom.modality, "files": len(dicom.files)}
    outputs = result["outputs"]
    outputs["dicom_seg"] = str(extras.dicom_seg) if extras.dicom_seg else None
    if extras.dicom_seg:
        outputs["dicom_seg_segments"] = [{"segment_number": n, "label": o.label, "name": o.name}
                                         for n, o in enumerate(objects, start=1)]
    outputs["meshes"] = ({o.name: str(extras.mesh_paths[o.name]) for o in objects
                          if result_voxels(result, o.name)} if extras.mesh_dir else None)


def result_voxels(result: dict[str, Any], name: str) -> int:
    return next((o["voxels"] for o in result["objects"] if o["name"] == name), 0)


def write_extra_outputs(group: Any, extras: ExtraOutputs, labels: np.ndarray, image: Any, dicom: Any,
                        objects: Sequence[Any], loaded: Any, result: dict[str, Any]) -> None:
    """Write the DICOM-SEG and meshes into `group` (temporary files renamed with the others)."""
    if extras.dicom_seg is not None:
        from fastsam3d_cli import __version__
        from fastsam3d_cli.imaging.dicom_seg import AlgorithmSpec, SegmentSpec, write_dicom_seg
        from fastsam3d_cli.interactive.preview import OUTLINE_COLOURS

        segments = [SegmentSpec(o.label, o.name, OUTLINE_COLOURS[n % len(OUTLINE_COLOURS)])
                    for n, o in enumerate(objects)]
        algorithm = AlgorithmSpec("fastsam3d", __version__, str(loaded.preset),
                                  str(loaded.weights_name or Path(str(loaded.checkpoint)).name),
                                  str(loaded.checkpoint_sha256 or "-"))
        result["warnings"].extend(write_dicom_seg(group.path(extras.dicom_seg), labels, dicom, segments, algorithm))
    if extras.mesh_dir is not None:
        from fastsam3d_cli.imaging.mesh import surface_lps, write_obj, write_stl

        writer = write_obj if extras.mesh_format == "obj" else write_stl

        if not extras.mesh_dir.exists():
            extras.mesh_dir.mkdir()
            extras.created_dirs.append(extras.mesh_dir)
        for obj in objects:
            if not result_voxels(result, obj.name):
                result["warnings"].append(f"object '{obj.name}' is empty: no mesh written")
                continue
            vertices, faces = surface_lps(labels == obj.label, image)
            writer(group.path(extras.mesh_paths[obj.name]), vertices, faces)


def remove_created_dirs(extras: ExtraOutputs | None) -> None:
    """After a failure: remove the (then empty) folders this run created."""
    for folder in (extras.created_dirs if extras else []):
        try:
            folder.rmdir()
        except OSError:
            pass


def read_input(path: Path, channel: int | None, series: str | None) -> tuple[Any, Any]:
    """(image, DicomSeries or None): a folder / .zip is a DICOM series, anything else an image file."""
    from fastsam3d_cli.imaging.dicom import is_dicom_input, read_dicom
    from fastsam3d_cli.imaging.volumes import read_image

    if is_dicom_input(path):
        if channel not in (None, 0):
            raise BadInputError(f"--channel {channel} does not exist in DICOM series {path}: it has one channel",
                                "drop --channel")
        dicom = read_dicom(path, series)
        return dicom.image, dicom
    if series is not None:
        raise UsageError(f"--series {series} is for DICOM input, and {path} is an image file",
                         "drop --series, or give the DICOM folder or .zip")
    return read_image(path, channel, strict_channel=True), None
