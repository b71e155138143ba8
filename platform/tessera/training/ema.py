"""Exponential moving average of a DeepSpeed-wrapped model's parameters, sharded like ZeRO-3.

The paper averages the iterates ("exponentially weighted iterate averaging for the parameters
with decay coefficient 0.999", appendix A.2) of a model whose fp32 copy does not fit one GPU, so
no rank here keeps a whole copy: each keeps the fp32 average of only its slice of every
parameter. Under ZeRO-3 that slice is the partition the rank already holds (`param.ds_tensor`,
over the parameter's own `ds_process_group`: the node under node-local sharding), so an update is
a local `lerp_` with no communication and no gather. Under ZeRO 0–2, where every rank holds whole
parameters, a rank averages an equal 1/world slice of each flattened parameter.

Evaluation swaps the average into the engine's own partitions (`swapped_into`), so a rank never
holds a whole copy for it either; the whole average is assembled (an all-gather over the slice's
group) only by `full()`; checkpoints gather it one parameter at a time to one rank (`state_dict()`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def _group_of(p: torch.Tensor):
    """The process group a parameter's slices are spread over (None: the whole world)."""
    return getattr(p, "ds_process_group", None)


def _rank_world(group) -> tuple[int, int]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


class ParameterEMA:
    def __init__(self, module: nn.Module, decay: float, *, zero_stage: int):
        self.decay = decay
        self.zero3 = zero_stage == 3
        self.shapes: dict[str, torch.Size] = {}
        self.numels: dict[str, int] = {}
        self.groups: dict[str, object] = {}
        with torch.no_grad():
            self.shards = {}
            for name, p in module.named_parameters():
                self.shapes[name] = torch.Size(getattr(p, "ds_shape", p.shape))
                self.numels[name] = int(getattr(p, "ds_numel", p.numel()))
                self.groups[name] = _group_of(p) if self.zero3 else None
                self.shards[name] = self._local(name, p).float().clone()

    def _slice_len(self, name: str) -> int:
        _, world = _rank_world(self.groups[name])
        return math.ceil(self.numels[name] / world)

    def _local(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """This rank's slice of parameter `p`, flat, padded with zeros to the slice length."""
        if self.zero3 and getattr(p, "ds_tensor", None) is not None:
            return p.ds_tensor.detach().reshape(-1)
        rank, _ = _rank_world(self.groups[name])
        n = self._slice_len(name)
        flat = p.detach().reshape(-1)[rank * n:(rank + 1) * n]
        return torch.nn.functional.pad(flat, (0, n - flat.numel())) if flat.numel() < n else flat

    @property
    def local_bytes(self) -> int:
        """What this rank holds: about 1/world of an fp32 copy of the model."""
        return sum(s.numel() * s.element_size() for s in self.shards.values())

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """After an optimizer step, on every rank; local, no communication."""
        for name, p in module.named_parameters():
            self.shards[name].lerp_(self._local(name, p).float(), 1.0 - self.decay)

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """The whole average, on every rank (a collective: call it on all of them)."""
        return {name: self._gather(name) for name in self.shards}

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module):
        """Inside, `module`'s own parameters hold the average; restored on exit. Evaluation runs
        the engine's module as in training: under ZeRO-3 each partition takes its shard of the
        average and a layer's usual gather brings the averaged weights, so no rank ever holds a
        whole copy (only parameters materialised whole, e.g. ZeRO-3's small persistent ones, get
        theirs gathered). Under ZeRO 0-2 parameters are whole on every rank anyway. A collective:
        call it on every rank."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, p in module.named_parameters():
                part = getattr(p, "ds_tensor", None) if self.zero3 else None
                if part is not None:
                    saved.append((part, part.detach().clone()))
                    part.copy_(self.shards[name][:part.numel()].view_as(part).to(part.dtype))
                if part is None or p.numel() == self.numels[name]:  # whole here: the whole average
                    saved.append((p.data, p.detach().clone()))
                    p.data.copy_(self._gather(name).view_as(p).to(p.dtype))
        whole_before = {name for name, p in module.named_parameters() if p.numel() == self.numels[name]}
        try:
            yield module
        finally:
            with torch.no_grad():
                for target, value in saved:
                    target.copy_(value)
                # ZeRO-3 keeps some parameters gathered after a forward (persistent ones): those
                # gathered inside hold the average; give them the restored partitions' weights.
                for name, p in module.named_parameters():
                    part = getattr(p, "ds_tensor", None) if self.zero3 else None
                    if part is not None and name not in whole_before and p.numel() == self.numels[name]:
                        p.data.copy_(self._gather(name, part).view_as(p))

    def _gather(self, name: str, local: torch.Tensor | None = None) -> torch.Tensor:
        """Parameter `name` whole, from every rank's slice of it (`local`: this rank's; by default
        its slice of the average): an all-gather over the slice's group, a collective."""
        flat = (self.shards[name] if local is None else local).detach().reshape(-1)
        _, world = _rank_world(self.groups[name])
        if world > 1:
            pieces = [torch.empty_like(flat) for _ in range(world)]
            torch.distributed.all_gather(pieces, flat.contiguous(), group=self.groups[name])
            flat = torch.cat(pieces)
        return flat[:self.numels[name]].view(self.shapes[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole average on the CPU of each slice group's first rank (global rank 0 among
        them), gathered one parameter at a time; other ranks get {} (a collective: call it on
        every rank). No other rank ever holds a whole copy."""
        out = {}
        for name, shard in self.shards.items():
            group = self.groups[name]
            rank, world = _rank_world(group)
            if world == 1:
                out[name] = shard[:self.numels[name]].view(self.shapes[name]).detach().cpu().clone()
                continue
            first = torch.distributed.get_global_rank(group, 0) if group is not None else 0
            parts = [torch.empty_like(shard) for _ in range(world)] if rank == 0 else None
            torch.distributed.gather(shard.contiguous(), parts, dst=first, group=group)
            if rank == 0:
                out[name] = torch.cat(parts)[:self.numels[name]].view(self.shapes[name]).cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From a whole average (a checkpoint's); each rank keeps its own slice."""
        missing = set(self.shards) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, value in state.items():
            rank, _ = _rank_world(self.groups[name])
            n = self._slice_len(name)
            flat = value.reshape(-1)[rank * n:(rank + 1) * n].float()
            self.shards[name].zero_()
            self.shards[name][:flat.numel()].copy_(flat)
