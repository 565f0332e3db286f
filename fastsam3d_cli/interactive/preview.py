"""Preview PNG of a segmentation: per object, three orthogonal slices through its centre (matplotlib Agg).

Slices are shown in the closest canonical orientation, radiological convention: axial and coronal with the
patient's right on the image's left, anterior (axial) / superior (coronal, sagittal) at the top, sagittal
with anterior on the left; pixel aspect follows the voxel spacing. The mask outline is drawn in the object's
colour; clicks are drawn projected onto each view — include clicks as green circles, exclude clicks as red
crosses — numbered in click order, solid when within 1.5 voxels of the slice, faint otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

INCLUDE_COLOUR = "#22dd22"
EXCLUDE_COLOUR = "#ff3030"
OUTLINE_COLOURS = ("#ffd000", "#00c8ff", "#ff66cc", "#ff8c00", "#b266ff", "#66ffcc")
NEAR_SLICE_VOXELS = 1.5
PANEL_INCHES = 3.2


def write_preview(path: Path, image: Any, labels: np.ndarray, objects: Sequence[dict[str, Any]]) -> None:
    """Write the PNG to `path` (call inside `atomic_path`).

    image: the input SimpleITK volume; labels: the labelmap on its grid (ijk); objects: dicts with
    name, label, clicks_ijk (N, 3) continuous input indices, includes (N,) bools.
    Object names in any script: an installed font that has their glyphs is used when there is one, else
    matplotlib's placeholder glyphs, without a warning on stderr (one line on stderr is the rule).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    with matplotlib.rc_context({"font.family": _font_families()}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
        _draw(path, image, labels, objects)


_FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans", "WenQuanYi Zen Hei", "Droid Sans Fallback",
                   "Arial Unicode MS", "Last Resort High-Efficiency")


def _font_families() -> list[str]:
    """DejaVu Sans, then the installed fonts of `_FALLBACK_FONTS` (matplotlib takes a missing glyph from the next)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in _FALLBACK_FONTS if name in installed]


def _draw(path: Path, image: Any, labels: np.ndarray, objects: Sequence[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    from fastsam3d_cli.imaging.volumes import array_ijk, image_from_array_ijk, to_canonical

    canonical = to_canonical(image)
    volume = array_ijk(canonical, np.float32)
    labelmap = array_ijk(to_canonical(image_from_array_ijk(labels, image)))
    spacing = np.asarray(canonical.GetSpacing())
    low, high = _window(volume)
    figure, axes = plt.subplots(len(objects), 3, figsize=(3 * PANEL_INCHES, PANEL_INCHES * len(objects) + 0.3),
                                squeeze=False, facecolor="black")
    for row, obj in enumerate(objects):
        clicks = _to_canonical_index(np.asarray(obj["clicks_ijk"], dtype=np.float64).reshape(-1, 3), image, canonical)
        mask = labelmap == obj["label"]
        centre = _centre(mask, clicks)
        colour = OUTLINE_COLOURS[row % len(OUTLINE_COLOURS)]
        for column, (view, axis) in enumerate((("axial", 2), ("coronal", 1), ("sagittal", 0))):
            ax = axes[row][column]
            index = int(np.clip(round(centre[axis]), 0, volume.shape[axis] - 1))
            slab, rows_axis, cols_axis = _display(np.take(volume, index, axis=axis), axis)
            outline, _, _ = _display(np.take(mask, index, axis=axis).astype(np.float32), axis)
            ax.imshow(slab, cmap="gray", vmin=low, vmax=high, interpolation="nearest",
                      aspect=spacing[rows_axis] / spacing[cols_axis])
            if outline.any():
                ax.contour(outline, levels=[0.5], colors=[colour], linewidths=1.2)
            _draw_clicks(ax, clicks, obj["includes"], axis, index, rows_axis, cols_axis, volume.shape)
            ax.set_title(f"{obj['name']} (label {obj['label']}) — {view} {index}", color="white", fontsize=8)
            ax.set_axis_off()
    handles = [plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor=INCLUDE_COLOUR,
                          label="include click"),
               plt.Line2D([], [], marker="x", linestyle="", color=EXCLUDE_COLOUR, label="exclude click")]
    figure.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False, labelcolor="white")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(str(path), format="png", dpi=100, facecolor="black")
    plt.close(figure)


def _window(volume: np.ndarray) -> tuple[float, float]:
    """Grey window: 1st–99th percentile of a subsample (fast on big volumes)."""
    sample = volume[::4, ::4, ::4].ravel() if volume.size > 4_000_000 else volume.ravel()
    low, high = np.percentile(sample, [1, 99]) if sample.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1.0)


def _to_canonical_index(clicks_ijk: np.ndarray, image: Any, canonical: Any) -> np.ndarray:
    from fastsam3d_cli.imaging.clickfile import lps_to_ijk, to_lps

    return lps_to_ijk(to_lps(clicks_ijk, "ijk", image), canonical) if clicks_ijk.size else clicks_ijk


def _centre(mask: np.ndarray, clicks: np.ndarray) -> np.ndarray:
    """Centre of the mask's bounding box (its centroid may fall outside a curved organ), else the first click."""
    found = np.argwhere(mask)
    if found.size:
        return (found.min(axis=0) + found.max(axis=0)) / 2.0
    return clicks[0] if clicks.size else np.asarray(mask.shape) / 2.0


def _display(plane: np.ndarray, axis: int) -> tuple[np.ndarray, int, int]:
    """Orient a canonical (RAS+) slice for display; returns (2D image, volume axis of rows, of columns).

    axial (k fixed): rows = j reversed (anterior up), cols = i reversed (patient right on the left);
    coronal (j fixed): rows = k reversed (superior up), cols = i reversed; sagittal (i fixed): rows = k
    reversed, cols = j reversed (anterior on the left).
    """
    if axis == 2:
        return plane[::-1, ::-1].T, 1, 0
    if axis == 1:
        return plane[::-1, ::-1].T, 2, 0
    return plane[::-1, ::-1].T, 2, 1


def _draw_clicks(ax: Any, clicks: np.ndarray, includes: Sequence[bool], axis: int, index: int, rows_axis: int,
                 cols_axis: int, shape: Sequence[int]) -> None:
    for number, (click, include) in enumerate(zip(clicks, includes), start=1):
        near = abs(click[axis] - index) <= NEAR_SLICE_VOXELS
        col = shape[cols_axis] - 1 - click[cols_axis]  # both display axes are reversed
        row = shape[rows_axis] - 1 - click[rows_axis]
        colour = INCLUDE_COLOUR if include else EXCLUDE_COLOUR
        alpha = 1.0 if near else 0.4
        if include:
            ax.plot(col, row, marker="o", markersize=7, markerfacecolor="none", markeredgecolor=colour,
                    markeredgewidth=1.6, alpha=alpha)
        else:
            ax.plot(col, row, marker="x", markersize=7, color=colour, markeredgewidth=1.8, alpha=alpha)
        ax.annotate(str(number), (col, row), xytext=(4, 4), textcoords="offset points", color=colour,
                    fontsize=7, alpha=alpha)
