"""Writing a labelmap as a DICOM Segmentation (DICOM-SEG) that references its source series (highdicom).

Frame k of the SEG is slice k of the source series (`DicomSeries.headers[k]`), whose position highdicom
copies into the SEG's per-frame plane positions, so the SEG sits on the source's voxels by construction.
One segment per object, numbered 1, 2, … in the order given (DICOM wants consecutive numbers); the
labelmap value of each segment is kept in its SegmentDescription (`fastsam3d label N`).
Needs the optional extra `[dicom]` (highdicom).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastsam3d_cli.errors import UsageError
from fastsam3d_cli.imaging.dicom import DicomSeries

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root: generate_uid's default prefix


@dataclass
class SegmentSpec:
    """One object of the labelmap: its value, name and display colour ('#rrggbb')."""

    label: int
    name: str
    colour: str


@dataclass
class AlgorithmSpec:
    """What made the segmentation, for AlgorithmIdentificationSequence and the equipment module."""

    name: str  # "fastsam3d"
    version: str  # the fastsam3d version
    model: str  # model preset, e.g. "fastsam3d"
    weights: str  # weights name or checkpoint file name
    checkpoint_sha256: str


def require_highdicom() -> None:
    """UsageError (exit 2) when the optional extra is missing: checked before any work is done."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UsageError("DICOM-SEG output needs highdicom, which is not installed",
                         "pip install 'fastsam3d-cli[dicom]'") from None


def source_headers(series: DicomSeries) -> tuple[list[Any], list[str]]:
    """Copies of the source headers with the identifiers a SEG must reference; warnings for any derived.

    Anonymised series often lack SOP/Series/Study UIDs: the SOP class and instance UIDs come from the file
    meta when present; missing study/series/frame-of-reference UIDs are derived from the series' sha256
    (the same input always gives the same UIDs), and a warning says so.
    """
    from pydicom.uid import generate_uid

    headers = [copy.deepcopy(h) for h in series.headers]
    warnings: list[str] = []
    derived: list[str] = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(str(h.get(keyword, "") or "") for h in headers):
            uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=[series.sha256, keyword])
            for header in headers:
                if not str(header.get(keyword, "") or ""):
                    setattr(header, keyword, uid)
            derived.append(keyword)
    for index, header in enumerate(headers):
        meta = getattr(header, "file_meta", None)
        if not str(header.get("SOPClassUID", "") or ""):
            header.SOPClassUID = str(getattr(meta, "MediaStorageSOPClassUID", "") or "") or \
                "1.2.840.10008.5.1.4.1.1.2"
            if not getattr(meta, "MediaStorageSOPClassUID", None):
                derived.append("SOPClassUID") if "SOPClassUID" not in derived else None
        if not str(header.get("SOPInstanceUID", "") or ""):
            from_meta = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
            header.SOPInstanceUID = from_meta or generate_uid(prefix=UID_PREFIX,
                                                              entropy_srcs=[series.sha256, str(index)])
            if not from_meta and "SOPInstanceUID" not in derived:
                derived.append("SOPInstanceUID")
    if derived:
        warnings.append(f"the source series has no {', '.join(derived)} (anonymised?); the DICOM-SEG references "
                        "UIDs derived from the series' contents, so a PACS will not link it to the images")
    return headers, warnings


def write_dicom_seg(path: Path, labels_ijk: np.ndarray, series: DicomSeries, segments: Sequence[SegmentSpec],
                    algorithm: AlgorithmSpec) -> list[str]:
    """Write `labels_ijk` (on the series' grid) as a BINARY DICOM-SEG to `path`; return warnings.

    Objects with no voxel keep their segment (with no frames), so segment numbers never depend on the result.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    size = tuple(series.image.GetSize())
    if tuple(labels_ijk.shape) != size:
        raise ValueError(f"labelmap shape {labels_ijk.shape} is not the series' size {size}")
    headers, warnings = source_headers(series)
    lookup = np.zeros(int(max([s.label for s in segments] + [int(labels_ijk.max())])) + 1, dtype=np.uint16)
    for number, segment in enumerate(segments, start=1):
        lookup[segment.label] = number
    # ijk → frames: frame k is slice k, row j, column i.
    frames = np.ascontiguousarray(lookup[labels_ijk].transpose(2, 1, 0))
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
        source=f"model {algorithm.model}",
        parameters={"model": algorithm.model, "weights": algorithm.weights,
                    "checkpoint_sha256": algorithm.checkpoint_sha256[:16]})
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.name[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*_rgb(segment.colour)))
        description.SegmentDescription = f"fastsam3d label {segment.label}"
        descriptions.append(description)
    seed = hashlib.sha256(series.sha256.encode() + frames.tobytes()).hexdigest()
    segmentation = hd.seg.Segmentation(
        source_images=headers, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(prefix=UID_PREFIX, entropy_srcs=[seed, "series"]),
        series_number=int(headers[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=generate_uid(prefix=UID_PREFIX, entropy_srcs=[seed, "sop"]), instance_number=1,
        manufacturer="fastsam3d", manufacturer_model_name=algorithm.model[:64], software_versions=algorithm.version,
        device_serial_number="none", content_label="FASTSAM3D",
        content_description=f"fastsam3d {algorithm.version} ({algorithm.model})"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=bool(frames.any()))  # all empty: highdicom keeps every frame (and would log why)
    segmentation.save_as(str(path), enforce_file_format=True)
    return warnings


def _rgb(colour: str) -> tuple[int, int, int]:
    value = colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
