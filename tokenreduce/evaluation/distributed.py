"""torchrun support: join the process group, shard, gather per-sample results from every rank."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set).

    gloo on CPU, nccl on CUDA with one GPU per local rank. Returns the device
    this process computes on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if "RANK" not in os.environ or world < 2:
        return target
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return target


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(tensor: Tensor, device: torch.device) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (ranks may hold different lengths)."""
    if not is_distributed():
        return tensor
    bool_input = tensor.dtype == torch.bool
    local = tensor.to(device, torch.uint8 if bool_input else tensor.dtype).contiguous()
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([len(local)], device=device))
    longest = max(int(n) for n in lengths)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:int(n)] for part, n in zip(parts, lengths)]).cpu()
    return gathered.bool() if bool_input else gathered


def all_gather_lists(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list of picklable items, in rank order."""
    if not is_distributed():
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
