"""Surface meshes of labelmap objects: marching cubes (scikit-image) → binary STL (or OBJ) in LPS millimetres.

The surface is the 0.5 iso-surface of the object's binary mask, so every vertex lies halfway between a voxel
centre inside and one outside. Vertices are mapped through the image's voxel → LPS matrix; the STL header
says `SPACE=LPS` (the marker 3D Slicer writes and reads), so the mesh loads where the mask is; an OBJ says it
in a leading comment line. Triangles are
wound so their normals point out of the object, whatever the handedness of the image's axes.
Needs the optional extra `[mesh]` (scikit-image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fastsam3d_cli.errors import UsageError
from fastsam3d_cli.imaging.volumes import affine_lps

STL_HEADER = b"fastsam3d surface mesh, units mm, SPACE=LPS"


def require_scikit_image() -> None:
    """UsageError (exit 2) when the optional extra is missing: checked before any work is done."""
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        raise UsageError("--mesh needs scikit-image, which is not installed",
                         "pip install 'fastsam3d-cli[mesh]'") from None


def surface_lps(mask_ijk: np.ndarray, image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(vertices N×3 in LPS mm, faces M×3 indices) of a boolean ijk mask on `image`'s grid; empty if no voxel.

    The mask is padded by one voxel so an object that touches the volume's border still gets a closed surface.
    """
    from skimage.measure import marching_cubes

    mask = np.asarray(mask_ijk, dtype=bool)
    if not mask.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    padded = np.pad(mask, 1).astype(np.float32)
    vertices, faces, _, _ = marching_cubes(padded, level=0.5, allow_degenerate=False)
    ijk = vertices.astype(np.float64) - 1.0  # undo the padding
    affine = affine_lps(image)
    lps = ijk @ affine[:3, :3].T + affine[:3, 3]
    faces = faces.astype(np.int64)
    if _signed_volume(lps, faces) < 0:  # axes of opposite handedness mirror the winding: restore outward normals
        faces = faces[:, ::-1].copy()
    return lps, faces


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, n]] for n in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def mesh_volume_mm3(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed volume of a closed triangle mesh (positive when the normals point outwards)."""
    return _signed_volume(vertices, faces) if len(faces) else 0.0


def write_stl(path: Path, vertices: np.ndarray, faces: np.ndarray, header: bytes = STL_HEADER) -> None:
    """Binary STL: 80-byte header, triangle count, then per triangle its unit normal and 3 vertices (float32)."""
    record = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    triangles = vertices[faces] if len(faces) else np.zeros((0, 3, 3))
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    data = np.zeros(len(faces), dtype=record)
    data["normal"], data["vertices"] = normals, triangles
    with open(path, "wb") as handle:
        handle.write(header[:80].ljust(80, b" "))
        handle.write(np.uint32(len(faces)).tobytes())
        handle.write(data.tobytes())


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, header: bytes = STL_HEADER) -> None:
    """Wavefront OBJ (text): a `# …SPACE=LPS` comment, `v x y z` per vertex, `f a b c` (1-based) per triangle."""
    lines = [f"# {header.decode('ascii')}", f"# {len(vertices)} vertices, {len(faces)} triangles"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def read_obj(path: Path) -> tuple[list[str], np.ndarray]:
    """(comment lines, triangles M×3×3) of an OBJ written by `write_obj`."""
    comments, vertices, faces = [], [], []
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif line.startswith("v "):
            vertices.append([float(v) for v in line.split()[1:4]])
        elif line.startswith("f "):
            faces.append([int(v) - 1 for v in line.split()[1:4]])
    vertices_array = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    return comments, vertices_array[np.asarray(faces, dtype=np.int64).reshape(-1, 3)]


def read_stl(path: Path) -> tuple[bytes, np.ndarray]:
    """(header, triangles M×3×3) of a binary STL written by `write_stl` (used by the tests and for checks)."""
    raw = Path(path).read_bytes()
    count = int(np.frombuffer(raw[80:84], dtype="<u4")[0])
    record = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    data = np.frombuffer(raw[84:84 + count * record.itemsize], dtype=record)
    return raw[:80], data["vertices"].astype(np.float64)
