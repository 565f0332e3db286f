"""`fastsam3d infer` as a function: volume + click file → labelmap on the volume's own grid, plus a sidecar.

    result = infer_file("ct.nii.gz", "clicks.json")            # writes ct_mask.nii.gz and ct_mask.json
    result["objects"][0]["volume_ml"]

Everything that can be checked before the model runs is checked first (outputs, device, click file, volume,
clicks inside the volume, checkpoint), so a bad input costs nothing and writes nothing. All outputs are
written to temporary files and renamed together at the end: an error or Ctrl-C leaves no partial file.

Labelmap: uint8 (uint16 when a label exceeds 255). Where objects overlap the one with the higher probability
wins (the earlier object on an exact tie). For NIfTI input the output is written with the input's header
(qform, sform and their codes, pixdim, units), so every viewer puts it exactly on the input.
"""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastsam3d_cli.errors import UsageError
from fastsam3d_cli.weights.loading import (LoadedModel, load_inference_model, model_choice, sha256_of,
                                            torch_dtype)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Header-only formats keep the voxels in a second file the header names: it cannot be written to a temporary
# name and renamed with the header, so a labelmap is written as the single-file form of the same format.
DETACHED_HEADER_SUFFIXES = {".mhd": ".mha", ".nhdr": ".nrrd"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------ paths
def default_output_path(volume: Path) -> Path:
    """`<input stem>_mask.nii.gz` beside the input."""
    return volume.with_name(f"{image_stem(volume)}_mask.nii.gz")


def image_stem(path: Path) -> str:
    """File name without its image suffix (`ct.nii.gz` → `ct`)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path(output: Path) -> Path:
    """The sidecar beside the labelmap: its image suffix replaced by `.json` (`mask.nii.gz` → `mask.json`)."""
    return output.with_name(f"{image_stem(output)}.json")


def _check_output_suffix(path: Path, what: str) -> None:
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        writable = [s for s in IMAGE_SUFFIXES if s not in DETACHED_HEADER_SUFFIXES]
        raise UsageError(f"{what} {path} has no image file suffix",
                         f"end it with one of {', '.join(writable)} (e.g. mask.nii.gz)")
    for detached, single in DETACHED_HEADER_SUFFIXES.items():
        if path.name.lower().endswith(detached):
            raise UsageError(f"{what} {path} is a header-only format: its voxels would go to a second file that "
                             "cannot be written and moved together with it",
                             f"write the same format as one file: {image_stem(path)}{single}")


@dataclass
class _Outputs:
    labelmap: Path
    sidecar: Path
    preview: Path | None
    probabilities_dir: Path | None
    inputs: list[tuple[Path, str]]  # (path, description) of the files no output may replace


def _plan_outputs(volume: Path, clicks: Path, output: Path | None, preview: Path | None,
                  probabilities_dir: Path | None, overwrite: bool) -> _Outputs:
    """Validate every output location before any work (BadInputError / UsageError; nothing written).

    No output may replace the volume or the click file, `--overwrite` or not: the sidecar is always
    `<output stem>.json`, so `-o liver.nii.gz` next to a click file `liver.json` is refused.
    """
    from fastsam3d_cli.imaging.atomic import check_output_folder, check_output_path

    inputs = [(volume, "the input volume"), (clicks, "the click file")]
    labelmap = Path(output).expanduser() if output is not None else default_output_path(Path(volume).expanduser())
    _check_output_suffix(labelmap, "output")
    labelmap = check_output_path(labelmap, overwrite, "output", "-o", inputs)
    sidecar = check_output_path(sidecar_path(labelmap), overwrite, "sidecar (always <output stem>.json)", "-o",
                                inputs)
    if preview is not None:
        if not str(preview).lower().endswith(".png"):
            raise UsageError(f"--preview {preview} must end in .png", "e.g. --preview preview.png")
        preview = check_output_path(Path(preview).expanduser(), overwrite, "preview", "--preview", inputs)
    if probabilities_dir is not None:
        probabilities_dir = check_output_folder(probabilities_dir, "--probabilities")
    return _Outputs(labelmap, sidecar, preview, probabilities_dir, inputs)


def _check_probability_paths(outputs: _Outputs, objects: Sequence[Any], overwrite: bool) -> None:
    """Every object's probability map may be written (an existing one only with --overwrite, never an input)."""
    from fastsam3d_cli.imaging.atomic import check_output_path

    if outputs.probabilities_dir is not None and outputs.probabilities_dir.is_dir():
        for obj in objects:
            check_output_path(probability_path(outputs.probabilities_dir, outputs.labelmap, obj.label, obj.name),
                              overwrite, "probability map", "--probabilities", outputs.inputs)


def probability_path(folder: Path, labelmap: Path, label: int, name: str) -> Path:
    """`<folder>/<labelmap stem>_prob_<label>_<name>.nii.gz`."""
    from fastsam3d_cli.imaging.clickfile import safe_file_part

    return folder / f"{image_stem(labelmap)}_prob_{label}_{safe_file_part(name)}.nii.gz"


# ------------------------------------------------------------------------------------------ pipeline
def check_usage(max_crops: int, channel: int | None, model_options: tuple[Any, str, str, str] | None) -> None:
    """Every usage error (exit 2) of `infer` before any file check or model load, so the right error wins.

    model_options: (model, dtype, attention, device) to check, or None when the model is already loaded.
    """
    from fastsam3d_cli.device import check_attention_name, check_device_spec

    if int(max_crops) < 1:
        raise UsageError(f"--max-crops {max_crops} is invalid", "use 1 or more (1 turns crop extension off)")
    if channel is not None and channel < 0:
        raise UsageError(f"--channel {channel} is invalid", "channels are numbered from 0")
    if model_options is not None:
        model, dtype, attention, device = model_options
        model_choice(model)
        torch_dtype(dtype)
        check_attention_name(attention)
        check_device_spec(device)


def infer_file(volume: str | Path, clicks: str | Path, output: str | Path | None = None, *,
               model: str | None = None, checkpoint: str | Path | None = None, device: str = "auto",
               attention: str = "auto", preview: str | Path | None = None,
               probabilities: str | Path | None = None, overwrite: bool = False, max_crops: int = 8,
               channel: int | None = None, offline: bool | None = None, loaded: LoadedModel | None = None,
               progress: Progress | None = None, dtype: str = "float32",
               series: str | None = None, output_format: str | None = None,
               mesh: str | Path | None = None, mesh_format: str = "stl") -> dict[str, Any]:
    """Segment every object of a click file on `volume`; write the labelmap and its sidecar; return the sidecar.

    `loaded` re-uses a model loaded by `load_inference_model` (benchmarks, batch use); otherwise `model` /
    `checkpoint` / `device` / `attention` are loaded here. Writes: the labelmap (`output`, default
    `<stem>_mask.nii.gz` beside the input), `<output stem>.json`, and optionally a preview PNG and
    per-object probability maps (float32 NIfTI, linear interpolation onto the input grid) in `probabilities`.
    A folder or .zip input is a DICOM series (`series` picks one by UID); `output_format="dicom-seg"` (or an
    `output` ending in .dcm) adds a DICOM-SEG, `mesh` a folder of per-object STL (or `mesh_format="obj"`) surfaces
    (interactive/export.py).
    """
    from fastsam3d_cli.imaging.clickfile import check_inside, read_click_file, to_lps
    from fastsam3d_cli.device import resolve_device
    from fastsam3d_cli.imaging.volumes import read_image
    from fastsam3d_cli.imaging.world import world_geometry
    from fastsam3d_cli.interactive import export
    from fastsam3d_cli.interactive.predictor import Predictor

    say = progress or (lambda stage: None)
    wall_start = time.perf_counter()
    check_usage(max_crops, channel, None if loaded is not None else (model, dtype, attention, device))
    volume_path = Path(volume).expanduser()
    if not volume_path.exists():  # name a missing input as such, not as a missing output folder beside it
        read_image(volume_path, channel, strict_channel=True)
    if not Path(clicks).expanduser().is_file():  # inputs before outputs: a missing click file first
        read_click_file(clicks)
    output, want_seg = export.labelmap_and_format(volume_path, Path(output) if output is not None else None,
                                                  output_format)
    outputs = _plan_outputs(volume_path, Path(clicks).expanduser(), Path(output) if output is not None else None,
                            Path(preview) if preview is not None else None,
                            Path(probabilities) if probabilities is not None else None, overwrite)
    extras = export.plan_extra_outputs(outputs.labelmap, image_stem(outputs.labelmap), want_seg, mesh, overwrite,
                                       outputs.inputs, mesh_format)
    torch_device = loaded.device if loaded is not None else resolve_device(device)

    say("reading")
    read_start = time.perf_counter()
    click_file = read_click_file(clicks)
    _check_probability_paths(outputs, click_file.objects, overwrite)
    export.check_mesh_paths(extras, click_file.objects, overwrite, outputs.inputs)
    image, dicom = export.read_input(volume_path, channel, series)
    nifti_header = _nifti_header(volume_path, image)  # read once: the world geometry and the outputs' header
    world = world_geometry(volume_path, image, nifti_header)  # world clicks through the NIfTI's own affine
    world.check_space(click_file.space)
    points_lps = [to_lps(obj.points, click_file.space, image, world.ras_from_ijk) for obj in click_file.objects]
    for obj, lps in zip(click_file.objects, points_lps):
        check_inside(obj, lps, image, click_file.space)
    input_sha256 = dicom.sha256 if dicom is not None else sha256_of(volume_path)
    clicks_sha256 = sha256_of(Path(clicks))
    read_ms = (time.perf_counter() - read_start) * 1000.0

    if loaded is None:
        say("loading the model")
        loaded = load_inference_model(model, checkpoint, torch_device, attention, offline,
                                      progress=progress is not None, dtype=dtype)
    run_start = time.perf_counter()
    predictor = Predictor(loaded.model, loaded.device, max_crops=max_crops)
    say("preprocessing")
    predictor.set_volume(image, world=world)
    for obj in click_file.objects:  # the predictor maps them as above (same world geometry)
        say(f"segmenting {obj.name}")
        predictor.add_clicks(obj.points, obj.point_labels, space=click_file.space, object=obj.name,
                             return_mask=False)
        if obj is not click_file.objects[-1]:  # one object's merged canvas in memory at a time; the
            predictor.free_merged(obj.name)     # last one is used right away by compose_labelmap

    say("pasting back")
    labels = compose_labelmap(predictor, click_file.objects)
    result = _sidecar(volume_path, image, input_sha256, click_file, Path(clicks), clicks_sha256, outputs, labels,
                      predictor, loaded, channel, max_crops, nifti_header)
    export.describe(extras, result, dicom, click_file.objects)
    say("writing")
    _write_outputs(outputs, labels, image, nifti_header, predictor, click_file, result,
                   timings_start=(read_ms, run_start, wall_start, loaded), extra=(extras, dicom))
    return result


def compose_labelmap(predictor: Any, objects: Sequence[Any], free_merged: bool = True) -> np.ndarray:
    """One labelmap on the input grid (ijk): uint8, or uint16 if a label exceeds 255; higher probability wins.

    free_merged: drop each object's merged-logits cache once read (a batch run keeps memory flat); an
    interactive caller that clicks on afterwards (`serve`) keeps it, so its next click stays incremental."""
    size = tuple(predictor.input_image.GetSize())
    patches = []
    for obj in objects:
        patches.append((obj.label, predictor.input_logits(obj.name)))
        if free_merged:
            predictor.free_merged(obj.name)
    return compose_patches(size, patches)


LogitPatch = tuple[Sequence[int], np.ndarray]  # (start ijk, logits) of one object on part of the input grid


def compose_patches(size: Sequence[int], patches: Sequence[tuple[int, LogitPatch | None]],
                    box: tuple[Sequence[int], Sequence[int]] | None = None) -> np.ndarray:
    """The labelmap of (label, `Predictor.input_logits` patch) pairs, in order: a voxel takes the label of the
    object with the highest positive logit there (the first on a tie). `box` (start, shape): only that part
    of the grid (what `serve` sends the page after a click). uint8, or uint16 if a label exceeds 255."""
    start, shape = (np.zeros(3, int), np.asarray(size, int)) if box is None else (np.asarray(box[0], int),
                                                                                  np.asarray(box[1], int))
    dtype = np.uint8 if not patches or max(label for label, _ in patches) <= 255 else np.uint16
    labels = np.zeros(tuple(int(n) for n in shape), dtype=dtype)
    best: np.ndarray | None = None  # the winning logit per voxel, once two objects could overlap
    for label, patch in patches:
        if patch is None:
            continue
        patch_start, logits = np.asarray(patch[0], int), patch[1]
        lo = np.maximum(patch_start, start)
        hi = np.minimum(patch_start + logits.shape, start + shape)
        if np.any(hi <= lo):
            continue
        values = logits[tuple(slice(a, b) for a, b in zip(lo - patch_start, hi - patch_start))]
        region = tuple(slice(a, b) for a, b in zip(lo - start, hi - start))
        if len(patches) == 1:
            labels[region][values > 0] = label
            continue
        if best is None:
            best = np.full(labels.shape, -np.inf, dtype=np.float32)
        wins = (values > 0) & (values > best[region])
        labels[region][wins] = label
        best[region][wins] = values[wins]
    return labels


# ------------------------------------------------------------------------------------------ sidecar
def _sidecar(volume: Path, image: Any, input_sha256: str, click_file: Any, clicks_path: Path, clicks_sha256: str,
             outputs: _Outputs, labels: np.ndarray, predictor: Any, loaded: LoadedModel, channel: int | None,
             max_crops: int, nifti_header: Any) -> dict[str, Any]:
    import torch

    from fastsam3d_cli import __version__
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1) if labels.size else np.zeros(1, int)
    objects, warnings = [], list(click_file.warnings)  # e.g. unknown click-file keys
    for obj in click_file.objects:
        report = predictor.object_report(obj.name)
        voxels = int(counts[obj.label]) if obj.label < len(counts) else 0
        objects.append({"name": obj.name, "label": obj.label, "voxels": voxels,
                        "volume_ml": round(voxels * voxel_ml, 4), **{k: v for k, v in report.items() if k != "name"}})
        if report["unused_clicks"]:
            warnings.append(f"object '{obj.name}': clicks {report['unused_clicks']} lie outside its {max_crops} "
                            "crop(s) and were not used; raise --max-crops")
        if voxels == 0:
            warnings.append(f"object '{obj.name}' is empty in the output")
    warnings.extend(predictor.world.notes)
    probabilities = ({o.name: str(probability_path(outputs.probabilities_dir, outputs.labelmap, o.label, o.name))
                      for o in click_file.objects} if outputs.probabilities_dir is not None else None)
    return {
        "fastsam3d": __version__,
        "input": {"path": str(volume.absolute()), "sha256": input_sha256, "channel": channel,
                  **_grid(image), "pixel_type": image.GetPixelIDTypeAsString()},
        "clicks_file": {"path": str(clicks_path.absolute()), "sha256": clicks_sha256, "format": click_file.format,
                        "space": click_file.space},
        "outputs": {"labelmap": str(outputs.labelmap), "sidecar": str(outputs.sidecar),
                    "preview": str(outputs.preview) if outputs.preview else None, "probabilities": probabilities},
        "labelmap_dtype": str(labels.dtype),
        **model_record(loaded), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "pipeline": pipeline_record(predictor, max_crops),
        "crops_run": sum(o["crops_run"] for o in objects),
        "objects": objects,
        "warnings": warnings,
        "timings_ms": {},
    }


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What ran, for a sidecar (`infer`, `serve`): the model and its source, device, attention, dtype."""
    return {"model": {"preset": loaded.preset, "weights_name": loaded.weights_name,
                      "checkpoint": str(loaded.checkpoint), "checkpoint_sha256": loaded.checkpoint_sha256,
                      "fallback": loaded.fallback},
            "device": str(loaded.device), "attention": loaded.attention, "dtype": loaded.dtype}


def pipeline_record(predictor: Any, max_crops: int) -> dict[str, Any]:
    """How the Predictor turned clicks into masks, for a sidecar (`prior`: the classical prior, if the model has one)."""
    prior = getattr(predictor, "prior", None)
    return {"spacing_mm": predictor.spacing_mm, "crop_size": predictor.crop_size,
            "clicks": "one new point per decoder step + the previous low-res logits (zeros first)"
            if prior is None else "one new point per decoder step; mask = classical prior P + gate x decoder "
                                  "output, prompt avgpool(P) + the previous residual (docs/models.md)",
            "prior": None if prior is None else prior.to_dict(),
            "max_crops": max_crops, "extension_step": predictor.extension_step,
            "overlap": "higher probability wins", "canonical_grid": _grid(predictor.canonical_grid)}


def _grid(image: Any) -> dict[str, Any]:
    return {"size": list(image.GetSize()), "spacing": [round(v, 6) for v in image.GetSpacing()],
            "origin_lps": [round(v, 6) for v in image.GetOrigin()],
            "direction_lps": [round(v, 6) for v in image.GetDirection()]}


def _timings(predictor: Any, read_ms: float, run_start: float, wall_start: float, loaded: LoadedModel,
             write_ms: float) -> dict[str, Any]:
    def total(stage: str) -> float:
        return sum(t["ms"] for t in predictor.timings if t["stage"] == stage)

    decode = [{"object": t["object"], "click": t["click"], "crop": t["crop"], "ms": round(t["ms"], 2)}
              for t in predictor.timings if t["stage"] == "decode"]
    encode = [{"crop": t["crop"], "ms": round(t["ms"], 2)} for t in predictor.timings if t["stage"] == "encode"]
    now = time.perf_counter()
    return {"read": round(read_ms, 2), "preprocess": round(total("preprocess"), 2), "encode": round(total("encode"), 2),
            "decode": round(total("decode"), 2), "paste": round(total("paste"), 2), "write": round(write_ms, 2),
            "after_model_load": round(read_ms + (now - run_start) * 1000.0, 2),
            "load_model": round(loaded.load_ms, 2) if loaded.load_ms else 0.0,
            "wall": round((now - wall_start) * 1000.0, 2),
            "encode_per_crop": encode, "decode_per_click": decode}


# ------------------------------------------------------------------------------------------ writing
def _write_outputs(outputs: _Outputs, labels: np.ndarray, image: Any, nifti_header: Any, predictor: Any,
                   click_file: Any, result: dict[str, Any], timings_start: tuple, extra: tuple | None = None) -> None:
    """Write everything to temporary files, then rename them all; nothing is left behind on failure."""
    import json

    from fastsam3d_cli.imaging.atomic import atomic_group

    read_ms, run_start, wall_start, loaded = timings_start
    write_start = time.perf_counter()
    created_dir = False
    try:
        with atomic_group() as group:  # every output appears, or none
            write_volume(labels, image, nifti_header, group.path(outputs.labelmap))
            if outputs.probabilities_dir is not None:
                if not outputs.probabilities_dir.exists():
                    outputs.probabilities_dir.mkdir()
                    created_dir = True
                for obj in click_file.objects:
                    path = probability_path(outputs.probabilities_dir, outputs.labelmap, obj.label, obj.name)
                    write_volume(predictor.probabilities(obj.name), image, nifti_header, group.path(path))
            if outputs.preview is not None:
                from fastsam3d_cli.interactive.preview import write_preview

                write_preview(group.path(outputs.preview), image, labels, _preview_objects(predictor, click_file))
            if extra is not None:  # DICOM-SEG and meshes (interactive/export.py)
                from fastsam3d_cli.interactive.export import write_extra_outputs

                write_extra_outputs(group, extra[0], labels, image, extra[1], click_file.objects, loaded, result)
            sidecar_tmp = group.path(outputs.sidecar)
            write_ms = (time.perf_counter() - write_start) * 1000.0
            result["timings_ms"] = _timings(predictor, read_ms, run_start, wall_start, loaded, write_ms)
            sidecar_tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if extra is not None:
            from fastsam3d_cli.interactive.export import remove_created_dirs

            remove_created_dirs(extra[0])
        if created_dir:
            with contextlib.suppress(OSError):
                outputs.probabilities_dir.rmdir()
        raise


def _preview_objects(predictor: Any, click_file: Any) -> list[dict[str, Any]]:
    from fastsam3d_cli.imaging.clickfile import lps_to_ijk

    items = []
    for obj in click_file.objects:
        state = predictor.object_state(obj.name)
        lps = np.array([c.lps for c in state.clicks])
        items.append({"name": obj.name, "label": obj.label, "clicks_ijk": lps_to_ijk(lps, predictor.input_image),
                      "includes": [c.include for c in state.clicks]})
    return items


def write_volume(array: np.ndarray, image: Any, nifti_header: Any, path: Path) -> None:
    """Write an ijk array on `image`'s grid to `path`.

    NIfTI output of a NIfTI input keeps the input header (qform, sform, codes, pixdim, units) with only the
    data type, scaling and description changed; everything else gets SimpleITK's `CopyInformation`.
    """
    import SimpleITK as sitk

    from fastsam3d_cli.imaging.volumes import image_from_array_ijk

    if nifti_header is not None and path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        header = nifti_header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = b"fastsam3d"
        header["intent_code"] = 0
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        nii = image_class(np.asarray(array), None, header)
        nii.set_qform(nifti_header.get_qform(), code=int(nifti_header["qform_code"]))
        nii.set_sform(nifti_header.get_sform(), code=int(nifti_header["sform_code"]))
        _restore_header_geometry(nii.header, nifti_header)
        nib.save(nii, str(path))
        return
    sitk.WriteImage(image_from_array_ijk(array, image), str(path), useCompression=True)


def _restore_header_geometry(header: Any, source: Any) -> None:
    """Copy the raw qform/sform fields (bit-exact) that set_qform/set_sform may have recomputed."""
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        header[field] = source[field]
    pixdim = header["pixdim"].copy()
    pixdim[:4] = source["pixdim"][:4]
    header["pixdim"] = pixdim


def _nifti_header(path: Path, image: Any) -> Any:
    """The input's NIfTI header when the input is a 3D-compatible NIfTI on the same voxel grid, else None."""
    from fastsam3d_cli.imaging.world import nifti_header

    return nifti_header(path, image)
