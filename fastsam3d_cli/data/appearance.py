"""Random image appearance for generated training samples: smooth fields, per-label intensities, scanner effects.

Everything works on small torch tensors (the 64³ "work grid", 3 mm cells for a 128³ crop at 1.5 mm) and is
driven by one `torch.Generator`, so a sample is a pure function of its seed. Smooth fields are drawn at a few
voxels per side and upsampled (trilinear): far cheaper than filtering a 128³ volume, and as smooth.

Recipes (reference/quality.md §1): SynthSeg-style Gaussian intensities per label (mean U(25, 225), sd
U(5, 25) on a 0–255 scale) or CT-like Hounsfield clusters, a Perlin-like multi-octave texture, a bias field
exp(N(0, σ)) at coarse resolution, gamma exp(N(0, 0.4)), low-resolution / thick-slice simulation (average
down, interpolate back), additive noise.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

WORK_SIZE = 64  # work-grid voxels per side: the 128³ crop at half resolution

# CT-like intensity clusters in HU (low, high): a label draws its mean uniformly in one cluster.
HU_CLUSTERS: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -950.0),
    "lung": (-880.0, -600.0),
    "fat": (-130.0, -60.0),
    "fluid": (-5.0, 25.0),
    "soft": (20.0, 90.0),
    "contrast": (150.0, 500.0),
    "bone": (300.0, 1400.0),
}
# Cluster probabilities for a label with no name hint (soft tissue most often, like real anatomy).
HU_DEFAULT_WEIGHTS = {"air": 0.03, "lung": 0.05, "fat": 0.15, "fluid": 0.12, "soft": 0.45, "contrast": 0.1,
                      "bone": 0.1}
# Name keywords → the cluster a label of that name usually has (used with probability NAME_HINT_P).
NAME_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lung",), "lung"),
    (("vertebra", "rib", "femur", "hip", "sacrum", "skull", "bone", "humerus", "scapula", "clavicula", "sternum",
      "costal"), "bone"),
    (("aorta", "artery", "vena", "vein", "heart", "atrial", "ventricle"), "contrast"),
    (("bladder", "gallbladder", "csf", "ventric"), "fluid"),
    (("fat",), "fat"),
)
NAME_HINT_P = 0.7


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One float uniform in [low, high)."""
    return low + (high - low) * float(torch.rand((), generator=gen))


def normal(gen: torch.Generator, mean: float = 0.0, sd: float = 1.0) -> float:
    return mean + sd * float(torch.randn((), generator=gen))


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """One int in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def upsample(field: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a (C, D, H, W) or (D, H, W) field to `size` per side."""
    squeeze = field.dim() == 3
    x = field[None, None] if squeeze else field[None]
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    out = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return out[0, 0] if squeeze else out[0]


def smooth_noise(gen: torch.Generator, size: int, cells: int, channels: int | None = None) -> torch.Tensor:
    """Unit-variance-ish random field, smooth on the scale of size/cells voxels (randn on cells³, upsampled)."""
    shape = (cells,) * 3 if channels is None else (channels,) + (cells,) * 3
    return upsample(torch.randn(shape, generator=gen), size)


def perlin_like(gen: torch.Generator, size: int, base_cells: int = 4, octaves: int = 3,
                persistence: float = 0.5) -> torch.Tensor:
    """Sum of smooth noise octaves (cells doubling, amplitude × persistence), normalised to unit std."""
    half = max(4, size // 2)  # octaves summed at half resolution, one upsample to full: 3× cheaper
    total = torch.zeros((half,) * 3)
    amplitude, cells = 1.0, base_cells
    for _ in range(octaves):
        total += amplitude * smooth_noise(gen, half, min(cells, half))
        amplitude *= persistence
        cells *= 2
    total = upsample(total, size)
    return total / total.std().clamp_min(1e-6)


def bias_field(gen: torch.Generator, size: int, strength: float) -> torch.Tensor:
    """Multiplicative bias exp(strength · N(0, 1) field on 4³), ~1 on average."""
    return torch.exp(strength * smooth_noise(gen, size, 4))


def label_intensities(gen: torch.Generator, count: int, ct_like: bool,
                      names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, sds) for `count` labels (label 0 included). CT-like: HU clusters (name hints when given),
    sd 5–40 HU; otherwise SynthSeg's mean U(25, 225), sd U(5, 25) on a 0–255 scale."""
    if not ct_like:
        means = 25 + 200 * torch.rand(count, generator=gen)
        sds = 5 + 20 * torch.rand(count, generator=gen)
        return means, sds
    clusters = list(HU_CLUSTERS)
    weights = torch.tensor([HU_DEFAULT_WEIGHTS[c] for c in clusters])
    means = torch.empty(count)
    for label in range(count):
        cluster = None
        name = names[label].lower() if names is not None and label < len(names) else ""
        if name and chance(gen, NAME_HINT_P):
            cluster = next((c for keys, c in NAME_HINTS if any(k in name for k in keys)), None)
        if cluster is None:
            cluster = clusters[int(torch.multinomial(weights, 1, generator=gen))]
        low, high = HU_CLUSTERS[cluster]
        means[label] = uniform(gen, low, high)
    sds = 5 + 35 * torch.rand(count, generator=gen)
    return means, sds


def paint(labels: torch.Tensor, means: torch.Tensor, sds: torch.Tensor, gen: torch.Generator,
          texture_scale: float = 1.0) -> torch.Tensor:
    """Image from an int64 label grid: per-label mean + per-label sd × a shared Perlin-like texture + white noise.

    The texture is correlated inside a label (organ-like), the white part adds cell-level speckle.
    """
    size = labels.shape[0]
    texture = perlin_like(gen, size, base_cells=randint(gen, 3, 9), octaves=3)
    white = torch.randn(labels.shape, generator=gen)
    mix = uniform(gen, 0.3, 0.9)
    field = texture_scale * (mix * texture + (1 - mix) * white)
    return means[labels] + sds[labels] * field


def simulate_resolution(image: torch.Tensor, gen: torch.Generator, p_thick: float = 0.35,
                        p_iso: float = 0.25) -> torch.Tensor:
    """Low-resolution / thick-slice simulation on the work grid: average down, interpolate back.

    Thick slices: one axis ×2–4 (6–12 mm at a 3 mm work cell); isotropic: all axes ×1.5–2 (up to ~6 mm).
    """
    size = image.shape[-1]
    if chance(gen, p_thick):
        axis = randint(gen, 0, 3)
        factor = uniform(gen, 1.5, 4.0)
        low = [size] * 3
        low[axis] = max(4, int(round(size / factor)))
        image = upsample(F.interpolate(image[None, None], size=tuple(low), mode="area")[0, 0], size)
    elif chance(gen, p_iso / (1 - p_thick)):
        factor = uniform(gen, 1.3, 2.0)
        low = max(8, int(round(size / factor)))
        image = upsample(F.interpolate(image[None, None], size=(low,) * 3, mode="area")[0, 0], size)
    return image


def blur(image: torch.Tensor, gen: torch.Generator, max_sigma: float = 1.0) -> torch.Tensor:
    """Small Gaussian blur (σ up to `max_sigma` work voxels), separable, on the work grid."""
    sigma = uniform(gen, 0.0, max_sigma)
    return image if sigma < 0.3 else gaussian_blur(image, sigma)


def gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (σ in voxels, kernel radius ⌈2σ⌉) of a (D, H, W) tensor, replicate padding."""
    radius = max(1, int(math.ceil(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        x = F.conv3d(F.pad(x, _pad_for(axis, radius), mode="replicate"), kernel.view(shape))
    return x[0, 0]


def _pad_for(axis: int, radius: int) -> tuple[int, ...]:
    pads = [0] * 6  # F.pad order: last axis first
    pads[2 * (2 - axis)] = pads[2 * (2 - axis) + 1] = radius
    return tuple(pads)


def gamma(image: torch.Tensor, gen: torch.Generator, sd: float = 0.4) -> torch.Tensor:
    """Rescale to [0, 1], raise to exp(N(0, sd)), restore the original range (keeps CT sign structure coarse)."""
    low, high = float(image.min()), float(image.max())
    if high - low < 1e-6:
        return image
    unit = (image - low) / (high - low)
    return low + (high - low) * unit.pow(math.exp(normal(gen, 0.0, sd)))


def finish_image(work_image: torch.Tensor, gen: torch.Generator, out_size: int, noise_sd: float,
                 bias_strength: float, ct_like: bool, air_floor: float | None = None) -> torch.Tensor:
    """Scanner effects on a painted work-grid image, then the z-normalised (out_size³) crop.

    Bias, low resolution, blur and gamma (not for CT-like images) act on the work grid; `air_floor` (a
    quantile in [0, 1]) shifts the image so that its darkest part is ≤ 0, like MR air, which the
    normalisation then leaves out. The normalisation statistics (over voxels > 0, as the real dataset's) are
    taken on the work grid with the noise variance added, so the full-size crop costs one upsample, one
    noise draw and one fused add.
    """
    size = work_image.shape[-1]
    image = work_image
    if bias_strength > 0:
        if ct_like:  # CT has little multiplicative bias: a small additive drift instead
            image = image + bias_strength * 40.0 * smooth_noise(gen, size, 4)
        else:
            image = image * bias_field(gen, size, bias_strength)
    image = simulate_resolution(image, gen)
    image = blur(image, gen)
    if not ct_like:
        image = gamma(image, gen).clamp_min(0)
    if air_floor is not None:
        image = image - float(torch.quantile(image[::2, ::2, ::2].flatten(), air_floor))
    mean, std = positive_statistics(image)
    std = math.sqrt(std * std + noise_sd * noise_sd) if std > 0 or noise_sd > 0 else 1.0
    crop = upsample((image - mean) / std, out_size)
    if noise_sd > 0:
        crop.add_(white_noise(gen, out_size), alpha=noise_sd / std)
    return crop


NOISE_BANK_MARGIN = 24
_NOISE_BANKS: dict[int, torch.Tensor] = {}


def white_noise(gen: torch.Generator, size: int) -> torch.Tensor:
    """N(0, 1) voxel noise of size³: a window at a random offset of a fixed, larger noise volume.

    Drawing 2 M normal numbers per sample costs more than the rest of a crop's full-size work; a window of
    a bank made once per process (from a fixed seed, so still a pure function of `gen`) is free, and the
    (margin + 1)³ offsets never repeat a pattern at any voxel a model could notice.
    """
    if size not in _NOISE_BANKS:
        bank_gen = torch.Generator().manual_seed(20_231_016)
        _NOISE_BANKS[size] = torch.randn((size + NOISE_BANK_MARGIN,) * 3, generator=bank_gen)
    start = [randint(gen, 0, NOISE_BANK_MARGIN + 1) for _ in range(3)]
    return _NOISE_BANKS[size][start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size]


def positive_statistics(image: torch.Tensor) -> tuple[float, float]:
    """(mean, unbiased std) over voxels > 0; (mean of all, 0) when fewer than two are positive."""
    mask = (image > 0).to(image.dtype)
    count = float(mask.sum())
    if count < 2:
        return float(image.mean()), 0.0
    masked = image * mask
    total = float(masked.sum())
    squares = float((masked * image).sum())
    mean = total / count
    return mean, math.sqrt(max(squares - count * mean * mean, 0.0) / (count - 1))
