"""Which rank is on which node: the node groups (gradients reduced uncompressed, parameters
sharded) and the replica groups (the ranks holding the same shard on every node, between which
gradients are compressed). Pure functions of integers, plus one call that makes the groups."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLayout:
    node_of_rank: tuple[int, ...]

    @classmethod
    def uniform(cls, world_size: int, ranks_per_node: int) -> NodeLayout:
        """Consecutive ranks share a node (how launchers and Ray Train number them)."""
        if ranks_per_node < 1 or world_size < 1:
            raise ValueError(f"world_size and ranks_per_node must be >= 1, "
                             f"got {world_size}, {ranks_per_node}")
        if world_size % ranks_per_node:
            raise ValueError(f"{world_size} workers do not split into nodes of "
                             f"ranks_per_node={ranks_per_node}")
        return cls(tuple(r // ranks_per_node for r in range(world_size)))

    @classmethod
    def from_node_ids(cls, node_ids: Sequence[Hashable]) -> NodeLayout:
        """From each rank's node id (e.g. Ray's), numbered by first appearance."""
        index: dict[Hashable, int] = {}
        return cls(tuple(index.setdefault(n, len(index)) for n in node_ids))

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return len(set(self.node_of_rank))

    def node_groups(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for r, n in enumerate(self.node_of_rank):
            groups.setdefault(n, []).append(r)
        return [groups[n] for n in sorted(groups)]

    @property
    def ranks_per_node(self) -> int:
        sizes = {len(g) for g in self.node_groups()}
        if len(sizes) != 1:
            counts = {n: len(g) for n, g in enumerate(self.node_groups())}
            raise ValueError(f"nodes hold different numbers of workers ({counts}); hierarchical gradient "
                             "communication needs the same number on every node")
        return sizes.pop()

    def replica_groups(self) -> list[list[int]]:
        """The i-th rank of every node, for each i: the ranks holding the same shard."""
        k = self.ranks_per_node
        return [[g[i] for g in self.node_groups()] for i in range(k)]


def make_process_groups(layout: NodeLayout, rank: int):
    """(node group, replica group) of `rank` as torch.distributed groups. Every rank creates every
    group, in the same order, as new_group requires."""
    import torch.distributed as tdist

    mine = {}
    for kind, groups in (("node", layout.node_groups()), ("replica", layout.replica_groups())):
        for ranks in groups:
            group = tdist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return mine["node"], mine["replica"]
