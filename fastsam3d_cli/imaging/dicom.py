"""Reading one DICOM series (a folder or a .zip of files) as one 3D image with its exact geometry.

SimpleITK's series reader decodes the pixels; the slice order and the geometry are checked here first from
the headers (pydicom), because the series reader silently builds a wrong volume from slices with uneven
spacing, missing slices, mixed orientations or a localiser among them. Each of those is a `BadInputError`
(exit 3) naming the problem. Geometry is LPS, as DICOM and ITK use it: voxel (i, j, k) is column i, row j of
slice k, slices sorted along the normal row × column, so the image's direction is (row, column, normal).
"""
from __future__ import annotations

import hashlib
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.errors import BadInputError
from fastsam3d_cli.imaging.digest import sha256_file

LOCALISER_WORDS = ("LOCALIZER", "LOCALISER", "SCOUT", "TOPOGRAM", "SURVIEW")
MAX_ZIP_BYTES = 16 * 1024 ** 3  # refuse to unpack more than this (a corrupt or hostile archive)
SPACING_TOLERANCE = 0.01  # relative: slice gaps may differ from the usual one by 1% (scanner rounding)
_NON_IMAGE_MODALITIES = {"SR": "a structured report", "SEG": "a segmentation", "RTSTRUCT": "an RT structure set",
                         "PR": "a presentation state", "KO": "a key-object selection", "DOC": "a document",
                         "REG": "a registration", "RTPLAN": "an RT plan", "RTDOSE": "an RT dose"}


@dataclass
class SeriesSummary:
    """One series found in a folder: what the error listing shows."""

    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)  # pydicom Datasets without pixel data

    def size(self) -> str:
        first = self.headers[0]
        rows, columns = first.get("Rows"), first.get("Columns")
        return f"{columns}×{rows}×{len(self.files)}" if rows and columns else f"{len(self.files)} file(s)"

    def describe(self) -> str:
        uid = self.uid or "(no SeriesInstanceUID)"
        return f"{uid} '{self.description}' {self.size()} {self.modality or '?'}"


@dataclass
class DicomSeries:
    """One image series read as a 3D image: the image (LPS geometry) and the headers, in slice order."""

    image: sitk.Image
    uid: str
    description: str
    modality: str
    headers: list[Any]  # pydicom Datasets (no pixel data), headers[k] is slice k of the image
    files: list[Path]  # the files read (for a .zip: names inside the archive)
    sha256: str  # of the series' file contents in slice order (of the archive for a .zip)


# ------------------------------------------------------------------------------------------ entry points
def is_dicom_input(path: str | Path) -> bool:
    """A folder or a .zip archive is read as a DICOM series; files are read by `volumes.read_image`."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def read_dicom(path: str | Path, series: str | None = None, what: str = "volume") -> DicomSeries:
    """Read the one image series in a folder or .zip (or the series `series` names); BadInputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        files = _files_in(path)
        return _read_series(path, files, series, what, archive_sha256=None)
    return _read_zip(path, series, what)


def _read_zip(path: Path, series: str | None, what: str) -> DicomSeries:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise BadInputError(f"{what} {path} unpacks to more than {MAX_ZIP_BYTES // 1024 ** 3} GiB",
                                    "unpack it yourself and give the folder")
            with tempfile.TemporaryDirectory(prefix="fastsam3d-dicom-") as tmp:
                root = Path(tmp).resolve()
                for member in members:
                    target = (root / member.filename).resolve()
                    if root not in target.parents:  # absolute names or '..': never write outside
                        raise BadInputError(f"{what} {path} holds an unsafe file name {member.filename!r}",
                                            "unpack it yourself and give the folder")
                    archive.extract(member, root)
                result = _read_series(path, _files_in(root), series, what, archive_sha256=sha256_file(path))
                result.files = [f.relative_to(root) for f in result.files]
                return result
    except zipfile.BadZipFile as exc:
        raise BadInputError(f"{what} {path} is not a readable .zip archive ({exc})",
                            "re-create the archive, or give the folder of DICOM files") from None


def _files_in(folder: Path) -> list[Path]:
    """Every regular, non-hidden file below `folder` (DICOMDIR index files skipped)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.name.upper() != "DICOMDIR")


# ------------------------------------------------------------------------------------------ headers
def _read_header(path: Path) -> Any | None:
    """The header of a DICOM file (no pixels); None for a file that is not DICOM; BadInputError if corrupt."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with open(path, "rb") as handle:
        start = handle.read(132)
    has_magic = len(start) == 132 and start[128:132] == b"DICM"
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, force=not has_magic and path.suffix.lower()
                                 in (".dcm", ".dicom", ".ima"))
    except InvalidDicomError:
        if has_magic:
            raise BadInputError(f"DICOM file {path} is corrupt", "re-export the series or remove the file") from None
        return None
    except Exception as exc:  # noqa: BLE001 - any parser failure of a DICOM file is a corrupt file
        raise BadInputError(f"DICOM file {path} is corrupt ({type(exc).__name__}: {exc})",
                            "re-export the series or remove the file") from None
    if not has_magic and "SOPClassUID" not in header and "Modality" not in header:
        return None
    return header


def list_series(paths: list[Path]) -> list[SeriesSummary]:
    """Group the DICOM files among `paths` by SeriesInstanceUID (order of first appearance)."""
    groups: dict[str, SeriesSummary] = {}
    for path in paths:
        header = _read_header(path)
        if header is None:
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if uid not in groups:
            groups[uid] = SeriesSummary(uid, str(header.get("SeriesDescription", "") or ""),
                                        str(header.get("Modality", "") or ""))
        groups[uid].files.append(path)
        groups[uid].headers.append(header)
    return list(groups.values())


def _choose(source: Path, found: list[SeriesSummary], series: str | None, what: str) -> SeriesSummary:
    if not found:
        kind = "a folder" if source.is_dir() else "a .zip archive"
        raise BadInputError(f"{what} {source} is {kind} with no DICOM files",
                            "give a folder (or .zip) of DICOM files of one series, or a NIfTI/NRRD/MHA file")
    listing = "; ".join(s.describe() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            raise BadInputError(f"--series {series} is not in {source}, which holds {listing}",
                                "copy one of these UIDs into --series")
        return chosen[0]
    if len(found) > 1:
        raise BadInputError(f"{source} holds {len(found)} DICOM series: {listing}", "pick one with --series UID")
    return found[0]


def _check_image_series(source: Path, chosen: SeriesSummary) -> None:
    kind = _NON_IMAGE_MODALITIES.get(chosen.modality.upper())
    first = chosen.headers[0]
    if kind is None and not all(tag in first for tag in ("Rows", "Columns")):
        kind = "not an image series (no pixel rows/columns)"
    if kind is not None:
        raise BadInputError(f"series {chosen.describe()} in {source} is {kind}, not an image series",
                            "give the folder of the image series (CT, MR, PT, ...) it belongs to")


# ------------------------------------------------------------------------------------------ geometry
@dataclass
class _Slice:
    path: Path
    header: Any
    position: np.ndarray  # ImagePositionPatient, LPS mm
    offset: float  # position along the slice normal


def _vector(header: Any, keyword: str, length: int, path: Path) -> np.ndarray:
    value = header.get(keyword)
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.zeros(0)
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise BadInputError(f"DICOM file {path} has no valid {keyword}",
                            "the series lacks the geometry a 3D volume needs; re-export it from the scanner/PACS")
    return vector


def _sorted_slices(source: Path, chosen: SeriesSummary) -> tuple[list[_Slice], np.ndarray, np.ndarray, float]:
    """Slices sorted along the normal, with (orientation 2×3, pixel spacing (row, column), slice gap).

    Refuses localisers, multi-frame files, mixed orientations or matrix sizes, duplicate positions, missing
    slices and uneven gaps: each would make a wrong volume.
    """
    first = chosen.headers[0]
    orientation = _vector(first, "ImageOrientationPatient", 6, chosen.files[0]).reshape(2, 3)
    spacing = _vector(first, "PixelSpacing", 2, chosen.files[0])
    shape = (first.get("Rows"), first.get("Columns"))
    slices = []
    for path, header in zip(chosen.files, chosen.headers):
        image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
        if any(word in image_type for word in LOCALISER_WORDS):
            raise BadInputError(f"DICOM file {path} is a localiser ({'/'.join(image_type)}) inside the series",
                                "remove the localiser from the folder (or pick the axial series with --series)")
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise BadInputError(f"DICOM file {path} is a multi-frame (enhanced) image",
                                "convert the series to single-frame files (e.g. with dcm2niix to NIfTI)")
        this_orientation = _vector(header, "ImageOrientationPatient", 6, path).reshape(2, 3)
        if not np.allclose(this_orientation, orientation, atol=1e-4):
            raise BadInputError(f"the series mixes slice orientations: {path} has "
                                f"{_fmt(this_orientation.ravel())}, others {_fmt(orientation.ravel())}",
                                "remove the slices of the other orientation (e.g. a localiser) from the folder")
        if (header.get("Rows"), header.get("Columns")) != shape or \
                not np.allclose(_vector(header, "PixelSpacing", 2, path), spacing, atol=1e-4):
            raise BadInputError(f"the series mixes slice sizes or pixel spacings ({path})",
                                "give a folder holding one reconstruction of the series")
        slices.append(_Slice(path, header, _vector(header, "ImagePositionPatient", 3, path), 0.0))
    if len(slices) < 2:
        raise BadInputError(f"series {chosen.describe()} in {source} is a single slice", "give a 3D series")
    row, column = (orientation[0] / np.linalg.norm(orientation[0]), orientation[1] / np.linalg.norm(orientation[1]))
    if abs(float(row @ column)) > 1e-3:
        raise BadInputError(f"the series' ImageOrientationPatient {_fmt(orientation.ravel())} is not orthogonal",
                            "re-export the series; its geometry header is broken")
    normal = np.cross(row, column)
    for item in slices:
        item.offset = float(item.position @ normal)
    slices.sort(key=lambda s: s.offset)
    _check_stacked_along_normal(slices, normal, float(min(spacing)))
    gaps = np.diff([s.offset for s in slices])
    _check_gaps(slices, gaps)
    return slices, np.stack([row, column]), spacing, float(np.median(gaps))


def _check_stacked_along_normal(slices: list[_Slice], normal: np.ndarray, pixel: float) -> None:
    """Refuse slices that shift in-plane from one to the next (gantry tilt, a sheared stack): a 3D image
    grid cannot hold them, and reading them as one would move every slice but the first."""
    first = slices[0].position
    for item in slices[1:]:
        step = item.position - first
        shift = float(np.linalg.norm(step - (step @ normal) * normal))
        if shift > max(0.01, 0.05 * pixel):
            raise BadInputError(f"the slices are not stacked along their normal (gantry tilt or a sheared stack): "
                                f"{item.path.name} is shifted {shift:.2f} mm in-plane from {slices[0].path.name}",
                                "resample the series to an orthogonal grid first (e.g. dcm2niix corrects gantry "
                                "tilt)")


def _check_gaps(slices: list[_Slice], gaps: np.ndarray) -> None:
    step = float(np.median(gaps))
    for index, gap in enumerate(gaps):
        a, b = slices[index], slices[index + 1]
        if gap <= max(1e-3, SPACING_TOLERANCE * step):
            raise BadInputError(f"two slices lie at the same position ({a.path.name} and {b.path.name}, "
                                f"{a.offset:.3f} mm along the normal): the folder mixes acquisitions",
                                "give a folder holding one acquisition (or pick it with --series)")
    tolerance = max(1e-3, SPACING_TOLERANCE * step)
    for index, gap in enumerate(gaps):
        if abs(gap - step) <= tolerance:
            continue
        a, b = slices[index], slices[index + 1]
        missing = gap / step
        if gap > step and abs(missing - round(missing)) * step <= tolerance:
            raise BadInputError(f"{int(round(missing)) - 1} slice(s) missing between {a.path.name} and "
                                f"{b.path.name} ({gap:.3f} mm apart, the others {step:.3f} mm)",
                                "re-export the complete series")
        raise BadInputError(f"uneven slice spacing: {a.path.name} and {b.path.name} are {gap:.3f} mm apart, the "
                            f"others {step:.3f} mm", "resample the series to even spacing (e.g. dcm2niix) first")


def _read_series(source: Path, files: list[Path], series: str | None, what: str,
                 archive_sha256: str | None) -> DicomSeries:
    chosen = _choose(source, list_series(files), series, what)
    _check_image_series(source, chosen)
    slices, orientation, pixel_spacing, step = _sorted_slices(source, chosen)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    if _needs_float(slices):
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise _decode_failure(source, chosen, [s.path for s in slices]) from None
    rows, columns = int(chosen.headers[0].Rows), int(chosen.headers[0].Columns)
    if tuple(image.GetSize()) != (columns, rows, len(slices)):
        raise BadInputError(f"DICOM series in {source} decoded to size {image.GetSize()}, expected "
                            f"{columns}×{rows}×{len(slices)}", "check for corrupt files; re-export the series")
    # Geometry from the checked headers (not the reader's guesses): origin = first slice's position,
    # direction columns = row, column, normal; spacing = column spacing, row spacing, slice gap.
    direction = np.stack([orientation[0], orientation[1], np.cross(orientation[0], orientation[1])], axis=1)
    image.SetOrigin(tuple(float(v) for v in slices[0].position))
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), step))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    for key in list(image.GetMetaDataKeys()):
        image.EraseMetaData(key)
    digest = archive_sha256 or _sha256_files([s.path for s in slices])
    return DicomSeries(image, chosen.uid, chosen.description, chosen.modality, [s.header for s in slices],
                       [s.path for s in slices], digest)


# ------------------------------------------------------------------------------------------ helpers
def _needs_float(slices: list[_Slice]) -> bool:
    """True when the rescaled values are not all integers of one scale: slices with different or fractional
    RescaleSlope/RescaleIntercept (e.g. PET) would otherwise be cast to the first slice's integer type."""
    scales = set()
    for item in slices:
        try:
            slope = float(item.header.get("RescaleSlope", 1) or 1)
            intercept = float(item.header.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError):
            return True
        scales.add((slope, intercept))
    slope, intercept = next(iter(scales))
    return len(scales) > 1 or not (slope.is_integer() and intercept.is_integer())


def _decode_failure(source: Path, chosen: SeriesSummary, paths: list[Path]) -> BadInputError:
    """Name the first file whose pixels cannot be decoded (only run after the series read failed)."""
    for path in paths:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return BadInputError(f"DICOM file {path} is corrupt or truncated: its pixels cannot be decoded",
                                 "re-export the series or remove the file")
    return BadInputError(f"cannot decode the pixels of DICOM series {chosen.describe()} in {source}",
                         "check for a corrupt or truncated file; re-export the series")


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
