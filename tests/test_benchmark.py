"""The benchmark API: honest timing (first call apart, warm-up excluded, budget cap), statistics, FLOP counts."""
from __future__ import annotations

import functools
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastsam3d_cli.benchmark.speed import (
    MIN_REPEATS, ConfigResult, TimingStats, _interaction, _random_inputs, _time_model, busy_machine_warning,
    percentile, plan_repeats, run_benchmark,
)
from fastsam3d_cli.errors import DeviceError, UsageError
from fastsam3d_cli.benchmark.flops import model_flops


# ----------------------------------------------------------------------------------- statistics
def test_percentiles_match_numpy():
    rng = random.Random(3)
    for n in (1, 2, 5, 20, 101):
        values = sorted(rng.uniform(0, 100) for _ in range(n))
        for q in (5, 50, 95):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_timing_stats_summary():
    stats = TimingStats.from_samples([30.0, 10.0, 20.0, 40.0, 50.0])
    assert (stats.n, stats.median_ms, stats.min_ms, stats.max_ms, stats.mean_ms) == (5, 30.0, 10.0, 50.0, 30.0)
    assert stats.p5_ms == pytest.approx(12.0) and stats.p95_ms == pytest.approx(48.0)
    assert stats.spread_pct == pytest.approx(100 * 36 / 30)
    assert stats.to_dict()["spread_pct"] == pytest.approx(120.0)


def test_budget_plan():
    assert plan_repeats(20, elapsed_s=5, seconds_per_iteration=1, budget_s=0) == 20  # no budget
    assert plan_repeats(20, elapsed_s=5, seconds_per_iteration=1, budget_s=60) == 20  # fits
    assert plan_repeats(20, elapsed_s=10, seconds_per_iteration=10, budget_s=60) == 5  # 50 s left
    assert plan_repeats(20, elapsed_s=24, seconds_per_iteration=12, budget_s=60) == MIN_REPEATS  # floor
    assert plan_repeats(2, elapsed_s=100, seconds_per_iteration=12, budget_s=60) == 2  # fewer asked than floor


def test_busy_machine_warning_from_measured_cpu_time():
    from fastsam3d_cli.benchmark.speed import other_processes_cores

    start = {"busy_s": 100.0, "self_s": 10.0, "wall_s": 0.0}
    alone = {"busy_s": 120.0, "self_s": 29.5, "wall_s": 10.0}  # 20 s busy, 19.5 s of it ours
    shared = {"busy_s": 130.0, "self_s": 20.0, "wall_s": 10.0}  # 30 s busy, 10 s ours
    assert other_processes_cores(start, alone) == pytest.approx(0.05)
    assert other_processes_cores(start, shared) == pytest.approx(2.0)
    env = {"cpu_cores_available": 2, "torch_threads": 2, "load_average_1m": 3.0, "load_average_1m_end": 3.0}
    assert busy_machine_warning({**env, "other_processes_cores": 0.05}) is None  # a high load average alone is not proof
    assert "used 2.00 of 2 core(s)" in busy_machine_warning({**env, "other_processes_cores": 2.0})


def test_busy_machine_warning():
    env = {"load_average_1m": 0.1, "load_average_1m_end": 2.2, "torch_threads": 2, "cpu_cores_available": 2}
    assert busy_machine_warning(env) is None  # only this run's own threads
    assert "load average 3.5 at the start" in busy_machine_warning({**env, "load_average_1m": 3.5})
    assert "busy" in busy_machine_warning({**env, "load_average_1m_end": 4.0})  # others joined during the run
    assert busy_machine_warning({**env, "load_average_1m": None}) is None  # no load average on this OS


# ----------------------------------------------------------------------------------- the timing loop
class SleepyModel:
    """Stands in for Sam3D with known costs: encode 20 ms (the first one 150 ms: lazy init), decode 5 ms."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(image_size=8, low_res_size=2)
        self.encodes = 0
        self.decoded_points: list[torch.Tensor] = []

    def encode(self, volume):
        self.encodes += 1
        time.sleep(0.150 if self.encodes == 1 else 0.020)
        return volume.mean()

    def decode(self, embedding, points, labels, logits):
        time.sleep(0.005)
        self.decoded_points.append(points)
        return logits + 1, None


def test_first_call_reported_apart_and_warmup_excluded():
    model = SleepyModel()
    inputs = _random_inputs(model, batch=1, clicks=3, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    row = ConfigResult("fake", "exact", "float32")
    _time_model(functools.partial(_interaction, model, inputs, _cpu_clock()), row, repeats=4, warmup=2, budget_s=0)
    assert model.encodes == 1 + 2 + 4
    assert (row.warmup_done, row.repeats_done, row.capped_by_budget) == (2, 4, False)
    assert row.first_call["encoder_ms"] >= 150
    assert row.encoder.n == 4 and 20 <= row.encoder.median_ms < 100  # the slow first call is not in the stats
    assert row.decoder_step.n == 4 * 3 and 5 <= row.decoder_step.median_ms < 50
    assert row.interactive.n == 4 and row.interactive.median_ms >= 20 + 3 * 5
    # each decoder step gets one new click, in order
    assert [tuple(p.shape) for p in model.decoded_points[:3]] == [(1, 1, 3)] * 3
    assert torch.equal(model.decoded_points[1], inputs.points[:, 1:2])


def test_budget_cuts_warmup_and_repeats_but_not_below_the_floor():
    model = SleepyModel()
    inputs = _random_inputs(model, batch=1, clicks=1, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    row = ConfigResult("fake", "exact", "float32")
    _time_model(functools.partial(_interaction, model, inputs, _cpu_clock()), row, repeats=10, warmup=5,
                budget_s=0.05)
    assert (row.warmup_done, row.repeats_done, row.capped_by_budget) == (1, MIN_REPEATS, True)
    assert row.encoder.n == MIN_REPEATS


def _cpu_clock():
    from fastsam3d_cli.benchmark.speed import Clock

    return Clock(torch.device("cpu"))


def test_random_inputs_have_the_right_shapes_and_are_not_zeros():
    model = SimpleNamespace(config=SimpleNamespace(image_size=128, low_res_size=32))
    inputs = _random_inputs(model, batch=2, clicks=4, device=torch.device("cpu"), dtype=torch.bfloat16, seed=1)
    assert inputs.volume.shape == (2, 1, 128, 128, 128) and inputs.volume.dtype == torch.bfloat16
    assert 0.9 < inputs.volume.float().std() < 1.1 and (inputs.volume == 0).float().mean() < 0.01
    assert inputs.points.shape == (2, 4, 3) and 0 <= inputs.points.min() and inputs.points.max() <= 127
    assert inputs.labels.shape == (2, 4) and bool((inputs.labels[:, 0] == 1).all())
    assert inputs.first_logits.shape == (2, 1, 32, 32, 32) and inputs.first_logits.abs().sum() > 0


# ----------------------------------------------------------------------------------- a real (tiny) run
@pytest.fixture(scope="module")
def tiny_run():
    return run_benchmark(models=["fastsam3d-tiny"], attentions=["sdpa", "flash", "exact"], device="cpu",
                         dtypes=["float32"], repeats=2, warmup=1, clicks=2, budget_s=0)


def test_result_structure(tiny_run):
    data = tiny_run.to_dict()
    assert set(data) == {"environment", "settings", "conventions", "baseline", "configs", "warnings"}
    env = data["environment"]
    for key in ("device", "device_name", "torch", "cuda", "flash_attn", "torch_threads", "date_utc", "python"):
        assert key in env
    assert env["device"] == "cpu" and env["torch_threads"] >= 1
    assert "2 FLOPs" in data["conventions"]["flops"] and "perf_counter" in data["conventions"]["clock"]
    assert [c["label"] for c in data["configs"]] == ["fastsam3d-tiny/sdpa/float32", "fastsam3d-tiny/flash/float32",
                                                     "fastsam3d-tiny/exact/float32"]
    ok = data["configs"][0]
    assert ok["status"] == "ok" and ok["backend"] == "sdpa"
    assert ok["encoder"]["n"] == 2 and ok["decoder_step"]["n"] == 4 and ok["interactive"]["n"] == 2
    for stats in (ok["encoder"], ok["decoder_step"], ok["interactive"]):
        assert 0 < stats["p5_ms"] <= stats["median_ms"] <= stats["p95_ms"]
    assert ok["interactive"]["median_ms"] > ok["encoder"]["median_ms"]
    assert set(ok["first_call"]) == {"encoder_ms", "decoder_step_ms", "interactive_ms"}
    assert ok["peak_memory_mb"] > 0.5 * ok["weights_mb"] > 0  # the fp32 weights are ~58 MiB of the increase
    assert ok["flops"]["image_encoder"]["gmacs"] == pytest.approx(4.456, rel=1e-3)


def test_unavailable_backend_is_a_row_not_an_abort(tiny_run):
    flash = tiny_run.configs[1]
    assert flash.status == "unavailable" and "flash" in flash.reason
    assert flash.encoder is None and flash.speedup is None
    assert tiny_run.configs[2].status == "ok"


def test_speedups_are_relative_to_the_first_configuration(tiny_run):
    first, _, last = tiny_run.configs
    assert tiny_run.baseline == first.label
    assert first.speedup == {"encoder": 1.0, "decoder_step": 1.0, "interactive": 1.0}
    for name in ("encoder", "decoder_step", "interactive"):
        expected = getattr(first, name).median_ms / getattr(last, name).median_ms
        assert last.speedup[name] == pytest.approx(expected)


def test_bad_options_raise_usage_errors():
    cases = [dict(models=["sam-med4d"]), dict(attentions=["fast"]), dict(dtypes=["float64"]), dict(repeats=0),
             dict(clicks=0), dict(warmup=-1), dict(batch=0), dict(budget_s=-1), dict(volume="v.nii.gz")]
    for kwargs in cases:
        with pytest.raises(UsageError):
            run_benchmark(**{"models": ["fastsam3d-tiny"], "device": "cpu", **kwargs})


def test_nothing_runnable_raises_the_reason():
    with pytest.raises(DeviceError, match="flash"):
        run_benchmark(models=["fastsam3d-tiny"], attentions=["flash"], device="cpu", repeats=1, warmup=0)


# ----------------------------------------------------------------------------------- FLOPs and parameters
def test_flops_match_the_reference_counts():
    teacher = model_flops("sam-med3d", "exact")
    student = model_flops("fastsam3d", "exact")
    assert teacher.params["image_encoder"] == 92_924_928 and teacher.params["total"] == 100_509_232
    assert student.params["image_encoder"] == 45_639_936
    assert (student.params["prompt_encoder"], student.params["mask_decoder"]) == (8_668, 7_575_636)
    # reference/models.md: teacher ≈183.5 GMAC incl. attention on padded windows, 89.4 thop-style;
    # student ≈24.7 and 23.1.
    assert teacher.image_encoder.macs / 1e9 == pytest.approx(183.5, rel=0.01)
    assert student.image_encoder.macs / 1e9 == pytest.approx(24.7, rel=0.01)
    for result, thop in ((teacher, 89.4), (student, 23.1)):
        linear_conv = result.image_encoder.by_op["addmm"] + result.image_encoder.by_op["convolution"]
        assert linear_conv / 2e9 == pytest.approx(thop, rel=0.01)
    assert teacher.decoder_step.flops == student.decoder_step.flops > 0  # the same decoder


def test_sdpa_attention_is_counted_and_the_padded_window_does_less():
    exact, sdpa = model_flops("fastsam3d-tiny", "exact"), model_flops("fastsam3d-tiny", "sdpa")
    assert sdpa.image_encoder.flops == exact.image_encoder.flops  # global attention: same matmuls, all counted
    assert model_flops("fastsam3d-tiny", "sparse").image_encoder.by_op["bmm"] < exact.image_encoder.by_op["bmm"]
    flash = model_flops("fastsam3d-tiny", "flash")
    assert flash.counted_backend == "sdpa" and flash.image_encoder.flops == sdpa.image_encoder.flops
    teacher_exact, teacher_sdpa = model_flops("sam-med3d", "exact"), model_flops("sam-med3d", "sdpa")
    assert teacher_sdpa.image_encoder.flops < 0.35 * teacher_exact.image_encoder.flops
    data = teacher_sdpa.to_dict()
    assert data["decoder_step"]["gmacs"] == pytest.approx(data["decoder_step"]["gflops"] / 2)


def test_fused_cpu_attention_is_counted():
    from fastsam3d_cli.benchmark.flops import count_flops

    q = torch.randn(1, 3, 64, 16)  # 4-D on CPU: the fused kernel, which torch's counter alone misses
    counted = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert counted.flops == 2 * (2 * 3 * 64 * 64 * 16)  # q·kᵀ and attention·v, 2 FLOPs per multiply-add
