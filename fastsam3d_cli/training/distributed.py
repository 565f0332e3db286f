"""PyTorch DDP plumbing: detect `torchrun`, start/stop the process group, rank-aware logging and reductions.

`torchrun --nproc-per-node N -m fastsam3d_cli train ...` (or a multi-node launch) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process; nothing else is needed. The backend is NCCL on
CUDA and gloo on CPU. Without those variables everything runs as a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from fastsam3d_cli.errors import DeviceError, UsageError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and plots."""
        return self.rank == 0


SINGLE_PROCESS = DistributedEnv()


def detect_environment(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """The DDP position from torchrun's variables; a single process when WORLD_SIZE is absent or 1."""
    environ = os.environ if environ is None else environ
    if int(_integer(environ, "WORLD_SIZE", "1")) <= 1:
        return SINGLE_PROCESS
    missing = [name for name in TORCHRUN_VARIABLES if not environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={environ['WORLD_SIZE']} but {', '.join(missing)} not set",
                         "launch multi-process training with torchrun (it sets all of them)")
    env = DistributedEnv(rank=_integer(environ, "RANK"), world_size=_integer(environ, "WORLD_SIZE"),
                         local_rank=_integer(environ, "LOCAL_RANK"))
    if not 0 <= env.rank < env.world_size:
        raise UsageError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}", "launch with torchrun")
    return env


def _integer(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = environ.get(name, default)
    try:
        return int(str(value))
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer", "launch with torchrun") from None


def device_for_rank(env: DistributedEnv, requested: torch.device) -> torch.device:
    """Under DDP with CUDA each process takes GPU `LOCAL_RANK` (unless a specific index was asked for)."""
    if requested.type != "cuda" or not env.is_distributed:
        return requested
    if env.local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                          "start at most one process per GPU (--nproc-per-node)")
    return torch.device("cuda", env.local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: DistributedEnv, device: torch.device) -> bool:
    """Join the job's process group (env:// rendezvous). Returns True when this call created it."""
    import torch.distributed as dist

    if not env.is_distributed or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DeviceError("this PyTorch build has no torch.distributed", "install a PyTorch build with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    return True


def cleanup(created: bool) -> None:
    """Leave the process group if `init_process_group` created it."""
    import torch.distributed as dist

    if created and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], env: DistributedEnv, device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (float64); the values themselves in a single process."""
    if not env.is_distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    # NCCL needs the tensor on the GPU; gloo works on CPU tensors.
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def barrier(env: DistributedEnv) -> None:
    if env.is_distributed:
        import torch.distributed as dist

        dist.barrier()


def rank_aware(log: Callable[[str], None] | None, env: DistributedEnv,
               all_ranks: bool = False) -> Callable[[str], None]:
    """A logger that only rank 0 uses (or every rank, prefixed `[rank r/N]`, with `all_ranks`)."""

    def emit(message: str) -> None:
        if log is None:
            return
        if not env.is_distributed:
            log(message)
        elif all_ranks:
            log(f"[rank {env.rank}/{env.world_size}] {message}")
        elif env.is_main:
            log(message)

    return emit
