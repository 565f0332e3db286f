"""Click files: parse and validate them, and convert clicks between voxel (ijk) and world (RAS/LPS) space.

Two formats are read (README "Click file"):

* fastsam3d JSON — ``{"version": 1, "space": "ijk"|"ras"|"lps", "objects": [{"name", "label", "points",
  "point_labels"}]}``. ``ijk`` is the 0-based voxel index in NIfTI/ITK axis order (i = first axis of the
  NIfTI data array, what nibabel returns — NOT the reversed (k, j, i) order of ``sitk.GetArrayFromImage``);
  ``ras`` / ``lps`` are world millimetres (RAS: NIfTI/nibabel convention; LPS: ITK/DICOM/Slicer).
* 3D Slicer markups (``.mrk.json``): each point list is one object (label 1, 2, … in file order); the
  file's ``coordinateSystem`` (LPS or RAS) is honoured. A control point whose label starts with ``-`` or
  whose description is ``exclude`` is an exclude click; every other point is an include click.

Every problem is a `BadInputError` (exit 3) naming the object and the click.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from fastsam3d_cli.errors import BadInputError

Space = Literal["ijk", "ras", "lps"]
SPACES: tuple[str, ...] = ("ijk", "ras", "lps")
MAX_LABEL = 65535  # labelmaps are uint8, or uint16 when a label exceeds 255
CLICK_FILE_VERSION = 1
_EXCLUDE_WORDS = {"exclude", "negative", "background"}
_LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])
FILE_KEYS = ("version", "space", "objects")
OBJECT_KEYS = ("name", "label", "points", "point_labels")


@dataclass(frozen=True)
class ClickObject:
    """One object to segment: its clicks in the click file's space, applied in order."""

    name: str
    label: int  # value written into the labelmap (1..65535)
    points: tuple[tuple[float, float, float], ...]  # in ClickFile.space
    point_labels: tuple[int, ...]  # 1 include, 0 exclude; same length as points

    @property
    def includes(self) -> tuple[bool, ...]:
        return tuple(bool(v) for v in self.point_labels)


@dataclass(frozen=True)
class ClickFile:
    """A validated click file."""

    space: str  # "ijk" | "ras" | "lps"
    objects: tuple[ClickObject, ...]
    source: str  # path, or "<memory>"
    format: str  # "fastsam3d" | "slicer-markups"
    warnings: tuple[str, ...] = ()  # e.g. unknown keys, which are ignored

    def to_dict(self) -> dict[str, Any]:
        """The fastsam3d JSON form (what `write_click_file` writes)."""
        return {"version": CLICK_FILE_VERSION, "space": self.space,
                "objects": [{"name": o.name, "label": o.label, "points": [list(p) for p in o.points],
                             "point_labels": list(o.point_labels)} for o in self.objects]}


# ------------------------------------------------------------------------------------------ reading
def read_click_file(path: str | Path) -> ClickFile:
    """Read and validate a fastsam3d click file or a 3D Slicer ``.mrk.json`` (BadInputError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"click file {path} does not exist", "check the path")
    if path.is_dir():
        raise BadInputError(f"click file {path} is a folder", "give a .json click file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read click file {path}: {type(exc).__name__}",
                            "give a UTF-8 JSON click file") from None
    if path.name.lower().endswith(".fcsv") or text.lstrip().startswith("# Markups fiducial file"):
        raise BadInputError(f"click file {path} is a legacy 3D Slicer .fcsv file, which fastsam3d does not read",
                            "in Slicer, save the point list as Markups JSON (.mrk.json) and give that file")
    try:
        data = json.loads(text)
        return parse_click_data(data, source=str(path))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"click file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                            "see the click-file format in the README") from None
    except RecursionError:  # `[[[[…]]]]` thousands deep: Python's decoder (or a check) runs out of stack
        raise BadInputError(f"click file {path} is not valid JSON for fastsam3d: it is nested too deeply",
                            "see the click-file format in the README") from None


def parse_click_data(data: Any, source: str = "<memory>") -> ClickFile:
    """Validate already-decoded JSON: Slicer markups if it has a ``markups`` list, else fastsam3d format."""
    if isinstance(data, dict) and "markups" in data:
        return _parse_slicer_markups(data, source)
    return _parse_fastsam3d(data, source)


def _parse_fastsam3d(data: Any, source: str) -> ClickFile:
    where = f"click file {source}"
    if not isinstance(data, dict):
        raise BadInputError(f"{where} must hold a JSON object, not {_json_type(data)}",
                            'use {"space": "ras", "objects": [...]} (see the README)')
    if "version" in data and data["version"] != CLICK_FILE_VERSION:
        raise BadInputError(f"{where} has version {_show(data['version'])}; this fastsam3d reads version "
                            f"{CLICK_FILE_VERSION}",
                            'set "version": 1')
    if "space" not in data:
        raise BadInputError(f"{where} has no \"space\"",
                            'add "space": "ijk" (voxel index, NIfTI axis order), "ras" or "lps" (world mm)')
    space = data["space"]
    if not isinstance(space, str) or space.lower() not in SPACES:
        raise BadInputError(f"{where}: unknown space {_show(space)}",
                            'use "ijk" (voxel index, NIfTI axis order), "ras" or "lps" (world mm)')
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise BadInputError(f"{where} has no objects", 'add "objects": [{"name", "label", "points", "point_labels"}]')
    warnings = _unknown_keys(data, FILE_KEYS, where)
    parsed = tuple(_parse_object(item, n, where, warnings) for n, item in enumerate(objects, start=1))
    _check_unique(parsed, where)
    return ClickFile(space.lower(), parsed, source, "fastsam3d", tuple(warnings))


def _unknown_keys(data: dict, known: Sequence[str], where: str) -> list[str]:
    """A warning per key the format does not have (a typo such as "verison" would otherwise pass silently)."""
    return [f"{where}: unknown key {_show(str(key))} is ignored (known keys: {', '.join(known)})"
            for key in data if key not in known]


def _parse_object(item: Any, number: int, where: str, warnings: list[str]) -> ClickObject:
    if not isinstance(item, dict):
        raise BadInputError(f"{where}: object {number} must be a JSON object, not {_json_type(item)}",
                            'give {"name", "label", "points", "point_labels"}')
    label = _integral(item.get("label"))
    name = item.get("name", f"label {label}" if _is_int(label) and 1 <= label <= MAX_LABEL else f"object {number}")
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"{where}: object {number} has an empty or non-text name", "give a name such as \"liver\"")
    name = name.strip()
    what = f"{where}: object '{name}'"
    warnings.extend(_unknown_keys(item, OBJECT_KEYS, what))
    if "label" not in item:
        raise BadInputError(f"{what} has no \"label\"", f"give the output value, an integer 1..{MAX_LABEL}")
    if not _is_int(label) or not 1 <= label <= MAX_LABEL:
        raise BadInputError(f"{what} has label {_show(label)}",
                            f"use an integer from 1 to {MAX_LABEL} (0 is background)")
    points = item.get("points")
    if not isinstance(points, list) or not points:
        raise BadInputError(f"{what} has no points", "give at least one click in \"points\"")
    coordinates = tuple(_parse_point(p, n, what) for n, p in enumerate(points, start=1))
    point_labels = item.get("point_labels")
    if not isinstance(point_labels, list):
        raise BadInputError(f"{what} has no \"point_labels\" list", "give one 1 (include) or 0 (exclude) per point")
    if len(point_labels) != len(coordinates):
        raise BadInputError(f"{what} has {len(coordinates)} points but {len(point_labels)} point_labels",
                            "give one 1 (include) or 0 (exclude) per point")
    values = []
    for n, value in enumerate(point_labels, start=1):
        value = _integral(value)
        if not _is_int(value) or value not in (0, 1):
            raise BadInputError(f"{what}: the point label of point {n} (point_labels entry {n}, counting from 1) is {_show(value)}",
                                "use 1 (include) or 0 (exclude)")
        values.append(int(value))
    if 1 not in values:
        raise BadInputError(f"{what} has only exclude clicks", "give at least one include click (point_labels 1)")
    return ClickObject(name, int(label), coordinates, tuple(values))


def _parse_point(point: Any, number: int, what: str) -> tuple[float, float, float]:
    if not isinstance(point, (list, tuple)):
        raise BadInputError(f"{what}: point {number} is {_json_type(point)}, not a list of 3 numbers",
                            "write each point as [x, y, z]")
    if len(point) != 3:
        raise BadInputError(f"{what}: point {number} has {len(point)} coordinates, expected 3",
                            "write each point as [x, y, z] (3D)")
    values = []
    for value in point:
        try:
            number_value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        except OverflowError:  # an integer too large for a float
            number_value = math.inf
        if number_value is None or not math.isfinite(number_value):
            raise BadInputError(f"{what}: point {number} has a non-finite or non-numeric coordinate {_show(value)}",
                                "use finite numbers only")
        values.append(number_value)
    return tuple(values)  # type: ignore[return-value]


def _check_unique(objects: Sequence[ClickObject], where: str) -> None:
    by_label: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for obj in objects:
        if obj.label in by_label:
            raise BadInputError(f"{where}: objects '{by_label[obj.label]}' and '{obj.name}' both use label {obj.label}",
                                "give every object its own label")
        if obj.name in by_name:
            raise BadInputError(f"{where}: two objects are called '{obj.name}' (labels {by_name[obj.name]} and {obj.label})",
                                "give every object its own name")
        by_label[obj.label] = obj.name
        by_name[obj.name] = obj.label


def _parse_slicer_markups(data: dict, source: str) -> ClickFile:
    """3D Slicer markups: one object per point list; coordinates converted to LPS."""
    where = f"Slicer markups file {source}"
    markups = data.get("markups")
    if not isinstance(markups, list) or not markups:
        raise BadInputError(f"{where} has no markups", "place points in Slicer and save the point list (.mrk.json)")
    stem = Path(source).name.split(".")[0] or "points"
    objects = []
    for number, markup in enumerate(markups, start=1):
        if not isinstance(markup, dict):
            raise BadInputError(f"{where}: markup {number} is not a JSON object", "save the file from Slicer again")
        kind = str(markup.get("type", "Fiducial"))
        if kind not in ("Fiducial", "PointList"):
            raise BadInputError(f"{where}: markup {number} is a {kind}, not a point list",
                                "save a point list (Fiducial) markup as the click file")
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise BadInputError(f"{where}: markup {number} has coordinateSystem {system!r}", "use LPS or RAS")
        units = markup.get("coordinateUnits", "mm")
        if units not in ("mm", ["mm"]):
            raise BadInputError(f"{where}: markup {number} has coordinateUnits {units!r}", "save positions in mm")
        name = str(markup.get("name") or (stem if len(markups) == 1 else f"{stem}-{number}"))
        what = f"{where}: point list '{name}'"
        points, labels = [], []
        for index, control in enumerate(markup.get("controlPoints") or [], start=1):
            if not isinstance(control, dict):
                raise BadInputError(f"{what}: control point {index} is not a JSON object", "save the file from Slicer again")
            if control.get("positionStatus", "defined") != "defined":
                continue  # placeholder or in-progress point: no position yet
            xyz = np.asarray(_parse_point(control.get("position"), index, what))
            points.append(tuple(float(v) for v in (xyz if system == "LPS" else xyz * _LPS_FROM_RAS)))
            labels.append(0 if _is_exclude_point(control) else 1)
        if not points:
            raise BadInputError(f"{what} has no placed control points", "place at least one point in Slicer")
        if 1 not in labels:
            raise BadInputError(f"{what} has only exclude points", "give at least one include point")
        objects.append(ClickObject(name, number, tuple(points), tuple(labels)))
    parsed = tuple(objects)
    _check_unique(parsed, where)
    return ClickFile("lps", parsed, source, "slicer-markups")


def _is_exclude_point(control: dict) -> bool:
    label = str(control.get("label", "")).strip()
    description = str(control.get("description", "")).strip().lower()
    return label.startswith("-") or description in _EXCLUDE_WORDS


def _integral(value: Any) -> Any:
    """An integral float (1.0) as the int it names (JSON writers differ); anything else unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    """A JSON value for a one-line message: short whatever the input (no 400-digit integers)."""
    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(abs(value)))
        return str(value) if digits <= 12 else f"{'-' if value < 0 else ''}a {digits}-digit number"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _json_type(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------- conversions
def to_lps(points: np.ndarray | Sequence[Sequence[float]], space: str, image: Any,
           ras_from_ijk: np.ndarray | None = None) -> np.ndarray:
    """Clicks (N, 3) in `space` → LPS millimetres (N, 3) in `image`'s geometry (the SimpleITK image ijk refers to).

    `ras_from_ijk`: the file's own affine when it differs from `image`'s geometry (`imaging.world`): a world
    click then goes to its voxel index through that affine, and back out through `image`'s geometry, so it
    lands on the voxel the file's affine names.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if space in ("ras", "lps") and ras_from_ijk is not None:
        ras = points if space == "ras" else points * _LPS_FROM_RAS
        affine = np.asarray(ras_from_ijk, dtype=np.float64)
        ijk = (ras - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        return to_lps(ijk, "ijk", image)
    if space == "lps":
        return points.copy()
    if space == "ras":
        return points * _LPS_FROM_RAS
    if space == "ijk":
        from fastsam3d_cli.imaging.volumes import affine_lps

        affine = affine_lps(image)
        return points @ affine[:3, :3].T + affine[:3, 3]
    raise BadInputError(f"unknown click space {space!r}", "use ijk, ras or lps")


def lps_to_ijk(points_lps: np.ndarray, image: Any) -> np.ndarray:
    """LPS millimetres (N, 3) → continuous voxel index (N, 3) of `image` (ijk, NIfTI axis order)."""
    from fastsam3d_cli.imaging.volumes import affine_lps

    affine = affine_lps(image)
    return (np.asarray(points_lps, dtype=np.float64).reshape(-1, 3) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def all_spaces(points_lps: np.ndarray, image: Any, ras_from_ijk: np.ndarray | None = None
               ) -> list[dict[str, list[float]]]:
    """Each click in all three spaces: [{"ijk": [...], "ras": [...], "lps": [...]}, ...] (rounded to 1e-4).

    `points_lps` are in `image`'s geometry (what `to_lps` returns); with `ras_from_ijk` the world positions
    reported are the file's own (`to_lps`), so a click reads back as it was given.
    """
    points_lps = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    ijk = lps_to_ijk(points_lps, image)
    if ras_from_ijk is not None:
        affine = np.asarray(ras_from_ijk, dtype=np.float64)
        points_lps = (ijk @ affine[:3, :3].T + affine[:3, 3]) * _LPS_FROM_RAS
    return [{"ijk": _rounded(i), "ras": _rounded(p * _LPS_FROM_RAS), "lps": _rounded(p)}
            for i, p in zip(ijk, points_lps)]


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) + 0.0 for v in values]  # + 0.0 turns -0.0 into 0.0


def check_inside(obj: ClickObject, points_lps: np.ndarray, image: Any, space: str, first_number: int = 1) -> None:
    """BadInputError naming the object, the click and its voxel position when a click lies outside `image`.

    A click is inside when its nearest voxel exists: −0.5 ≤ index < size − 0.5 on every axis. Clicks are
    numbered from `first_number` (1-based) in the message.
    """
    size = np.asarray(image.GetSize(), dtype=np.float64)
    for number, (original, index) in enumerate(zip(obj.points, lps_to_ijk(points_lps, image)), start=first_number):
        if np.all(index >= -0.5) and np.all(index < size - 0.5):
            continue
        shape = "×".join(str(int(s)) for s in size)
        position = ", ".join(_fmt_index(v, n) for v, n in zip(index, size))
        raise BadInputError(
            f"click {number} of object '{obj.name}' ({space} {_fmt_point(original)}) is outside the volume: "
            f"voxel position (i, j, k) = ({position}), volume size {shape} (inside: -0.5 ≤ index < size - 0.5)",
            f"check the click and the file's space '{space}' (ijk is NIfTI axis order, not the reversed "
            "numpy-from-SimpleITK order; ras/lps are world mm)")


def _fmt_point(point: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in point) + "]"


def _fmt_index(value: float, size: float) -> str:
    """A voxel position for a message, rounded AWAY from the volume where it is outside: −0.51 shows as −0.51,
    never as an inside-looking −0.5; huge values in exponent form, not 300 digits."""
    if not math.isfinite(value) or abs(value) >= 1e6:
        return f"{value:.3g}"
    if value < -0.5:
        return f"{math.floor(round(value * 100, 6)) / 100:.2f}"
    if value >= size - 0.5:
        return f"{math.ceil(round(value * 100, 6)) / 100:.2f}"
    return f"{value:.2f}"


def safe_file_part(name: str) -> str:
    """An object name made safe for a file name ('left kidney' → 'left_kidney')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "object"


def write_click_file(click_file: ClickFile, path: str | Path) -> None:
    """Write the fastsam3d JSON form atomically (used by tests and the README example)."""
    from fastsam3d_cli.imaging.atomic import write_text_atomic

    write_text_atomic(Path(path), json.dumps(click_file.to_dict(), indent=2) + "\n")
