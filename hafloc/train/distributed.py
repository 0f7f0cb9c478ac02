"""torchrun support: detect a launched process group, shard work, gather results.

A single process never enters distributed mode: only a WORLD_SIZE > 1 set by torchrun (or
``python -m torch.distributed.run``) does. Backend: NCCL when CUDA is available, else gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where this rank trains (cuda:LOCAL_RANK when GPUs exist)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the torchrun process group if this process was launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = f"cuda:{local % max(torch.cuda.device_count(), 1)}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1 or "RANK" not in os.environ:
        return DistInfo(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_true(info: DistInfo, flag: bool) -> bool:
    """True on every rank when any rank says True (keeps stop decisions in lockstep)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_scalar(info: DistInfo, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_rows(info: DistInfo, local: np.ndarray, total: int) -> np.ndarray:
    """Reassemble rows computed round-robin (rank r did rows r, r+W, ...) into (total, D)."""
    if not info.enabled:
        return local
    per = -(-total // info.world_size)
    dim = local.shape[1]
    padded = torch.zeros(per, dim, dtype=torch.float32, device=info.device)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(info.device)
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    out = np.zeros((total, dim), dtype=np.float32)
    for r, part in enumerate(parts):
        n = len(range(r, total, info.world_size))
        out[r :: info.world_size] = part[:n].cpu().numpy()
    return out
