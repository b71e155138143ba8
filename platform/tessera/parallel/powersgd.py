"""PowerSGD (Vogels et al., 2019) with error feedback: averages a fixed list of gradient tensors
over a process group, sending two thin factors per matrix instead of the matrix.

For each compressed matrix M (n, m) — this rank's gradient plus its error-feedback buffer E:

    P = M Q            (n, r)   all-reduce mean; orthonormalise the columns of P
    Q = Mᵀ P           (m, r)   all-reduce mean
    M̂ = P Qᵀ                    the same on every rank: the estimate of mean(M)
    E ← M − M̂                   what this rank's gradient lost, added back at the next step

Q is warm-started from the previous step (one power iteration per step), or drawn afresh each
step from a seed shared by the group. Tensors too small to gain (r·(n + m) ≥ n·m / 2) and those
the caller marks uncompressed travel in full, in the same buffer as the P factors, so one step
is two all-reduces however many tensors there are. Every member must call `reduce_` with tensors
of the same shapes in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class TensorSpec:
    """One gradient tensor: its element count and the matrix it is viewed as, or None to send it
    uncompressed."""

    numel: int
    matrix: tuple[int, int] | None = None


def matrix_view(numel: int, cols: int) -> tuple[int, int]:
    """A flat tensor of `numel` elements as rows of `cols` (the last row zero-padded): a ZeRO shard
    of a weight matrix is a block of its rows."""
    cols = max(1, min(cols, numel))
    return (-(-numel // cols), cols)


def worth_compressing(shape: tuple[int, int], rank: int) -> bool:
    n, m = shape
    return min(n, m) > rank and 2 * rank * (n + m) <= n * m


@dataclass
class ReduceStats:
    """Elements each member sent in its two all-reduces, and what the tensors hold uncompressed."""

    sent_elements: int
    dense_elements: int
    element_bytes: int

    @property
    def sent_bytes(self) -> int:
        return self.sent_elements * self.element_bytes


AllReduce = Callable[[torch.Tensor], None]


def group_mean_all_reduce(group=None) -> AllReduce:
    """In-place mean over `group` (identity without a process group)."""

    def reduce(t: torch.Tensor) -> None:
        if not (tdist.is_available() and tdist.is_initialized()):
            return
        n = tdist.get_world_size(group)
        if n > 1:
            tdist.all_reduce(t, group=group)
            t.div_(n)

    return reduce


class PowerSGD:
    def __init__(self, specs: Sequence[TensorSpec], *, rank: int, warm_start: bool = True,
                 error_feedback: bool = True, seed: int = 0, all_reduce: AllReduce | None = None,
                 device: torch.device | str = "cpu"):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        self.rank = rank
        self.warm_start = warm_start
        self.error_feedback = error_feedback
        self.seed = seed
        self.all_reduce = all_reduce or group_mean_all_reduce()
        self.device = torch.device(device)
        self.specs = list(specs)
        self.compressed = [i for i, s in enumerate(self.specs)
                           if s.matrix is not None and worth_compressing(s.matrix, rank)]
        self.dense = [i for i in range(len(self.specs)) if i not in set(self.compressed)]
        self.errors: dict[int, torch.Tensor] = {}
        self.qs: dict[int, torch.Tensor] = {}
        self.steps = 0

    # --- what one step sends -------------------------------------------------------------------
    def plan(self) -> ReduceStats:
        p = sum(self.specs[i].matrix[0] * self.rank for i in self.compressed)
        q = sum(self.specs[i].matrix[1] * self.rank for i in self.compressed)
        dense = sum(self.specs[i].numel for i in self.dense)
        return ReduceStats(sent_elements=p + q + dense, dense_elements=sum(s.numel for s in self.specs),
                           element_bytes=4)

    # --- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_(self, tensors: Sequence[torch.Tensor]) -> ReduceStats:
        """Replace each tensor by the group's (compressed) mean, in place."""
        if len(tensors) != len(self.specs):
            raise ValueError(f"PowerSGD was planned for {len(self.specs)} tensors, got {len(tensors)}")
        for t, s in zip(tensors, self.specs, strict=True):
            if t.numel() != s.numel:
                raise ValueError(f"PowerSGD tensor has {t.numel()} elements, planned {s.numel}")
        dtype = torch.float32
        mats = {i: self._with_error(i, tensors[i]) for i in self.compressed}
        qs = {i: self._q(i, mats[i].shape[1], dtype) for i in self.compressed}

        # First all-reduce: every P (n, r) and every uncompressed tensor, in one flat buffer.
        ps = {i: mats[i] @ qs[i] for i in self.compressed}
        first = torch.cat([ps[i].reshape(-1) for i in self.compressed]
                          + [tensors[i].reshape(-1).to(dtype) for i in self.dense]) if self.specs else None
        if first is not None and first.numel():
            self.all_reduce(first)
        offset = 0
        for i in self.compressed:
            n = ps[i].numel()
            ps[i] = _orthonormal_columns(first[offset:offset + n].view_as(ps[i]))
            offset += n
        for i in self.dense:
            n = tensors[i].numel()
            tensors[i].view(-1).copy_(first[offset:offset + n])
            offset += n

        # Second all-reduce: every Q = Mᵀ P (m, r).
        if self.compressed:
            new_qs = {i: mats[i].T @ ps[i] for i in self.compressed}
            second = torch.cat([new_qs[i].reshape(-1) for i in self.compressed])
            self.all_reduce(second)
            offset = 0
            for i in self.compressed:
                n = new_qs[i].numel()
                q = second[offset:offset + n].view_as(new_qs[i])
                offset += n
                estimate = ps[i] @ q.T  # (n, m), identical on every member
                if self.error_feedback:
                    self.errors[i] = mats[i] - estimate
                if self.warm_start:
                    self.qs[i] = q.clone()
                tensors[i].view(-1).copy_(estimate.reshape(-1)[: tensors[i].numel()])
        self.steps += 1
        return self.plan()

    @torch.no_grad()
    def reduce_uncompressed_(self, tensors: Sequence[torch.Tensor]) -> ReduceStats:
        """The exact mean, every tensor whole in one all-reduce (before compression starts);
        the error-feedback buffers and Q factors are left as they are."""
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        self.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.view(-1).copy_(flat[offset:offset + t.numel()])
            offset += t.numel()
        return ReduceStats(sent_elements=flat.numel(), dense_elements=flat.numel(), element_bytes=4)

    def _with_error(self, i: int, t: torch.Tensor) -> torch.Tensor:
        n, m = self.specs[i].matrix
        flat = t.reshape(-1).to(torch.float32)
        mat = torch.zeros(n * m, dtype=torch.float32, device=t.device)
        mat[: flat.numel()] = flat
        mat = mat.view(n, m)
        if self.error_feedback and i in self.errors:
            mat += self.errors[i]
        return mat

    def _q(self, i: int, m: int, dtype) -> torch.Tensor:
        if self.warm_start and i in self.qs:
            return self.qs[i]
        # The same draw on every member: seeded by (seed, step, tensor), never by rank.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.steps * 7_919 + i) % (2**63))
        return torch.randn(m, self.rank, generator=g, dtype=dtype).to(self.device)

    # --- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"error.{i}": e.contiguous().cpu() for i, e in self.errors.items()}
        out |= {f"q.{i}": q.contiguous().cpu() for i, q in self.qs.items()}
        out["steps"] = torch.tensor([self.steps], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.errors = {int(k[6:]): v.to(self.device) for k, v in state.items() if k.startswith("error.")}
        self.qs = {int(k[2:]): v.to(self.device) for k, v in state.items() if k.startswith("q.")}
        self.steps = int(state["steps"][0])
        for i in list(self.errors) + list(self.qs):
            if i not in self.compressed:
                raise ValueError(f"PowerSGD state has tensor {i}, which this plan does not compress")


def _orthonormal_columns(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (n, r) of a space holding P's columns. Where P is rank-deficient the
    Householder QR still returns orthonormal columns, so P̂ P̂ᵀ M projects M onto a space containing
    M Q's span (no division by a zero norm, as Gram–Schmidt would do). Same P, same result on
    every member."""
    return torch.linalg.qr(p, mode="reduced").Q
