"""`distill` under DDP: two gloo processes on CPU share the cache rank 0 wrote, agree on every stage measurement,
end with identical student weights on both ranks, and an interrupted 2-process run resumed with 2 processes ends
with the uninterrupted run's student, bit for bit."""
from __future__ import annotations

import faulthandler
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from fastsam3d_cli.model.checkpoint import read_checkpoint
from distill_builders import STUDENT, save_teacher
from train_phantoms import make_prepared


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    """One torchrun-like process: the variables torchrun sets, then three API calls (whole; stopped; resumed)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    faulthandler.dump_traceback_later(240, exit=True)  # a deadlock fails the test with stacks instead of hanging
    torch.set_num_threads(1)
    from fastsam3d_cli.training import distributed
    from fastsam3d_cli.training import distill as distill_module
    from fastsam3d_cli.training.distill import distill

    # Keep a handle on each call's student (the result carries no model): every rank saves its own weights.
    built = []

    class RecordedModel(distill_module.DistillationModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    distill_module.DistillationModel = RecordedModel

    # One process group for the three calls (as under torchrun: `distill` joins an existing group and leaves
    # it alone); re-creating gloo groups on one port in quick succession is racy.
    env = distributed.detect_environment()
    created = distributed.init_process_group(env, torch.device("cpu"))
    for run, max_steps, resume in (("whole", None, False), ("part", 3, False), ("part", None, True)):
        result = distill([os.path.join(root, "prepared")], os.path.join(root, "teacher.pth"), student=STUDENT,
                         teacher_model=None, epochs_per_stage=1, output=os.path.join(root, run),
                         cache_features=os.path.join(root, "cache"), lr=3e-4, seed=11, device="cpu",
                         max_steps=max_steps, resume=resume)
        name = f"{run}{'-resumed' if resume else ''}.rank{rank}.json"
        with open(os.path.join(root, name), "w", encoding="utf-8") as handle:
            json.dump({"stages": result.stages, "neck": [result.neck_mse_init, result.neck_mse_final],
                       "steps": result.outcome.global_step, "world": result.world_size,
                       "samples": result.outcome.samples_seen, "computed": result.cache_computed,
                       "student": result.student_checkpoint is not None}, handle)
        if result.student_checkpoint is not None:
            torch.save(built[-1].student_state_dict(), os.path.join(root, f"{run}.rank{rank}.pt"))
    distributed.cleanup(created)


def test_two_processes_distil_and_resume_exactly(tmp_path):
    make_prepared(tmp_path / "prepared")  # 4 samples → 2 per rank, 2 steps per epoch
    save_teacher(tmp_path / "teacher.pth")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    def read(run: str) -> list[dict]:
        return [json.loads((tmp_path / f"{run}.rank{r}.json").read_text()) for r in range(2)]

    whole, part, rest = read("whole"), read("part"), read("part-resumed")
    assert [r["world"] for r in whole] == [2, 2] and [r["steps"] for r in whole] == [6, 6]
    assert [r["computed"] for r in whole] == [4, 0]  # only rank 0 ran the teacher
    assert whole[0]["stages"] == whole[1]["stages"] and whole[0]["neck"] == whole[1]["neck"]
    assert not set(whole[0]["samples"][:2]) & set(whole[1]["samples"][:2])  # each rank its half of epoch 1
    assert whole[0]["neck"][1] < whole[0]["neck"][0]
    assert [r["steps"] for r in part] == [3, 3] and not any(r["student"] for r in part)  # stopped inside stage 2
    assert [r["steps"] for r in rest] == [6, 6] and rest[0]["stages"] == whole[0]["stages"]
    a, b = read_checkpoint(tmp_path / "whole" / "student.pth"), read_checkpoint(tmp_path / "part" / "student.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every rank ends with the same student (gradients were averaged), also after the resume; rank 0 saved it.
    for run, saved in (("whole", a), ("part", b)):
        ranks = [torch.load(tmp_path / f"{run}.rank{r}.pt", weights_only=True) for r in range(2)]
        assert ranks[0].keys() == ranks[1].keys() == saved.keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], saved[k]) for k in saved)
