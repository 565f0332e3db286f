"""Builders for the DICOM tests: variants of the real validation series written with pydicom. No tests here.

`write_variant` re-writes the real CT series (data/validation/abdomen_ct_dicom, read-only) into a temporary
folder as uncompressed files with fresh UIDs, optionally cropped in-plane, with the rows flipped (column
direction reversed, so the image's j and k axes point the other way) or rotated (oblique): the pixels keep
their physical meaning, only the way they are stored changes.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def source_slices(series_dir: Path) -> list[pydicom.Dataset]:
    """The real series' files, decoded, sorted by z (inferior first)."""
    slices = [pydicom.dcmread(str(p)) for p in sorted(series_dir.iterdir())]
    return sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * k @ k


def write_variant(slices: Sequence[pydicom.Dataset], folder: Path, *, crop: tuple[int, int, int, int] | None = None,
                  flip_rows: bool = False, rotate: np.ndarray | None = None, centre: Sequence[float] = (0, 0, 0),
                  series_uid: str | None = None, study_uid: str | None = None, description: str = "variant",
                  order: Sequence[int] | None = None) -> list[Path]:
    """Write `slices` (see source_slices) as a new series in `folder`; returns the file paths.

    crop: (row0, row1, col0, col1). flip_rows: store rows bottom-up (column direction negated).
    rotate: 3×3 rotation about `centre` applied to every position and orientation (an oblique series).
    order: which slices to write (indices), e.g. to drop one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for index in (order if order is not None else range(len(slices))):
        source = slices[index]
        pixels = source.pixel_array.copy()
        row_dir = np.array([float(v) for v in source.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in source.ImageOrientationPatient[3:]])
        row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
        position = np.array([float(v) for v in source.ImagePositionPatient])
        if crop is not None:
            r0, r1, c0, c1 = crop
            pixels = pixels[r0:r1, c0:c1]
            position = position + r0 * row_spacing * col_dir + c0 * col_spacing * row_dir
        if flip_rows:
            position = position + (pixels.shape[0] - 1) * row_spacing * col_dir
            pixels = pixels[::-1]
            col_dir = -col_dir
        if rotate is not None:
            centre_v = np.asarray(centre, dtype=float)
            position = rotate @ (position - centre_v) + centre_v
            row_dir, col_dir = rotate @ row_dir, rotate @ col_dir
        ds = copy.deepcopy(source)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesDescription, ds.SeriesNumber = description, 7
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in np.concatenate([row_dir, col_dir])]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW"
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f"slice_{len(paths):03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_structured_report(path: Path, series_uid: str | None = None) -> Path:
    """A minimal Basic Text SR (no pixels): a non-image series."""
    sr_class = "1.2.840.10008.5.1.4.1.1.88.11"
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sr_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = sr_class
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesDescription = "report"
    ds.ValueType = "CONTAINER"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path
