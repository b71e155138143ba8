"""Rank logic in one place, with a one-process fallback (nothing initialised: rank 0 of 1)."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean of each value over ranks (identity in one process)."""
    if world_size() == 1:
        return list(values)
    t = torch_tensor(values)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def torch_tensor(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float64)
