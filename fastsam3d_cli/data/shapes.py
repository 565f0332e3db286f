"""Procedurally generated scenes: blobs, tubes and branching vessels, thin sheets, touching and nested objects,
lesion-like blobs inside larger objects, on a textured background of warped-noise regions.

Each object is a continuous field on the 64³ work grid (3 mm cells), > 0 inside, roughly a signed distance in
work voxels. Objects are painted in order (a later one covers an earlier one) into an integer label grid; the
target's field, with later objects cut out, is upsampled to the 128³ crop and thresholded at 0, so its
boundary is sub-voxel smooth and matches the painted image. A scene is a pure function of its generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastsam3d_cli.data.appearance import chance, randint, smooth_noise, uniform

_GRIDS: dict[int, torch.Tensor] = {}


def coordinates(size: int) -> torch.Tensor:
    """(3, S, S, S) voxel-centre coordinates of the work grid (cached; never modified)."""
    if size not in _GRIDS:
        axis = torch.arange(size, dtype=torch.float32)
        _GRIDS[size] = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    return _GRIDS[size]


def length(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean length over the first axis of a (3, ...) field (faster than norm(dim=0) on CPU)."""
    return torch.sqrt(vectors[0] * vectors[0] + vectors[1] * vectors[1] + vectors[2] * vectors[2])


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    """A uniformly random 3×3 rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def small_rotation(gen: torch.Generator, max_degrees: float) -> torch.Tensor:
    """Rotation by independent angles in ±max_degrees about the three axes."""
    matrix = torch.eye(3)
    for axis in range(3):
        angle = math.radians(uniform(gen, -max_degrees, max_degrees))
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        matrix = r @ matrix
    return matrix


def random_direction(gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(3, generator=gen)
    return v / v.norm().clamp_min(1e-6)


# ------------------------------------------------------------------------------------------- fields
def blob_field(gen: torch.Generator, size: int, centre: torch.Tensor, radii: torch.Tensor,
               roughness: float = 0.25, bumps: torch.Tensor | None = None) -> torch.Tensor:
    """Deformed ellipsoid: (1 − ellipsoidal radius) × smallest radius + a smooth surface perturbation.

    `bumps` (a unit smooth field; the scene's shared one) saves drawing one per blob: blobs sit in different
    places, so each meets another part of it.
    """
    rotation = random_rotation(gen)
    local = torch.einsum("ij,jxyz->ixyz", rotation, coordinates(size) - centre.view(3, 1, 1, 1))
    radius = length(local / radii.view(3, 1, 1, 1))
    scale = float(radii.min())
    if bumps is None:
        bumps = smooth_noise(gen, size, randint(gen, 3, 7))
    return (1.0 - radius) * scale + bumps * (roughness * float(radii.mean()))


def polyline(gen: torch.Generator, start: torch.Tensor, direction: torch.Tensor, length: float,
             segments: int, wiggle: float) -> torch.Tensor:
    """Points of a smooth random walk: a direction with momentum, `segments` steps covering `length`."""
    points = [start]
    step = length / segments
    heading = direction.clone()
    for _ in range(segments):
        heading = heading + wiggle * torch.randn(3, generator=gen)
        heading = heading / heading.norm().clamp_min(1e-6)
        points.append(points[-1] + step * heading)
    return torch.stack(points)


def tube_field(size: int, points: torch.Tensor, radius_start: float, radius_end: float) -> torch.Tensor:
    """radius − distance to the polyline (radius tapering linearly along it), evaluated near each segment only."""
    grid = coordinates(size)
    field = torch.full((size,) * 3, -1e3)
    count = len(points) - 1
    for k in range(count):
        a, b = points[k], points[k + 1]
        r = radius_start + (radius_end - radius_start) * (k + 0.5) / count
        margin = r + 2.0
        low = torch.minimum(a, b) - margin
        high = torch.maximum(a, b) + margin
        lo = [max(0, int(math.floor(float(v)))) for v in low]
        hi = [min(size, int(math.ceil(float(v))) + 1) for v in high]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        block = grid[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        ab = b - a
        t = ((block - a.view(3, 1, 1, 1)) * ab.view(3, 1, 1, 1)).sum(0) / max(float(ab.dot(ab)), 1e-6)
        nearest = a.view(3, 1, 1, 1) + t.clamp(0, 1) * ab.view(3, 1, 1, 1)
        distance = length(block - nearest)
        view = field[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        torch.maximum(view, r - distance, out=view)
    return field


def vessel_tree_field(gen: torch.Generator, size: int, centre: torch.Tensor, extent: float) -> torch.Tensor:
    """A trunk through `centre` with 1–4 tapering branches from random trunk points."""
    direction = random_direction(gen)
    trunk_radius = uniform(gen, 1.2, 3.5)
    start = centre - direction * extent / 2
    trunk = polyline(gen, start, direction, extent, segments=8, wiggle=uniform(gen, 0.1, 0.5))
    field = tube_field(size, trunk, trunk_radius, trunk_radius * uniform(gen, 0.6, 1.0))
    for _ in range(randint(gen, 1, 5)):
        origin = trunk[randint(gen, 2, len(trunk) - 1)]
        branch_dir = random_direction(gen)
        radius = trunk_radius * uniform(gen, 0.4, 0.8)
        branch = polyline(gen, origin, branch_dir, extent * uniform(gen, 0.25, 0.5), segments=5,
                          wiggle=uniform(gen, 0.1, 0.6))
        field = torch.maximum(field, tube_field(size, branch, radius, radius * 0.6))
    return field


def sheet_field(gen: torch.Generator, size: int, centre: torch.Tensor, extent: float) -> torch.Tensor:
    """A thin bent plate (half-thickness 0.8–2.5 work voxels) bounded by an ellipse in its plane."""
    normal_dir = random_direction(gen)
    offsets = coordinates(size) - centre.view(3, 1, 1, 1)
    height = (offsets * normal_dir.view(3, 1, 1, 1)).sum(0)
    bend = smooth_noise(gen, size, 3) * uniform(gen, 0.0, 0.25) * extent
    thickness = uniform(gen, 0.8, 2.5)
    plate = thickness - (height + bend).abs()
    in_plane = length(offsets - height * normal_dir.view(3, 1, 1, 1))
    bound = extent / 2 * (1 + 0.2 * smooth_noise(gen, size, 4)) - in_plane
    return torch.minimum(plate, bound)


def background_regions(gen: torch.Generator, size: int, count: int) -> torch.Tensor:
    """Organ-like label regions: argmax over `count` smooth noise maps (SynthMorph-style), int64 (S, S, S)."""
    cells, half = randint(gen, 3, 7), max(4, size // 2)
    best = smooth_noise(gen, half, cells)
    labels = torch.zeros((half,) * 3, dtype=torch.int64)
    for index in range(1, count):  # a running argmax: torch's argmax over dim 0 is slow on CPU
        candidate = smooth_noise(gen, half, cells)
        labels[candidate > best] = index
        best = torch.maximum(best, candidate)
    # drawn at half resolution (the maps are smooth; a quarter of the cost), nearest-neighbour up
    return F.interpolate(labels[None, None].float(), size=(size,) * 3, mode="nearest")[0, 0].long()


# -------------------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A generated scene on the work grid: int64 labels, the target's field (> 0 inside), label names."""

    labels: torch.Tensor
    target_field: torch.Tensor
    target_labels: list[int]
    kind: str


def _random_centre(gen: torch.Generator, size: int, spread: float) -> torch.Tensor:
    return torch.tensor([size / 2 + uniform(gen, -spread, spread) * size for _ in range(3)])


def _blob_radii(gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    base = uniform(gen, low, high)
    return torch.tensor([base * uniform(gen, 0.6, 1.4) for _ in range(3)])


def _target_blob(gen: torch.Generator, size: int, bumps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    centre = _random_centre(gen, size, 0.12)
    radii = _blob_radii(gen, 4.0, 16.0)
    return blob_field(gen, size, centre, radii, roughness=uniform(gen, 0.0, 0.35), bumps=bumps), centre, radii


def _scene_blob(gen, size, bumps):
    field, _, _ = _target_blob(gen, size, bumps)
    return [field], 0, "blob"


def _scene_vessel(gen, size, bumps):
    field = vessel_tree_field(gen, size, _random_centre(gen, size, 0.1), extent=uniform(gen, 0.4, 0.7) * size)
    return [field], 0, "vessels"


def _scene_tube(gen, size, bumps):
    direction = random_direction(gen)
    extent = uniform(gen, 0.35, 0.7) * size
    centre = _random_centre(gen, size, 0.1)
    radius = uniform(gen, 1.5, 5.0)
    points = polyline(gen, centre - direction * extent / 2, direction, extent, 8, uniform(gen, 0.05, 0.5))
    return [tube_field(size, points, radius, radius * uniform(gen, 0.5, 1.2))], 0, "tube"


def _scene_sheet(gen, size, bumps):
    return [sheet_field(gen, size, _random_centre(gen, size, 0.08), uniform(gen, 0.3, 0.6) * size)], 0, "sheet"


def _scene_touching(gen, size, bumps):
    first, centre, radii = _target_blob(gen, size, bumps)
    direction = random_direction(gen)
    other_radii = _blob_radii(gen, 4.0, 14.0)
    distance = float(radii.mean() + other_radii.mean()) * uniform(gen, 0.7, 0.95)
    second = blob_field(gen, size, centre + direction * distance, other_radii, roughness=0.2, bumps=bumps)
    # paint order decides which one owns the contact surface; the target is either one, or (25%) both
    fields = [first, second] if chance(gen, 0.5) else [second, first]
    return fields, (UNION if chance(gen, 0.25) else randint(gen, 0, 2)), "touching"


def _scene_nested(gen, size, bumps):
    centre = _random_centre(gen, size, 0.1)
    outer_radii = _blob_radii(gen, 10.0, 20.0)
    outer = blob_field(gen, size, centre, outer_radii, roughness=0.2, bumps=bumps)
    inner_radii = outer_radii * uniform(gen, 0.25, 0.55)
    inner_centre = centre + random_direction(gen) * float(outer_radii.min()) * uniform(gen, 0.0, 0.4)
    inner = blob_field(gen, size, inner_centre, inner_radii, roughness=0.3, bumps=-bumps)
    # the lesion, or the organ that holds it (the organ's label excludes the lesion: painted over)
    return [outer, inner], randint(gen, 0, 2), "nested"


UNION = -1  # a scene's target index meaning "all its objects"

SCENE_KINDS: dict[str, Callable] = {"blob": _scene_blob, "tube": _scene_tube, "vessels": _scene_vessel,
                                    "sheet": _scene_sheet, "touching": _scene_touching, "nested": _scene_nested}
SCENE_WEIGHTS = {"blob": 0.2, "tube": 0.12, "vessels": 0.18, "sheet": 0.1, "touching": 0.2, "nested": 0.2}


def generate_scene(gen: torch.Generator, size: int) -> Scene:
    """Background regions, 0–4 distractor objects, the scene's own objects (one is the target), painted in order."""
    kinds = list(SCENE_KINDS)
    weights = torch.tensor([SCENE_WEIGHTS[k] for k in kinds])
    kind = kinds[int(torch.multinomial(weights, 1, generator=gen))]
    regions = randint(gen, 2, 7)
    labels = background_regions(gen, size, regions)
    bumps = smooth_noise(gen, size, randint(gen, 3, 7))  # shared by the scene's blobs
    next_label = regions
    # distractors first (the target may cover them), anywhere in the crop
    for _ in range(randint(gen, 0, 5)):
        centre = _random_centre(gen, size, 0.45)
        if chance(gen, 0.7):
            field = blob_field(gen, size, centre, _blob_radii(gen, 3.0, 12.0), roughness=0.3, bumps=bumps)
        else:
            field = vessel_tree_field(gen, size, centre, extent=uniform(gen, 0.3, 0.7) * size)
        labels[field > 0] = next_label
        next_label += 1
    fields, target_index, kind = SCENE_KINDS[kind](gen, size, bumps)
    if target_index == UNION:  # every object of the scene together
        target_field = fields[0]
        for field in fields[1:]:
            target_field = torch.maximum(target_field, field)
        targets = [next_label + index for index in range(len(fields))]
    else:
        target_field, targets = fields[target_index], [next_label + target_index]
    for index, field in enumerate(fields):
        labels[field > 0] = next_label + index
        if target_index != UNION and index > target_index:  # later objects cover the target
            target_field = torch.minimum(target_field, -field)
    return Scene(labels, target_field, targets, kind)
