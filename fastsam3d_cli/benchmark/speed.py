"""`run_benchmark`: honest milliseconds per 128³ volume, FLOPs and peak memory for models × backends × dtypes.

    from fastsam3d_cli.benchmark.speed import run_benchmark
    result = run_benchmark(models=["sam-med3d", "fastsam3d"], attentions=["sdpa"], dtypes=["bfloat16"])
    result.to_dict()["configs"][1]["encoder"]["median_ms"]

What one configuration measures (all inside `torch.inference_mode()`, random inputs of the right shape,
deterministic random weights — speed does not depend on their values):

* one *interaction* = encode a (B,1,128,128,128) volume, then `clicks` decoder steps, each with one new
  click and the previous step's (B,1,32,32,32) low-res logits. Every step is timed on its own and the
  whole interaction as one span (see `Clock`: CUDA events with synchronisation, else a monotonic clock).
* the FIRST interaction (lazy initialisation, kernel selection, caches) is reported on its own as
  `first_call`; then `warmup` interactions are run and discarded; then `repeats` interactions are timed.
  `budget_s` caps the time one configuration may take: warm-up and repeats are reduced to fit, never
  below 1 warm-up (when any was asked) and 3 repeats — so a slow configuration (the teacher with
  `exact` attention on CPU: ~10 s per encode) is still measured, just fewer times. What was done is
  reported (`warmup_done`, `repeats_done`, `capped_by_budget`).
* statistics: median, p5, p95, mean, min, max and spread = (p95 − p5)/median over the repeats
  (the decoder step over repeats × clicks).
* peak memory (see `PeakMemory`) and FLOPs/parameters per component (see `fastsam3d_cli.benchmark.flops`).
* with `volume` + `clicks_file`: `infer_file` from file to file with the same model (same protocol), per
  stage as the pipeline records them (read, preprocess, encode, decode, paste, write) and in total; the
  outputs go to a temporary folder that is deleted. The inputs are checked before any timing.
* ratios: speed-ups relative to the FIRST configuration listed (first model × first attention × first
  dtype; the first one that ran if that one could not): baseline median / this median.

A backend that cannot run on the device (flash without flash-attn or on CPU, flash for the published
layout) gives an `unavailable` row and the run goes on; a configuration that fails at run time (out of
memory, a dtype the device lacks) gives a `failed` row. If no configuration ran at all, the first row's
error is raised.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from fastsam3d_cli.errors import DeviceError, FastSAM3DError, UsageError

T = TypeVar("T")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_REPEATS = 3  # the time budget never cuts repeats below this (unless fewer were asked for)
TIMING_CONVENTION = ("first interaction reported separately as first_call; then warm-up interactions discarded; "
                     "then repeats timed. Stats over repeats (decoder step: repeats × clicks). Each decoder step "
                     "feeds one new click and the previous step's logits. spread_pct = (p95 - p5) / median. "
                     "Speed-up = baseline median / this median.")


# ===================================================================================== timing helpers
class Clock:
    """Synchronised time marks on `device`; `ms(a, b)` is the time from mark a to mark b in milliseconds.

    CUDA work is asynchronous, so a host clock around a call measures only kernel launches. On CUDA a mark
    records an event and waits for the GPU to reach it (an interactive tool waits for each mask anyway);
    intervals are event-to-event GPU times. On CPU a mark is `time.perf_counter_ns()` (monotonic).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            event.synchronize()
            return event
        return time.perf_counter_ns()

    def ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) / 1e6

    @property
    def description(self) -> str:
        return ("CUDA events, synchronised at every mark" if self.cuda
                else "time.perf_counter_ns (monotonic), single process")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of already sorted values; q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class TimingStats:
    """Summary of n timings in milliseconds."""

    n: int
    median_ms: float
    p5_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "TimingStats":
        values = sorted(float(v) for v in samples_ms)
        return cls(n=len(values), median_ms=percentile(values, 50), p5_ms=percentile(values, 5),
                   p95_ms=percentile(values, 95), mean_ms=sum(values) / len(values), min_ms=values[0],
                   max_ms=values[-1])

    @property
    def spread_pct(self) -> float:
        """(p95 − p5) / median, in percent: how noisy the measurement was."""
        return 100.0 * (self.p95_ms - self.p5_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread_pct": self.spread_pct}


def _status_mb(field_name: str) -> float | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in MiB (None where there is no /proc)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_rss_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


class PeakMemory:
    """Peak memory of one configuration, in MiB.

    CUDA: `torch.cuda.max_memory_allocated` (tensors: weights + activations; not the CUDA context or the
    allocator's cache), reset once the model is ready, minus what was allocated before it was built.
    CPU on Linux: peak RSS minus the RSS before the model was built. The kernel's high-water mark (VmHWM)
    is reset through /proc/self/clear_refs once the model is ready, so neither earlier configurations nor
    the float32 copy made while casting count. Elsewhere: `ru_maxrss`, the whole process's peak RSS since
    it started, reported as is (not an increase; a configuration using less than an earlier one hides).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_mb = 0.0
        self.method = ""
        self._rss_resettable = False

    def begin(self) -> None:
        """Call before the model is built."""
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2 ** 20
            self.method = ("torch.cuda.max_memory_allocated (reset once the model was ready) minus memory "
                           "allocated before the model was built")
            return
        rss = _status_mb("VmRSS")
        if rss is not None and _reset_rss_high_water_mark():
            self._rss_resettable = True
            self.baseline_mb = rss
            self.method = ("peak RSS (VmHWM, reset via /proc/self/clear_refs once the model was ready) minus "
                           "RSS before the model was built")
        else:
            self.method = "ru_maxrss: the whole process's peak RSS since it started (not an increase)"

    def model_ready(self) -> None:
        """Call once the model is built, cast and on its device, before the first call: forgets the peak of
        building and casting (a float32 copy of the weights), keeps the baseline from `begin`."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._rss_resettable:
            _release_freed_memory()
            _reset_rss_high_water_mark()

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self.baseline_mb
        if self._rss_resettable:
            peak = _status_mb("VmHWM")
            return None if peak is None else peak - self.baseline_mb
        try:
            import resource  # Unix only
        except ImportError:
            return None
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return usage / 2 ** 20 if sys.platform == "darwin" else usage / 1024


# ===================================================================================== results
@dataclass
class ConfigResult:
    """One model × attention backend × dtype. `status`: ok | unavailable | failed (then `reason`)."""

    model: str
    attention: str  # as requested
    dtype: str
    checkpoint: str | None = None  # weights file (its preset is `model`); None = deterministic random weights
    backend: str | None = None  # what `attention` resolved to on the device
    status: str = "ok"
    reason: str | None = None
    warmup_done: int = 0
    repeats_done: int = 0
    capped_by_budget: bool = False
    first_call: dict[str, float | None] | None = None  # encoder_ms (None: no encoder pass), decoder_step_ms, interactive_ms
    step: str = "decoder"  # what `decoder_step` times: "decoder", or "prior" for a prior-only model (see PRIOR_STEP)
    prior_box: list[int] | None = None  # prior-only: the refine head's box (voxels) at the last click
    encoder: TimingStats | None = None  # None for a prior-only model: it never runs its encoder
    decoder_step: TimingStats | None = None  # one click: prompt encoder + mask decoder (or the prior step)
    interactive: TimingStats | None = None  # encode + `clicks` decoder steps, one span
    end_to_end: dict[str, TimingStats] | None = None  # per pipeline stage (with --volume)
    end_to_end_crops: int | None = None  # 128³ crops encoded per file → file run (depends on the weights' masks)
    peak_memory_mb: float | None = None
    weights_mb: float | None = None
    flops: dict | None = None  # fastsam3d_cli.benchmark.flops.ModelFlops.to_dict()
    speedup: dict[str, float | None] | None = None  # vs the baseline configuration (None: not comparable)
    error: BaseException | None = field(default=None, repr=False)  # kept for re-raising; not serialised

    @property
    def label(self) -> str:
        model = f"{Path(self.checkpoint).name}:{self.model}" if self.checkpoint else self.model
        return f"{model}/{self.attention}/{self.dtype}"

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "error"}
        for name in ("encoder", "decoder_step", "interactive"):
            stats = getattr(self, name)
            data[name] = stats.to_dict() if stats else None
        if self.end_to_end is not None:
            data["end_to_end"] = {stage: stats.to_dict() for stage, stats in self.end_to_end.items()}
        data["label"] = self.label
        return data


@dataclass
class BenchmarkResult:
    """Everything one run measured, plus where and how (environment, settings, conventions)."""

    environment: dict
    settings: dict
    conventions: dict
    configs: list[ConfigResult]
    baseline: str | None  # label of the configuration the speed-ups are relative to
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"environment": self.environment, "settings": self.settings, "conventions": self.conventions,
                "baseline": self.baseline, "warnings": self.warnings, "configs": [c.to_dict() for c in self.configs]}


# ===================================================================================== environment
def _cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def _cpu_flags() -> list[str]:
    """The CPU features that decide bf16/fp32 matmul speed (Linux only; empty elsewhere)."""
    try:
        match = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return []
    flags = set(match.group(1).split()) if match else set()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def environment(device: torch.device) -> dict:
    """Where the numbers were measured: device, versions, threads, load (other processes running)."""
    from fastsam3d_cli import __version__
    from fastsam3d_cli.device import flash_attn_version
    from fastsam3d_cli.model.gemm import uses_onednn

    cuda = device.type == "cuda"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        # CPU inference GEMMs: oneDNN (fastsam3d_cli.model.gemm) or aten/MKL (FASTSAM3D_CPU_GEMM=aten)
        "cpu_gemm": "onednn" if uses_onednn() else "aten",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        # float32 rows on CUDA run convolutions (and matmuls, when allowed) in TF32 under these settings
        "tf32": ({"convolutions": bool(torch.backends.cudnn.allow_tf32),
                  "matmul": bool(torch.backends.cuda.matmul.allow_tf32)} if cuda else None),
        "flash_attn": flash_attn_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastsam3d": __version__,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def cpu_snapshot() -> dict | None:
    """Machine-wide busy CPU seconds (/proc/stat, steal included), this process's CPU seconds, and a clock."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"busy_s": (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"),
            "self_s": usage.ru_utime + usage.ru_stime, "wall_s": time.monotonic()}


def other_processes_cores(start: dict | None, end: dict | None) -> float | None:
    """Average number of cores used by OTHER processes (and the hypervisor: steal) between two snapshots."""
    if not start or not end or end["wall_s"] <= start["wall_s"]:
        return None
    others = (end["busy_s"] - start["busy_s"]) - (end["self_s"] - start["self_s"])
    return max(0.0, others / (end["wall_s"] - start["wall_s"]))


def busy_machine_warning(env: dict) -> str | None:
    """A warning when other processes competed for the CPU during the run (timings then run slow and noisy).

    Measured from /proc/stat where available: CPU time used by everything but this process during the run
    (more than a quarter of a core on average warns). Elsewhere, a heuristic on the 1-minute load average.
    """
    others = env.get("other_processes_cores")
    if others is not None:
        if others <= 0.25:
            return None
        return (f"other processes (or the hypervisor) used {others:.2f} of {env['cpu_cores_available']} core(s) on "
                "average during the run, so timings may be slow and noisy; rerun on a quiet machine")
    start, end = env.get("load_average_1m"), env.get("load_average_1m_end")
    if start is None or end is None:
        return None
    others = max(start, end - env["torch_threads"])
    if others <= 0.5:
        return None
    return (f"the machine was busy (1-minute load average {start:.1f} at the start, {end:.1f} at the end, on "
            f"{env['cpu_cores_available']} core(s), this run using {env['torch_threads']} thread(s)): other "
            "processes competed for the CPU, so timings may be slow and noisy; rerun on a quiet machine")


# ===================================================================================== one configuration
@dataclass
class _Inputs:
    volume: torch.Tensor  # (B, 1, S, S, S), standard normal
    points: torch.Tensor  # (B, clicks, 3) voxel indices in the crop
    labels: torch.Tensor  # (B, clicks), first click positive
    first_logits: torch.Tensor  # (B, 1, L, L, L) previous logits for the first click


def _random_inputs(model, batch: int, clicks: int, device: torch.device, dtype: torch.dtype, seed: int) -> _Inputs:
    """Random inputs of the right shapes (never zeros): a z-normalised-like volume, clicks anywhere in the crop."""
    generator = torch.Generator().manual_seed(seed)
    size, low = model.config.image_size, model.config.low_res_size
    volume = torch.randn(batch, 1, size, size, size, generator=generator)
    points = torch.rand(batch, clicks, 3, generator=generator) * (size - 1)
    labels = torch.randint(0, 2, (batch, clicks), generator=generator)
    labels[:, 0] = 1
    first_logits = torch.randn(batch, 1, low, low, low, generator=generator)
    return _Inputs(volume.to(device, dtype), points.to(device), labels.to(device), first_logits.to(device, dtype))


def _interaction(model, inputs: _Inputs, clock: Clock) -> tuple[float, list[float], float]:
    """Encode once, then one decoder step per click. Returns (encoder ms, [step ms per click], total ms)."""
    start = clock.mark()
    embedding = model.encode(inputs.volume)
    encoded = clock.mark()
    logits = inputs.first_logits
    steps: list[float] = []
    previous = encoded
    for k in range(inputs.points.shape[1]):
        logits, _ = model.decode(embedding, inputs.points[:, k:k + 1], inputs.labels[:, k:k + 1], logits)
        now = clock.mark()
        steps.append(clock.ms(previous, now))
        previous = now
    return clock.ms(start, encoded), steps, clock.ms(start, previous)


PRIOR_STEP = ("a prior-only model (the bundled one: classical prior, zero decoder residual) never runs its encoder or "
              "decoder; each click is the classical floor plus the refine head on the clicks' box, on a 128³ crop "
              "at 1.5 mm, so 'decoder step' times that and 'encode + N clicks' the N steps on one crop (a phantom "
              "organ, clicks inside it; one crop whatever --batch)")


def is_prior_only(model) -> bool:
    """True for a model whose clicks are the prior alone (what the `Predictor` runs without encoder or decoder)."""
    from fastsam3d_cli.interactive.prior import PriorSettings, residual_is_zero

    return PriorSettings.from_dict(getattr(model, "prior_settings", None)) is not None and residual_is_zero(model)


@dataclass
class _PriorInputs:
    crop: Any  # (S, S, S) float32 numpy array: a z-normalised-like volume holding one ellipsoidal organ
    clicks: list[tuple[tuple[int, int, int], bool]]  # crop voxels, all inside the organ (includes)
    scale: float


def _prior_inputs(model, clicks: int, seed: int) -> _PriorInputs:
    """A 128³ crop with an organ-sized ellipsoid (semi-axes 36/28/22 voxels: 54/42/33 mm) brighter than its noisy
    background, and `clicks` include clicks: its centre, then points spread inside it (the box grows)."""
    import numpy as np

    from fastsam3d_cli.interactive.prior import PriorSettings

    rng = np.random.default_rng(seed)
    size = model.config.image_size
    grid = np.indices((size,) * 3, dtype=np.float32) - (size - 1) / 2
    organ = (grid[0] / 36) ** 2 + (grid[1] / 28) ** 2 + (grid[2] / 22) ** 2 <= 1
    crop = rng.normal(0.0, 0.3, (size,) * 3).astype(np.float32) + 2.0 * organ
    centre = size // 2
    points = [(centre, centre, centre)]
    while len(points) < clicks:
        offset = rng.uniform(-0.7, 0.7, 3)
        if float(np.sum(offset ** 2)) <= 0.49:  # inside the ellipsoid shrunk to 70 %
            points.append(tuple(int(round(centre + v)) for v in offset * (36, 28, 22)))
    settings = PriorSettings.from_dict(model.prior_settings)  # present: `is_prior_only` chose this path
    return _PriorInputs(crop, [(p, True) for p in points], settings.scale)


def _prior_interaction(model, inputs: _PriorInputs, clock: Clock) -> tuple[None, list[float], float]:
    """One crop, then the prior step per click (as the `Predictor` runs it). Returns (None, [step ms], total ms)."""
    from fastsam3d_cli.imaging import MODEL_SPACING_MM
    from fastsam3d_cli.interactive.prior import CropPrior

    start = clock.mark()
    crop = CropPrior(inputs.crop, MODEL_SPACING_MM)
    steps: list[float] = []
    previous = clock.mark()
    for k in range(len(inputs.clicks)):
        crop.logits(inputs.clicks[:k + 1], inputs.scale, model.refine_head)
        now = clock.mark()
        steps.append(clock.ms(previous, now))
        previous = now
    return None, steps, clock.ms(start, previous)


def plan_repeats(repeats: int, elapsed_s: float, seconds_per_iteration: float, budget_s: float) -> int:
    """How many timed repeats fit in what is left of `budget_s` (0 = no budget); never fewer than
    MIN_REPEATS (or `repeats`, when fewer were asked for)."""
    if budget_s <= 0 or seconds_per_iteration <= 0:
        return repeats
    affordable = int((budget_s - elapsed_s) // seconds_per_iteration)
    return max(min(MIN_REPEATS, repeats), min(repeats, affordable))


def repeat_timed(run_once: Callable[[], T], repeats: int, warmup: int, budget_s: float) -> tuple[T, list[T], int, bool]:
    """The measurement protocol: a first call, warm-up calls (discarded), then timed repeats.

    `budget_s` (> 0) caps the seconds spent: a further warm-up is run only while the minimum number of
    repeats still fits after it, and the repeats are cut to what fits (never below MIN_REPEATS, or `repeats`
    when fewer were asked for). Returns (first result, timed results, warm-ups done, whether the budget cut).
    """
    started = time.monotonic()
    first = run_once()
    per_call = time.monotonic() - started
    warmup_done, capped = 0, False
    while warmup_done < warmup:
        if warmup_done >= 1 and budget_s > 0:
            if time.monotonic() - started + per_call * (1 + min(MIN_REPEATS, repeats)) > budget_s:
                capped = True
                break
        begin = time.monotonic()
        run_once()
        per_call = time.monotonic() - begin
        warmup_done += 1
    planned = plan_repeats(repeats, time.monotonic() - started, per_call, budget_s)
    timed = [run_once() for _ in range(planned)]
    return first, timed, warmup_done, capped or planned < repeats


def _time_model(interaction: Callable[[], tuple[float | None, list[float], float]], row: ConfigResult, repeats: int,
                warmup: int, budget_s: float) -> None:
    """Time an interaction (`_interaction` or `_prior_interaction`) by `repeat_timed`, filling `row`'s timings."""
    first, timed, row.warmup_done, row.capped_by_budget = repeat_timed(interaction, repeats, warmup, budget_s)
    row.first_call = {"encoder_ms": first[0], "decoder_step_ms": first[1][0], "interactive_ms": first[2]}
    row.repeats_done = len(timed)
    row.encoder = None if first[0] is None else TimingStats.from_samples([encoder_ms for encoder_ms, _, _ in timed])
    row.decoder_step = TimingStats.from_samples([ms for _, steps, _ in timed for ms in steps])
    row.interactive = TimingStats.from_samples([total_ms for _, _, total_ms in timed])


def _run_config(row: ConfigResult, device: torch.device, settings: dict) -> str | None:
    """Build, cast and time one configuration in place; unavailable/failed rows keep the reason.

    Returns how peak memory was measured (None when the configuration was not run)."""
    from fastsam3d_cli.imaging import MODEL_SPACING_MM
    from fastsam3d_cli.interactive.refine import box_around
    from fastsam3d_cli.model import build_model, get_config
    from fastsam3d_cli.model.attention import resolve_backend
    from fastsam3d_cli.model.checkpoint import load_model
    from fastsam3d_cli.model.refine_head import use_inference_layout

    config = get_config(row.model)
    try:
        row.backend = resolve_backend(row.attention, device,
                                      flash_supported=config.encoder.rel_pos_layout == "standard")
    except FastSAM3DError as exc:
        row.status, row.reason, row.error = "unavailable", exc.message, exc
        return None
    memory = PeakMemory(device)
    model = None
    try:
        memory.begin()
        torch.manual_seed(settings["seed"])
        if row.checkpoint is not None:
            model, _ = load_model(row.checkpoint, preset=row.model, device=device, attention="exact")
        else:
            with torch.device(device):  # initialise the random weights where they will live (fast on a GPU)
                model = build_model(config, attention="exact")
        model = model.to(DTYPES[row.dtype]).eval()
        model.set_attention(row.attention)
        use_inference_layout(model)  # as `infer` loads it
        row.weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
        memory.model_ready()
        clock = Clock(device)
        if is_prior_only(model):
            row.step = "prior"
            prior_inputs = _prior_inputs(model, settings["clicks"], settings["seed"])
            row.prior_box = [s.stop - s.start for s in box_around([c for c, _ in prior_inputs.clicks],
                                                                  prior_inputs.crop.shape, MODEL_SPACING_MM)]
            interaction = functools.partial(_prior_interaction, model, prior_inputs, clock)
        else:
            inputs = _random_inputs(model, settings["batch"], settings["clicks"], device, DTYPES[row.dtype],
                                    settings["seed"])
            interaction = functools.partial(_interaction, model, inputs, clock)
        with torch.inference_mode():
            _time_model(interaction, row, settings["repeats"], settings["warmup"], settings["budget_s"])
        row.peak_memory_mb = memory.peak_mb()
        if settings["volume"] is not None:
            _time_end_to_end(model, row, device, settings)
    except (KeyboardInterrupt, SystemExit):
        raise
    except (DeviceError, UsageError) as exc:  # the backend/dtype cannot run here
        row.status, row.reason, row.error = "unavailable", exc.message, exc
    except FastSAM3DError as exc:
        row.status, row.reason, row.error = "failed", exc.message, exc
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not abort the whole run
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
        row.status, row.error = "failed", exc
        row.reason = f"out of memory: {first_line}" if oom else f"{type(exc).__name__}: {first_line}"
    finally:
        interaction = None  # holds the model too
        del model, interaction
        _release_freed_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return memory.method


# ===================================================================================== the API
def _unique(values: Sequence[str], what: str, allow_empty: bool = False) -> list[str]:
    result = list(dict.fromkeys(v.strip() for v in values))
    if not result and not allow_empty:
        raise UsageError(f"no {what} given", f"pass at least one --{what}")
    return result


def _checkpoint_presets(checkpoints: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(path, preset) per checkpoint file, each loaded once on the CPU before anything is timed, so a
    missing, corrupt or unsafe file stops the run at once (WeightsError, exit 4)."""
    from fastsam3d_cli.model.checkpoint import load_model

    result = []
    for path in dict.fromkeys(str(Path(c).expanduser()) for c in checkpoints):
        _, info = load_model(path, device="cpu", attention="exact")
        result.append((path, str(info.preset)))
    return result


def _validate(models: list[str], attentions: list[str], dtypes: list[str], numbers: dict[str, float]) -> None:
    from fastsam3d_cli.model import BACKENDS, PRESET_NAMES

    for name in models:
        if name not in PRESET_NAMES:
            raise UsageError(f"unknown model '{name}'", f"choose from: {', '.join(PRESET_NAMES)}")
    for name in attentions:
        if name not in BACKENDS:
            raise UsageError(f"unknown attention backend '{name}'", f"choose from: {', '.join(BACKENDS)}")
    for name in dtypes:
        if name not in DTYPES:
            raise UsageError(f"unknown dtype '{name}'", f"choose from: {', '.join(DTYPES)}")
    minimum = {"batch": 1, "repeats": 1, "warmup": 0, "clicks": 1, "budget_s": 0, "threads": 1}
    for key, value in numbers.items():
        if value is not None and value < minimum[key]:
            option = "--budget" if key == "budget_s" else f"--{key}"
            raise UsageError(f"{option} must be at least {minimum[key]} (got {value})", f"pass {option} {minimum[key]} or more")


def _attach_flops(rows: list[ConfigResult]) -> None:
    """FLOPs/params per ok row, counted once per model and counted arithmetic."""
    from fastsam3d_cli.benchmark.flops import COUNTED_AS, model_flops

    cache: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.status != "ok" or row.backend is None or row.step == "prior":  # counts the encoder it never runs
            continue
        key = (row.model, COUNTED_AS.get(row.backend, row.backend))
        if key not in cache:
            cache[key] = model_flops(*key).to_dict()
        row.flops = cache[key]


def _attach_speedups(rows: list[ConfigResult]) -> str | None:
    """Speed-ups of every ok row relative to the first ok row; returns that row's label."""
    ok = [row for row in rows if row.status == "ok"]
    if not ok:
        return None
    base = ok[0]
    for row in ok:
        row.speedup = {name: (getattr(base, name).median_ms / getattr(row, name).median_ms
                              if getattr(base, name) is not None and getattr(row, name) is not None else None)
                       for name in ("encoder", "decoder_step", "interactive")}
        # File → file only compares like with like: how many crops run depends on the masks the weights make.
        if (base.end_to_end and row.end_to_end and "total" in base.end_to_end and "total" in row.end_to_end
                and base.end_to_end_crops == row.end_to_end_crops):
            row.speedup["end_to_end"] = base.end_to_end["total"].median_ms / row.end_to_end["total"].median_ms
    return base.label


def run_benchmark(models: Sequence[str] = ("fastsam3d",), attentions: Sequence[str] = ("auto",),
                  device: str = "auto", dtypes: Sequence[str] = ("float32",), batch: int = 1, repeats: int = 20,
                  warmup: int = 5, clicks: int = 5, budget_s: float = 60.0, threads: int | None = None,
                  volume: str | Path | None = None, clicks_file: str | Path | None = None,
                  count_flops: bool = True, seed: int = 0, checkpoints: Sequence[str | Path] = (),
                  series: str | None = None, progress: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Time every model × attention × dtype on one device in one run (order: models, then attentions, then dtypes).

    `budget_s`: seconds one configuration may take before its warm-up/repeats are reduced (0 = no cap).
    `threads`: torch intra-op threads for the run (restored afterwards); None keeps torch's default.
    `volume` + `clicks_file`: also time the file-to-file pipeline stage by stage (a DICOM folder or .zip too;
    `series` picks its series by UID, as `infer --series`).
    `checkpoints`: weights files timed after the `models` presets (which use deterministic random weights);
    each one's preset is read from the file. `models` may be empty when checkpoints are given.
    Raises UsageError (bad options), DeviceError (device absent), WeightsError (a bad checkpoint), or the
    first row's error when none ran.
    """
    from fastsam3d_cli.device import resolve_device

    models = _unique(models, "model", allow_empty=bool(checkpoints))
    attentions, dtypes = _unique(attentions, "attention"), _unique(dtypes, "dtype")
    _validate(models, attentions, dtypes, {"batch": batch, "repeats": repeats, "warmup": warmup, "clicks": clicks,
                                           "budget_s": budget_s, "threads": threads})
    if (volume is None) != (clicks_file is None):
        raise UsageError("--volume and --clicks-file go together", "give both, or neither")
    if series is not None and volume is None:
        raise UsageError("--series without --volume", "give the DICOM folder with --volume, or drop --series")
    torch_device = resolve_device(device)
    if volume is not None:
        _check_end_to_end_inputs(volume, clicks_file, series)
    checkpoint_rows = _checkpoint_presets(checkpoints)
    settings = {"models": models, "checkpoints": [path for path, _ in checkpoint_rows], "attentions": attentions, "dtypes": dtypes, "batch": batch, "repeats": repeats,
                "warmup": warmup, "clicks": clicks, "budget_s": budget_s, "seed": seed,
                "volume": None if volume is None else str(volume), "series": series,
                "clicks_file": None if clicks_file is None else str(clicks_file)}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        env = environment(torch_device)
        cpu_start = cpu_snapshot()
        memory_method = ""
        rows = [ConfigResult(model, attention, dtype) for model in models for attention in attentions for dtype in dtypes]
        rows += [ConfigResult(preset, attention, dtype, checkpoint=path) for path, preset in checkpoint_rows
                 for attention in attentions for dtype in dtypes]
        for number, row in enumerate(rows, start=1):
            if progress:
                progress(f"[{number}/{len(rows)}] {row.label} on {torch_device}")
            memory_method = _run_config(row, torch_device, settings) or memory_method
        env["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        others = other_processes_cores(cpu_start, cpu_snapshot())
        env["other_processes_cores"] = None if others is None else round(others, 3)
    finally:
        torch.set_num_threads(previous_threads)
    if not any(row.status == "ok" for row in rows):
        raise rows[0].error if rows[0].error is not None else UsageError("nothing was measured")
    if count_flops:
        _attach_flops(rows)
    baseline = _attach_speedups(rows)
    conventions = {"timing": TIMING_CONVENTION, "clock": Clock(torch_device).description,
                   "memory": memory_method, "min_repeats_under_budget": MIN_REPEATS}
    if count_flops:
        from fastsam3d_cli.benchmark.flops import COUNTING_CONVENTION
        conventions["flops"] = COUNTING_CONVENTION
    warning = busy_machine_warning(env)
    return BenchmarkResult(env, settings, conventions, rows, baseline, [warning] if warning else [])


# ===================================================================================== end to end (--volume)
END_TO_END_STAGES = ("read", "preprocess", "encode", "decode", "paste", "write")


def _check_end_to_end_inputs(volume: str | Path, clicks_file: str | Path, series: str | None = None) -> None:
    """Fail before any timing (BadInputError, exit 3) when the volume or click file is unusable."""
    from fastsam3d_cli.imaging.clickfile import check_inside, read_click_file, to_lps
    from fastsam3d_cli.imaging.volumes import read_image
    from fastsam3d_cli.imaging.world import world_geometry

    click_file = read_click_file(clicks_file)
    image = read_image(volume, series=series)
    world = world_geometry(volume, image)  # as infer places them (imaging/world.py)
    world.check_space(click_file.space)
    for obj in click_file.objects:
        check_inside(obj, to_lps(obj.points, click_file.space, image, world.ras_from_ijk), image, click_file.space)


def _time_end_to_end(model, row: ConfigResult, device: torch.device, settings: dict) -> None:
    """Time `infer_file` (volume + click file → labelmap + sidecar in a temporary folder) with this model.

    Stages as `infer_file` records them (read includes hashing the input; decode includes upsampling and the
    copy to the host); `total` is its own wall time. The outputs are deleted afterwards.
    """
    import tempfile

    from fastsam3d_cli.interactive.infer import infer_file
    from fastsam3d_cli.weights.loading import LoadedModel

    # The model core casts float32 inputs to the weights' dtype, as `infer --dtype` relies on.
    source = Path(row.checkpoint) if row.checkpoint else Path("(random weights: benchmark)")
    loaded = LoadedModel(model=model, preset=row.model, checkpoint=source,
                         checkpoint_sha256="-", weights_name=None, device=device, attention=row.backend or "",
                         load_ms=0.0, dtype=row.dtype)
    with tempfile.TemporaryDirectory(prefix="fastsam3d-benchmark-") as folder:
        output = Path(folder) / "mask.nii.gz"

        crops_run: list[int] = []

        def run_once() -> dict:
            sidecar = infer_file(settings["volume"], settings["clicks_file"], output, loaded=loaded, overwrite=True,
                                 series=settings.get("series"))
            crops_run.append(int(sidecar["crops_run"]))
            return sidecar["timings_ms"]

        first, timed, _, capped = repeat_timed(run_once, settings["repeats"], settings["warmup"], settings["budget_s"])
    row.end_to_end = {stage: TimingStats.from_samples([t[stage] for t in timed]) for stage in END_TO_END_STAGES}
    row.end_to_end["total"] = TimingStats.from_samples([t["wall"] for t in timed])
    row.end_to_end_crops = crops_run[-1]  # the same every run: the clicks and weights do not change
    row.first_call = {**(row.first_call or {}), "end_to_end_ms": first["wall"]}
    row.capped_by_budget = row.capped_by_budget or capped
