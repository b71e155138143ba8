"""Bytes that cross node boundaries, counted from the collectives a training step really calls.

A machine cannot see "node boundaries" between processes on one host, so the count is a model
applied to every real call: the call's payload and its group's members (from the call itself),
and the node of each member (a NodeLayout). Collectives are taken to run as rings over the
members in rank order, as NCCL and gloo do for large messages: in a ring of p members that
crosses node boundaries c times, a reduce-scatter or all-gather of D bytes moves (p−1)·D/p over
each link, so c·(p−1)·D/p crosses nodes; an all-reduce is both, twice that; a broadcast reaches
each other node once, (m−1)·D for m nodes; an all-to-all sends D/p from each member to each
other (D: one member's input), counted for the pairs on different nodes. Each member books 1/p of
the collective's total,
so the sum over ranks is the cluster's total.

`CommLedger.install()` wraps the collective methods of DeepSpeed's communication backend (the
`deepspeed.comm` object every ZeRO collective goes through) on that one object, for as long as the
ledger is installed; tessera's own compressed all-reduces book themselves with `record`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence

import torch

from tessera.parallel.topology import NodeLayout

RING_OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all")


def ring_crossings(members: Sequence[int], node_of: Sequence[int]) -> int:
    """Links of the ring (members in rank order) whose ends are on different nodes."""
    p = len(members)
    if p < 2:
        return 0
    ordered = sorted(members)
    return sum(node_of[ordered[i]] != node_of[ordered[(i + 1) % p]] for i in range(p))


def cross_node_bytes(op: str, nbytes: int, members: Sequence[int], node_of: Sequence[int]) -> float:
    """Total bytes a collective of `nbytes` (the full buffer) moves across node boundaries."""
    p = len(members)
    nodes = {node_of[m] for m in members}
    if p < 2 or len(nodes) < 2:
        return 0.0
    if op in ("reduce_scatter", "all_gather"):
        return ring_crossings(members, node_of) * (p - 1) * nbytes / p
    if op == "all_reduce":
        return 2 * ring_crossings(members, node_of) * (p - 1) * nbytes / p
    if op == "broadcast":
        return (len(nodes) - 1) * nbytes
    if op == "all_to_all":
        pairs = sum(node_of[a] != node_of[b] for a in members for b in members if a != b)
        return pairs * nbytes / p  # nbytes: one member's input, D/p of it to each member
    raise ValueError(f"unknown collective {op!r}; known: {RING_OPS}")


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


# DeepSpeed backend method -> (its parameters in order, ring op, ledger kind, the full buffer's
# bytes). The parameter lists are those of deepspeed.comm.torch.TorchBackend (its decorators hide
# the signatures from inspect).
_DEEPSPEED_OPS = {
    "all_reduce": (("tensor", "op", "group"), "all_reduce", "grads", lambda a: _nbytes(a["tensor"])),
    "inference_all_reduce": (("tensor", "op", "group"), "all_reduce", "grads",
                             lambda a: _nbytes(a["tensor"])),
    "all_reduce_coalesced": (("tensors", "op", "group"), "all_reduce", "grads",
                             lambda a: sum(map(_nbytes, a["tensors"]))),
    "reduce_scatter_tensor": (("output_tensor", "input_tensor", "op", "group"), "reduce_scatter", "grads",
                              lambda a: _nbytes(a["input_tensor"])),
    "reduce_scatter": (("output", "input_list", "op", "group"), "reduce_scatter", "grads",
                       lambda a: sum(map(_nbytes, a["input_list"]))),
    "all_gather_into_tensor": (("output_tensor", "input_tensor", "group"), "all_gather", "params",
                               lambda a: _nbytes(a["output_tensor"])),
    "all_gather_base": (("output_tensor", "input_tensor", "group"), "all_gather", "params",
                        lambda a: _nbytes(a["output_tensor"])),
    "all_gather": (("tensor_list", "tensor", "group"), "all_gather", "params",
                   lambda a: sum(map(_nbytes, a["tensor_list"]))),
    "all_gather_coalesced": (("output_tensors", "input_tensors", "group"), "all_gather", "params",
                             lambda a: sum(map(_nbytes, a["output_tensors"]))),
    "broadcast": (("tensor", "src", "group"), "broadcast", "other", lambda a: _nbytes(a["tensor"])),
    "all_to_all_single": (("output", "input"), "all_to_all", "grads", lambda a: _nbytes(a["input"])),
}


class CommLedger:
    """This rank's share of cross-node bytes, by kind ("grads", "params", "other")."""

    def __init__(self, layout: NodeLayout, rank: int):
        self.layout = layout
        self.rank = rank
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._installed: tuple[object, dict] | None = None
        self.paused = 0

    @contextlib.contextmanager
    def pause(self):
        """Collectives inside are not booked (evaluation, checks)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def record(self, kind: str, op: str, nbytes: int, members: Sequence[int]) -> None:
        if self.paused:
            return
        self.calls[op] += 1
        self.bytes[kind] += cross_node_bytes(op, nbytes, members, self.layout.node_of_rank) / len(members)

    def take(self) -> dict[str, float]:
        """This rank's bytes by kind since the last take, and reset."""
        out = {k: self.bytes.get(k, 0.0) for k in ("grads", "params", "other")}
        self.bytes.clear()
        self.calls.clear()
        return out

    def members(self, group) -> list[int]:
        import torch.distributed as tdist

        if group is None or group is tdist.GroupMember.WORLD:
            return list(range(self.layout.world_size))
        return list(tdist.get_process_group_ranks(group))

    def install(self) -> CommLedger:
        from deepspeed.comm import comm as ds_comm

        backend = ds_comm.cdb
        if backend is None:
            raise RuntimeError("deepspeed.comm is not initialised: call deepspeed.init_distributed first")
        originals = {}
        for name, (params, op, kind, size) in _DEEPSPEED_OPS.items():
            method = getattr(backend, name, None)
            if method is None:
                continue
            originals[name] = method
            setattr(backend, name, self._counting(method, params, op, kind, size))
        self._installed = (backend, originals)
        return self

    def uninstall(self) -> None:
        if self._installed is None:
            return
        backend, originals = self._installed
        for name in originals:
            delattr(backend, name)  # the instance attribute; the class's method shows again
        self._installed = None

    def _counting(self, method, params, op, kind, size):
        def counted(*args, **kwargs):
            a = dict(zip(params, args, strict=False)) | kwargs
            self.record(kind, op, size(a), self.members(a.get("group")))
            return method(*args, **kwargs)

        return counted
