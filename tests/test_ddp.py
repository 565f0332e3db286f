"""DDP: torchrun environment detection, and a real 2-process gloo run on CPU (different data, same weights)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastsam3d_cli.training.distributed import (DistributedEnv, backend_for, detect_environment, device_for_rank,
                                       rank_aware)
from fastsam3d_cli.errors import UsageError
from train_phantoms import make_prepared

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_environment_detection():
    assert detect_environment({}) == DistributedEnv(0, 1, 0) and not detect_environment({}).is_distributed
    assert detect_environment({"WORLD_SIZE": "1", "RANK": "0"}) == DistributedEnv()
    env = detect_environment(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.is_distributed, env.is_main) == (1, 2, 1, True, False)
    with pytest.raises(UsageError, match="MASTER_PORT not set"):
        detect_environment({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"})
    with pytest.raises(UsageError, match="RANK=2 is outside WORLD_SIZE=2"):
        detect_environment({**TORCHRUN, "RANK": "2"})
    with pytest.raises(UsageError, match="is not an integer"):
        detect_environment({**TORCHRUN, "WORLD_SIZE": "two"})
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert device_for_rank(env, torch.device("cpu")) == torch.device("cpu")


def test_rank_aware_logging():
    lines: list[str] = []
    rank_aware(lines.append, DistributedEnv(1, 2, 1))("hidden")
    rank_aware(lines.append, DistributedEnv(0, 2, 0))("shown")
    rank_aware(lines.append, DistributedEnv(1, 2, 1), all_ranks=True)("tagged")
    assert lines == ["shown", "[rank 1/2] tagged"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, prepared: str, run_dir: str, out_dir: str) -> None:
    """One torchrun-like process: the variables torchrun sets, then the public API."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastsam3d_cli.training.train import train

    result = train([prepared], "fastsam3d-tiny", epochs=1, iterations=2, output=run_dir, device="cpu", seed=5)
    torch.save({"state": result.model.state_dict(), "samples": result.outcome.samples_seen, "rank": result.rank,
                "world": result.world_size, "steps": result.outcome.global_step},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_see_different_data_and_end_with_identical_weights(tmp_path):
    prepared = make_prepared(tmp_path / "prepared")  # 4 (case, class) pairs → 2 per rank
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(2, _free_port(), str(prepared), str(run_dir), str(out_dir)), nprocs=2, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    seen = [set(r["samples"]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]  # each rank its own half of the epoch
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(first[k], second[k]) for k in first)  # gradients were averaged across ranks
    torch.manual_seed(5)
    from fastsam3d_cli.model import build_model

    initial = build_model("fastsam3d-tiny").state_dict()
    assert any(not torch.equal(initial[k], first[k]) for k in first)  # and they did train
    # Only rank 0 wrote the run folder, and its checkpoint holds those weights.
    saved = torch.load(run_dir / "last.pth", weights_only=True)
    assert saved["world_size"] == 2 and saved["epoch"] == 1
    assert all(torch.equal(saved["model_state_dict"][k], first[k]) for k in first)
    assert len((run_dir / "steps.jsonl").read_text().splitlines()) == 2
