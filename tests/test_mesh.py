"""imaging/mesh.py on small phantoms: vertices in LPS through the image's geometry, closed outward surfaces
whatever the handedness of the axes, the STL round trip and its SPACE=LPS header."""
from __future__ import annotations

import numpy as np
import pytest

from fastsam3d_cli.imaging.mesh import mesh_volume_mm3, read_obj, read_stl, surface_lps, write_obj, write_stl
from fastsam3d_cli.imaging.volumes import affine_lps
from infer_phantoms import make_image

pytest.importorskip("skimage")


def _ball(shape=(20, 18, 16), centre=(9.0, 8.0, 7.0), radius=5.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (-1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 1, 0, 0, 0, -1, 1, 0, 0)])
def test_ball_surface_is_outward_closed_and_placed_in_lps(direction, tmp_path):
    mask = _ball()
    image = make_image(mask.astype(np.uint8), spacing=(1.2, 0.8, 2.0), origin=(10.0, -20.0, 30.0),
                       direction=direction)
    vertices, faces = surface_lps(mask, image)
    voxel_ml = 1.2 * 0.8 * 2.0 * mask.sum()
    assert 0.85 * voxel_ml < mesh_volume_mm3(vertices, faces) < 1.05 * voxel_ml  # positive: normals outwards
    centre_lps = affine_lps(image) @ [9.0, 8.0, 7.0, 1.0]
    assert np.allclose(vertices.mean(axis=0), centre_lps[:3], atol=0.3)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)  # closed: every edge shared by two triangles
    write_stl(tmp_path / "ball.stl", vertices, faces)
    header, triangles = read_stl(tmp_path / "ball.stl")
    assert b"SPACE=LPS" in header and len(header) == 80
    assert np.allclose(triangles, vertices[faces], atol=1e-4)
    # stored normals point away from the ball's centre
    raw = (tmp_path / "ball.stl").read_bytes()[84:]
    normals = np.frombuffer(raw, dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))["n"]
    outward = np.einsum("ij,ij->i", normals, triangles.mean(axis=1) - centre_lps[:3])
    assert (outward > 0).mean() > 0.99


def test_object_on_the_border_gets_a_closed_surface():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[:3, :, :] = True  # touches five faces of the volume
    image = make_image(mask.astype(np.uint8), spacing=(1.0, 1.0, 1.0))
    vertices, faces = surface_lps(mask, image)
    assert mesh_volume_mm3(vertices, faces) > 0.8 * mask.sum()


def test_empty_mask_gives_no_triangles(tmp_path):
    image = make_image(np.zeros((4, 4, 4), dtype=np.uint8))
    vertices, faces = surface_lps(np.zeros((4, 4, 4), dtype=bool), image)
    assert len(faces) == 0
    write_stl(tmp_path / "e.stl", vertices, faces)
    assert read_stl(tmp_path / "e.stl")[1].shape == (0, 3, 3)


def test_obj_round_trip_keeps_the_same_triangles_and_says_lps(tmp_path):
    mask = _ball()
    image = make_image(mask.astype(np.uint8), spacing=(1.2, 0.8, 2.0), origin=(10.0, -20.0, 30.0))
    vertices, faces = surface_lps(mask, image)
    write_obj(tmp_path / "ball.obj", vertices, faces)
    write_stl(tmp_path / "ball.stl", vertices, faces)
    comments, triangles = read_obj(tmp_path / "ball.obj")
    assert any("SPACE=LPS" in line for line in comments)
    assert np.allclose(triangles, read_stl(tmp_path / "ball.stl")[1], atol=1e-4)
