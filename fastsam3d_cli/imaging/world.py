"""Where world clicks (`ras`/`lps`) land in a volume: through the NIfTI file's own affine.

The README defines a `ras` click as `nii.affine @ [i, j, k, 1]` — nibabel's affine: the sform when
`sform_code > 0`, else the qform when `qform_code > 0`. SimpleITK's geometry can differ from it: it
cannot hold a shear (it takes the closest rotation), it may pick the qform when the two disagree, and for
a file with `qform_code = sform_code = 0` it invents an identity geometry. Clicks placed with that
geometry land voxels away from where the README says. So world clicks on a NIfTI are mapped to a voxel
index with the file's affine (`WorldGeometry.ras_from_ijk`), and from there everything works on voxel
indices; a file without any orientation refuses world clicks (`ijk` clicks still work).

Other formats (NRRD, MHA, ...) have no second geometry: SimpleITK's is the file's (`ras_from_ijk` None).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.volumes import NIFTI_SUFFIXES, affine_ras

WORLD_SPACES = ("ras", "lps")
_SAME_GEOMETRY_MM = 1e-4  # affines closer than this (entrywise) place every click on the same voxel


@dataclass(frozen=True)
class WorldGeometry:
    """How world clicks map to voxels for one volume.

    ras_from_ijk: the file's 4×4 affine when it differs from SimpleITK's geometry (None: the image's own
    geometry is the file's). source: "sform", "qform" or "image". refusal: why world clicks cannot be
    placed (None when they can). notes: sidecar warnings about the choice that was made.
    """

    ras_from_ijk: np.ndarray | None = None
    source: str = "image"
    refusal: str | None = None
    notes: tuple[str, ...] = ()

    def check_space(self, space: str) -> None:
        """BadInputError (exit 3) when `space` is a world space and this volume has no world geometry."""
        if self.refusal is not None and space in WORLD_SPACES:
            raise BadInputError(f"{self.refusal}, so {space} clicks have no defined position",
                                "give the clicks in ijk (voxel index) or fix the file's qform/sform")


IMAGE_GEOMETRY = WorldGeometry()


def nifti_header(path: str | Path | None, image: Any) -> Any:
    """The NIfTI header of `path` when it is a NIfTI that nibabel reads on `image`'s voxel grid, else None."""
    if path is None or not str(path).lower().endswith(NIFTI_SUFFIXES):
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - SimpleITK read the file; nibabel cannot add anything
        return None
    if tuple(int(v) for v in header.get_data_shape()[:3]) != tuple(image.GetSize()):
        return None
    return header


def world_geometry(path: str | Path | None, image: Any, header: Any = None) -> WorldGeometry:
    """The world geometry of `image` read from `path`: from the NIfTI header for a NIfTI, else the image's own.

    `header`: the file's header when the caller already read it with `nifti_header` (read here otherwise).
    """
    if header is None:
        header = nifti_header(path, image)
    if header is None:
        return geometry_from_metadata(image)
    return _from_codes(int(header["qform_code"]), int(header["sform_code"]),
                       lambda: header.get_qform(), lambda: header.get_sform(), image, str(path))


def geometry_from_metadata(image: Any) -> WorldGeometry:
    """For an image already in memory: SimpleITK keeps the NIfTI codes as metadata; both 0 → refusal.

    (The metadata's affine rows are rounded to 6 digits, so they are not used to place clicks; read the
    file with `world_geometry` for the exact affine.)
    """
    keys = set(image.GetMetaDataKeys()) if hasattr(image, "GetMetaDataKeys") else set()
    if {"qform_code", "sform_code"} <= keys:
        try:
            codes = int(image.GetMetaData("qform_code")), int(image.GetMetaData("sform_code"))
        except ValueError:
            return IMAGE_GEOMETRY
        if codes == (0, 0):
            return _no_orientation("the volume")
    return IMAGE_GEOMETRY


def _from_codes(qform_code: int, sform_code: int, qform: Any, sform: Any, image: Any, name: str) -> WorldGeometry:
    if qform_code == 0 and sform_code == 0:
        return _no_orientation(f"NIfTI {name}")
    source = "sform" if sform_code > 0 else "qform"
    affine = np.asarray(sform() if source == "sform" else qform(), dtype=np.float64)
    linear = affine[:3, :3]
    if abs(np.linalg.det(linear)) < 1e-12:
        return WorldGeometry(None, source, f"the {source} of NIfTI {name} is singular", ())
    notes = []
    if qform_code > 0 and sform_code > 0 and not np.allclose(qform(), sform(), atol=1e-3, rtol=0):
        notes.append("the input's qform and sform differ; world (ras/lps) clicks were placed with the sform, "
                     "as nibabel and the README's ras definition do (nii.affine @ [i, j, k, 1]); to use the "
                     "qform instead, set sform_code to 0 in the file, or give ijk clicks; both are kept "
                     "unchanged in the output")
    columns = linear / np.linalg.norm(linear, axis=0)
    if not np.allclose(columns.T @ columns, np.eye(3), atol=1e-4):
        notes.append(f"the input's {source} is sheared; world (ras/lps) clicks were placed through it exactly "
                     "(nii.affine @ [i, j, k, 1]); the model saw the volume on the closest unsheared grid")
    if np.allclose(affine, affine_ras(image), atol=_SAME_GEOMETRY_MM, rtol=0):
        return WorldGeometry(None, source, None, tuple(notes))
    return WorldGeometry(affine, source, None, tuple(notes))


def _no_orientation(what: str) -> WorldGeometry:
    return WorldGeometry(None, "none", f"{what} has no orientation (qform_code = sform_code = 0)",
                         ("the input has no orientation (qform_code = sform_code = 0): the ras/lps click "
                          "positions in this report use SimpleITK's default geometry and mean nothing",))
