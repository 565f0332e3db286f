"""The reusable `Trainer` with a toy task (a linear regression): the hook distillation plugs into, gradient
accumulation, Ctrl-C → checkpoint → exact resume, time limits, log truncation, checkpoint checks."""
from __future__ import annotations

import json
import signal
from typing import Any, Mapping

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fastsam3d_cli.errors import WeightsError
from fastsam3d_cli.training.trainer import (StepContext, Trainer, TrainerSettings, TrainingTask, load_training_checkpoint)

TRUE_WEIGHTS = torch.tensor([1.5, -2.0, 0.5, 3.0])


class ToyData(Dataset):
    """y = w·x for 12 fixed x; items carry `sample_index` like the real dataset."""

    def __init__(self, count: int = 12) -> None:
        self.x = torch.from_numpy(np.random.default_rng(0).normal(size=(count, 4)).astype(np.float32))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.x[index], "target": self.x[index] @ TRUE_WEIGHTS, "sample_index": index}


class ToyTask(TrainingTask):
    """Regression with optional per-step noise drawn from the step's own generator."""

    name = "toy"
    best_metric, best_mode = "loss", "min"

    def __init__(self, noise: float = 0.1, interrupt_at_step: int | None = None, samples: int = 12) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.dataset = ToyData(samples)
        self.noise, self.interrupt_at_step = noise, interrupt_at_step

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "lr": lr}]

    def step(self, batch: Mapping[str, Any], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        if context.global_step == self.interrupt_at_step and context.micro_index == 0:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during this step
        jitter = float(context.rng().normal()) * self.noise
        prediction = self.model(batch["image"]).squeeze(1) + jitter
        loss = ((prediction - batch["target"]) ** 2).mean()
        return loss, {"abs_error": float((prediction - batch["target"]).detach().abs().mean())}


def _settings(tmp_path, **overrides) -> TrainerSettings:
    values = dict(run_dir=tmp_path, epochs=4, batch_size=2, accumulate=2, lr=0.3, weight_decay=0.0,
                  lr_milestones=(2,), seed=1)
    values.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return TrainerSettings(**values)


def _run(tmp_path, task=None, resume=False, **overrides):
    task = task or ToyTask()
    trainer = Trainer(task, _settings(tmp_path, **overrides), torch.device("cpu"))
    payload = load_training_checkpoint(tmp_path / "last.pth", task.name) if resume else None
    return task, trainer.run(payload)


def test_a_custom_task_trains_and_logs_its_own_metrics(tmp_path):
    task, outcome = _run(tmp_path)
    assert outcome.stop_reason == "completed" and outcome.global_step == 4 * 3  # 12 samples / (2 × 2)
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(e) for e in epochs][0] == sorted(["epoch", "step", "loss", "abs_error", "samples", "lr",
                                                      "trainable_params", "seconds", "time", "best"])
    assert epochs[-1]["loss"] < epochs[0]["loss"] / 2  # it learns
    assert epochs[1]["lr"] == [0.3] and epochs[2]["lr"] == [pytest.approx(0.03)]  # milestone after epoch 2
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == min(epochs, key=lambda e: e["loss"])["epoch"]
    assert sorted(outcome.samples_seen[:12]) == list(range(12))  # each epoch visits every sample once
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_running_mean_of_the_curve():
    from fastsam3d_cli.training.plots import _running_mean

    assert _running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]


def test_accumulation_equals_a_bigger_batch(tmp_path):
    _, big = _run(tmp_path / "big", ToyTask(noise=0.0), batch_size=4, accumulate=1)
    _, accumulated = _run(tmp_path / "acc", ToyTask(noise=0.0), batch_size=1, accumulate=4)
    a = torch.load(tmp_path / "big" / "last.pth", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "acc" / "last.pth", weights_only=True)["model_state_dict"]
    assert big.global_step == accumulated.global_step == 12
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    _, straight = _run(tmp_path / "straight")
    task, interrupted = _run(tmp_path / "split", ToyTask(interrupt_at_step=4))
    assert interrupted.stop_reason == "interrupted" and interrupted.global_step == 5  # step 5 was finished
    payload = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert (payload["global_step"], payload["epoch"], payload["step_in_epoch"]) == (5, 1, 2)
    # Previous SIGINT handling is restored after the run.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _, resumed = _run(tmp_path / "split", resume=True)
    assert resumed.global_step == straight.global_step
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert (tmp_path / "straight" / "metrics.jsonl").read_text().count("\n") == 4
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "time")}  # noqa: E731
                          for l in path.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "metrics.jsonl") == strip(tmp_path / "split" / "metrics.jsonl")
    assert strip(tmp_path / "straight" / "steps.jsonl") == strip(tmp_path / "split" / "steps.jsonl")


def test_logs_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    _run(tmp_path, max_steps=5)
    with open(tmp_path / "steps.jsonl", "a") as handle:  # a crash after logging step 6 but before saving it
        handle.write(json.dumps({"step": 6, "loss": 123.0}) + "\n" + '{"step": 7, "lo')
    _, outcome = _run(tmp_path, resume=True, max_steps=7)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 8)) and all(s["loss"] != 123.0 for s in steps)


def test_time_limit_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    _, outcome = _run(tmp_path, time_limit_s=1e-9)
    assert outcome.stop_reason == "time_limit" and outcome.global_step == 1
    assert torch.load(tmp_path / "last.pth", weights_only=True)["global_step"] == 1


def test_resume_checks_what_wrote_the_checkpoint(tmp_path):
    _run(tmp_path, max_steps=1)
    with pytest.raises(WeightsError, match="was written by `toy`, not `train`"):
        load_training_checkpoint(tmp_path / "last.pth", "train")
    torch.save({"model_state_dict": {"w": torch.zeros(1)}}, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="not a fastsam3d training checkpoint"):
        load_training_checkpoint(tmp_path / "plain.pth", "toy")


def test_changing_the_batch_layout_inside_an_epoch_is_refused(tmp_path):
    from fastsam3d_cli.errors import UsageError

    _run(tmp_path, max_steps=1)  # stops after step 1 of 3 in epoch 1
    with pytest.raises(UsageError, match="stopped inside an epoch with batch size 2"):
        _run(tmp_path, resume=True, batch_size=4, accumulate=1)


def _with_alarm(seconds: int, function, *args, **kwargs):
    """Run `function`, failing (not hanging) when it takes longer than `seconds`."""
    def _fail(signum, frame):
        raise AssertionError(f"still running after {seconds} s: the resumed run hangs")

    previous = signal.signal(signal.SIGALRM, _fail)
    signal.alarm(seconds)
    try:
        return function(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("resumed_samples, steps_after", [(4, 3 * 1), (24, 3 * 6)])
def test_a_changed_sample_set_ends_the_interrupted_epoch_and_starts_the_next(tmp_path, resumed_samples, steps_after):
    """Issue 15.1: shrinking the set used to hang (the saved position lay past the new epoch's end) and growing it
    continued mid-epoch while the warning said otherwise. Documented: the interrupted epoch ends with the steps it
    had; the next epoch starts over the whole new set."""
    _run(tmp_path, max_steps=2)  # 12 samples, 3 steps per epoch: stopped at step 2 of epoch 1
    task, outcome = _with_alarm(60, _run, tmp_path, ToyTask(samples=resumed_samples), resume=True)
    assert outcome.stop_reason == "completed" and outcome.global_step == 2 + steps_after
    assert any(f"(12 → {resumed_samples} samples); epoch 1 ends after the 2 step(s) it had, and training continues "
               "with epoch 2 over the new set" in w for w in outcome.warnings)
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[0]["samples"] == 8 and epochs[1]["samples"] == resumed_samples
    per_epoch = steps_after // 3 * 4
    for start in range(0, len(outcome.samples_seen), per_epoch):  # every new epoch visits the whole new set once
        assert sorted(outcome.samples_seen[start:start + per_epoch])[:resumed_samples] == list(range(resumed_samples))
    assert epochs[1]["lr"] == [0.3] and epochs[2]["lr"] == [pytest.approx(0.03)]  # the schedule counts the closed epoch


def test_a_changed_sample_set_at_an_epoch_boundary_starts_the_next_epoch(tmp_path):
    _run(tmp_path, max_steps=3)  # exactly epoch 1
    _, outcome = _with_alarm(60, _run, tmp_path, ToyTask(samples=4), resume=True)
    assert outcome.global_step == 3 + 3
    assert any("(12 → 4 samples); training continues with epoch 2 over the new set" in w for w in outcome.warnings)
