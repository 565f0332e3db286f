"""Reading, writing, reorienting and resampling volumes, with their physical geometry kept exact.

The in-memory volume type is `SimpleITK.Image`: it carries size, spacing, origin and direction (in LPS,
ITK's world convention). Conventions used everywhere in fastsam3d:

* **ijk** is the voxel index in NIfTI/ITK axis order: i is the first axis of the NIfTI data array
  (what nibabel returns). `sitk.GetArrayFromImage` returns the REVERSED order (k, j, i); this module's
  `array_ijk` / `image_from_array_ijk` hide that so nothing else has to think about it.
* The models were trained on RAS+-canonical crops (torchio `ToCanonical`): array axis 0 increases
  towards patient Right, axis 1 towards Anterior, axis 2 towards Superior. `to_canonical` produces that.
* Images are resampled linearly, labels always nearest-neighbour.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.errors import BadInputError

Interpolation = Literal["linear", "nearest"]
CANONICAL_ORIENTATION = "RAS"  # DICOM-style code: axis i points to R, j to A, k to S (nibabel RAS+)
NIFTI_SUFFIXES = (".nii", ".nii.gz")

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
# ITK warnings go straight to the process's stderr with build paths ("WARNING: In /…/itkNiftiImageIO.cxx, line …");
# what they report that matters (a sheared or unoriented file) is said by fastsam3d itself, in one line.
sitk.ProcessObject.SetGlobalWarningDisplay(False)


# --------------------------------------------------------------------------------------------- reading
def read_image(path: str | Path, channel: int | None = None, what: str = "volume",
               strict_channel: bool = False, series: str | None = None) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA, ..., or a DICOM series) with its geometry.

    SimpleITK first; for a NIfTI that SimpleITK rejects (e.g. non-orthonormal direction cosines) fall back
    to nibabel. A folder or .zip is read as one DICOM series (`imaging.dicom`; `series` picks one by UID).
    A 4D volume needs `channel` (index on the 4th axis). Raises `BadInputError` for a missing,
    unreadable, empty, 2D or 4D-without-channel file, and with `strict_channel` for a channel other than 0
    asked of a 3D volume (`prepare` is lenient: one --channel serves datasets of 3D and 4D files).
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist", "check the path")
    from fastsam3d_cli.imaging.dicom import is_dicom_input, read_dicom

    if is_dicom_input(path):
        if strict_channel and channel not in (None, 0):
            raise BadInputError(f"--channel {channel} does not exist in DICOM series {path}: it has one channel",
                                "drop --channel")
        return read_dicom(path, series, what).image
    if path.stat().st_size == 0:
        raise BadInputError(f"{what} {path} is an empty file", "re-export or re-download it")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        check_nifti_complete(path, what)
    with native_stderr_captured() as native:  # ITK/MetaImage print to the C++ stderr: keep it off the terminal
        try:
            image: sitk.Image | None = sitk.ReadImage(str(path))
        except RuntimeError as sitk_error:
            image, error = None, sitk_error
    if image is None:
        if "not read completely" in native.text:  # MetaImage's own words; ITK's exception then blames errno
            raise BadInputError(f"{what} {path} is truncated or corrupt: {_metaimage_shortfall(native.text)}",
                                "copy, export or download it again") from None
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise BadInputError(f"cannot read {what} {path}: {_sitk_reason(error)}",
                                "check that it is a valid NIfTI/NRRD/MHA image") from None
        image = _read_with_nibabel(path, what)
    return _select_3d(image, path, channel, what, strict_channel)


def check_nifti_complete(path: Path, what: str = "volume") -> None:
    """BadInputError when a NIfTI holds less voxel data than its header promises (a cut copy or download).

    Both SimpleITK and nibabel fill the missing part with zeros without a word. `.nii`: the file size.
    `.nii.gz`: the gzip trailer's length (no decompression); only when it disagrees (a cut file, or a valid
    multi-member gzip) is the stream decompressed to count its bytes. A header nibabel cannot parse is left
    to the readers.
    """
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj
        needed = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    except Exception:  # noqa: BLE001 - not parseable here: the readers report it
        return
    compressed = path.name.lower().endswith(".gz")
    held = _gzip_length(path, needed) if compressed else path.stat().st_size
    if held < needed:
        holds = "it decompresses to" if compressed else "the file holds"
        raise BadInputError(f"{what} {path} is truncated or corrupt: its header needs {needed} bytes, {holds} "
                            f"{held}", "copy, export or download it again")


def _gzip_length(path: Path, needed: int) -> int:
    """Uncompressed length of a gzip file: `needed` when its trailer says so, else the bytes it decompresses to."""
    import zlib

    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        if int.from_bytes(handle.read(4), "little") == needed % 2**32:
            return needed
        handle.seek(0)
        total, stream = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while chunk := handle.read(1 << 20):
                while chunk:
                    total += len(stream.decompress(chunk))
                    chunk = stream.unused_data  # the next gzip member, if any
                    if chunk:
                        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error:
            pass  # damaged from here on: what came before is all there is
        return total


class native_stderr_captured:  # noqa: N801 - used as a context manager, reads like a phrase
    """Send what native code writes to file descriptor 2 (ITK warnings with build paths, MetaImage's
    "data not read completely") to a temporary file while the block runs; `text` holds it afterwards.

    fastsam3d's rule is one line on stderr: such lines are either turned into that line or dropped. Only in
    the main thread (the command line); elsewhere, e.g. a server's worker thread, nothing is redirected.
    """

    def __enter__(self) -> "native_stderr_captured":
        import sys
        import tempfile
        import threading

        self.text, self._saved = "", None
        if threading.current_thread() is not threading.main_thread():
            return self  # fd 2 is the whole process's: a server thread must not swallow other threads' output
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            return
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()


def _metaimage_shortfall(text: str) -> str:
    """'data not read completely (240000 bytes expected, 119852 read)' from MetaImage's two lines."""
    import re

    found = re.search(r"ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", text)
    return ("data not read completely" + (f" ({found[1]} bytes expected, {found[2]} read)" if found else ""))


def _sitk_reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else "unknown error"


def _read_with_nibabel(path: Path, what: str) -> sitk.Image:
    """Fallback reader: nibabel data + affine → SimpleITK image (direction orthonormalised)."""
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        data = np.asanyarray(nii.dataobj)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input
        raise BadInputError(f"cannot read {what} {path}: {exc} (truncated or corrupt?)",
                            "check that it is a valid NIfTI file; copy, export or download it again") from None
    affine_ras = np.asarray(nii.affine, dtype=np.float64)
    spacing, direction_lps, origin_lps = geometry_from_affine_ras(affine_ras)
    if data.ndim < 3:
        raise BadInputError(f"{what} {path} is {data.ndim}D", "give a 3D volume")
    if data.ndim == 3:
        image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    else:
        # Keep the extra axes as components of a vector image so channel selection is uniform.
        flat = data.reshape(data.shape[:3] + (-1,))
        image = sitk.GetImageFromArray(np.ascontiguousarray(flat.transpose(2, 1, 0, 3)), isVector=True)
    image.SetSpacing(spacing)
    image.SetDirection(direction_lps)
    image.SetOrigin(origin_lps)
    return image


def _select_3d(image: sitk.Image, path: Path, channel: int | None, what: str, strict_channel: bool) -> sitk.Image:
    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dim == 2:
        raise BadInputError(f"{what} {path} is a 2D image", "give a 3D volume")
    if dim == 4 or components > 1:
        n_channels = image.GetSize()[3] if dim == 4 else components
        if channel is None:
            raise BadInputError(f"{what} {path} is 4D with {n_channels} channels",
                                "choose one with --channel N (0-based)")
        if not 0 <= channel < n_channels:
            raise BadInputError(f"--channel {channel} does not exist in {path} ({n_channels} channels)",
                                f"use a channel from 0 to {n_channels - 1}")
        if dim == 4:
            size = list(image.GetSize())
            size[3] = 0
            image = sitk.Extract(image, size, [0, 0, 0, channel])
        else:
            image = sitk.VectorIndexSelectionCast(image, channel)
    elif dim != 3:
        raise BadInputError(f"{what} {path} has {dim} dimensions", "give a 3D volume")
    elif strict_channel and channel not in (None, 0):
        raise BadInputError(f"--channel {channel} does not exist in {path}: it is a 3D volume with one channel",
                            "drop --channel (it picks a channel of a 4D volume)")
    if min(image.GetSize()) < 1:
        raise BadInputError(f"{what} {path} is empty (size {image.GetSize()})", "give a non-empty volume")
    if min(image.GetSize()) == 1:
        raise BadInputError(f"{what} {path} is a single slice (size {image.GetSize()}), i.e. a 2D image",
                            "give a 3D volume")
    return image


# ------------------------------------------------------------------------------------------ geometry
def geometry_from_affine_ras(affine_ras: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction LPS row-major 9-tuple, origin LPS) from a 4×4 NIfTI (RAS) affine.

    A non-orthonormal (sheared) affine is replaced by the closest rotation (polar decomposition), since
    ITK geometry cannot represent shear.
    """
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])
    linear = lps_from_ras @ affine_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise BadInputError("the image affine has a zero-length axis", "fix the file's header (qform/sform)")
    u, _, vt = np.linalg.svd(linear / spacing)
    direction = u @ vt
    origin = lps_from_ras @ affine_ras[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(d) for d in direction.ravel()), tuple(float(o) for o in origin)


def affine_lps(image: sitk.Image) -> np.ndarray:
    """4×4 matrix mapping a voxel index (i, j, k, 1) to LPS millimetres."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return affine


def affine_ras(image: sitk.Image) -> np.ndarray:
    """4×4 matrix mapping a voxel index (i, j, k, 1) to RAS millimetres (the NIfTI affine)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps(image)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within `tolerance`)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance, rtol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance, rtol=0)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance, rtol=0))


def describe_grid_difference(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> str:
    """Human-readable list of what differs between two grids ('' when they match)."""
    parts = []
    if a.GetSize() != b.GetSize():
        parts.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for name, get in (("spacing", "GetSpacing"), ("origin", "GetOrigin"), ("direction", "GetDirection")):
        va, vb = getattr(a, get)(), getattr(b, get)()
        if not np.allclose(va, vb, atol=tolerance, rtol=0):
            parts.append(f"{name} {_fmt(va)} vs {_fmt(vb)}")
    return "; ".join(parts)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# ------------------------------------------------------------------------------------ array helpers
def array_ijk(image: sitk.Image, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Voxel array in ijk order (i = first NIfTI axis). Copies; never the reversed SimpleITK view."""
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))


def image_from_array_ijk(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """SimpleITK image from an ijk-ordered array, copying the geometry of `reference` if given."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    if reference is not None:
        if tuple(reference.GetSize()) != tuple(array.shape):
            raise ValueError(f"array shape {array.shape} does not match reference size {reference.GetSize()}")
        image.CopyInformation(reference)
    return image


# ---------------------------------------------------------------------------- orientation, resampling
def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes (no interpolation) so that i→Right, j→Anterior, k→Superior (RAS+ canonical).

    Oblique directions are mapped to the closest canonical axes, like nibabel's `as_closest_canonical`.
    """
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def resample_to_spacing(image: sitk.Image, spacing_mm: float | Sequence[float] = 1.5,
                        interpolation: Interpolation = "linear") -> sitk.Image:
    """Resample onto a grid with the given spacing that covers the same physical extent.

    Origin and direction are kept; the new size is round(old_size * old_spacing / new_spacing) (at
    least 1), like torchio's `Resample`. Labels must use `interpolation="nearest"`.
    """
    new_size, new_spacing, origin, direction = resampled_grid(image, spacing_mm)
    return resample_onto(image, size=new_size, spacing=new_spacing, origin=origin,
                         direction=direction, interpolation=interpolation)


def resampled_grid(image: sitk.Image, spacing_mm: float | Sequence[float] = 1.5
                   ) -> tuple[list[int], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(size, spacing, origin, direction) of the grid `resample_to_spacing` resamples onto — without resampling.

    Lets a caller resample only the parts it needs (e.g. one 128³ crop) onto exactly the same voxels.
    """
    if isinstance(spacing_mm, (int, float)):
        spacing_mm = (float(spacing_mm),) * 3
    new_spacing = tuple(float(s) for s in spacing_mm)
    if any(s <= 0 or not math.isfinite(s) for s in new_spacing):
        raise BadInputError(f"spacing {new_spacing} is invalid", "give a positive spacing in mm")
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(old_size, old_spacing, new_spacing)]
    # Keep the centre of the first voxel's cell edge: same physical extent as the input.
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((np.asarray(new_spacing) - np.asarray(old_spacing)) / 2.0)
    origin = tuple(float(o) for o in np.asarray(image.GetOrigin()) + shift)
    return new_size, new_spacing, origin, tuple(image.GetDirection())


def resample_onto(image: sitk.Image, *, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                  direction: Sequence[float], interpolation: Interpolation, default_value: float = 0.0,
                  extrapolate: bool = False) -> sitk.Image:
    """Resample `image` onto an explicit grid (physical positions; outside → `default_value`, or with
    `extrapolate` the nearest voxel's value)."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetUseNearestNeighborExtrapolator(bool(extrapolate))
    resampler.SetSize([int(s) for s in size])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin([float(o) for o in origin])
    resampler.SetOutputDirection([float(d) for d in direction])
    resampler.SetInterpolator(_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(image.GetPixelID())
    return resampler.Execute(image)


def resample_like(image: sitk.Image, reference: sitk.Image, interpolation: Interpolation,
                  default_value: float = 0.0) -> sitk.Image:
    """Resample `image` onto the grid of `reference` by physical position."""
    return resample_onto(image, size=reference.GetSize(), spacing=reference.GetSpacing(),
                         origin=reference.GetOrigin(), direction=reference.GetDirection(),
                         interpolation=interpolation, default_value=default_value)


# --------------------------------------------------------------------------------------------- writing
def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write atomically (temp file + rename); a failure or Ctrl-C leaves nothing behind."""
    from fastsam3d_cli.imaging.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
