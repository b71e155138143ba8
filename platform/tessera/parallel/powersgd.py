"""PowerSGD (Vogels et al., 2019) with error feedback, as the DALL·E paper adapts it (Ramesh et al.
2021, §2.5 and appendix E): averages a fixed list of gradient tensors over a process group, sending
two thin factors per matrix instead of the matrix.

For each compressed matrix M (n, m) — this rank's gradient plus its error-feedback buffer E — and
its projection Q (m, r):

    P = M Q            (n, r)   all-reduce mean; P += ε·s·I_{n×r}; orthonormalise P's columns
                                (Householder QR, in fp32)
    R = Mᵀ P           (m, r)   all-reduce mean
    M̂ = P Rᵀ                    the same on every rank: the estimate of mean(M)
    E ← M − M̂                   what this rank's gradient lost, added back at the next step

Q is by default the paper's: "fixing Q to a random gaussian matrix at the start of training, and
never updating it" (§2.5), drawn from a seed shared by the group, so every member (and a resumed
run) holds the same Q. Beyond the paper: `q_update="warm_start"` takes the next step's Q from this
step's R (Vogels et al.'s power iteration), and `"resample"` draws a fresh Q every step (which the
paper reports "causes a large performance hit"; for ablations only).

Tensors too small to gain (r·(n + m) ≥ n·m / 2) and those the caller marks uncompressed (the
paper's embeddings, unembeddings, gains and biases: tessera.training.grad_comm decides) travel in
full, in fp32, in the same buffer as the P factors, so one step is two all-reduces however many
tensors there are. Every member must call `reduce_` with tensors of the same shapes in the same order.
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

# How Q changes between steps: the paper's "fixed"; Vogels et al.'s "warm_start"; "resample".
Q_UPDATES = ("fixed", "warm_start", "resample")
# The paper's ε (appendix E.2 step 5): "We also add εI_{m×r} to P ... where ε = 10⁻⁶".
ORTHOGONALIZATION_EPS = 1e-6


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
    def __init__(self, specs: Sequence[TensorSpec], *, rank: int, q_update: str = "fixed",
                 error_feedback: bool = True, seed: int = 0, eps: float = ORTHOGONALIZATION_EPS,
                 all_reduce: AllReduce | None = None, device: torch.device | str = "cpu"):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        if q_update not in Q_UPDATES:
            raise ValueError(f"PowerSGD q_update must be one of {Q_UPDATES}, got {q_update!r}")
        if eps < 0:
            raise ValueError(f"PowerSGD eps must be >= 0, got {eps}")
        self.rank = rank
        self.q_update = q_update
        self.eps = eps
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
        self.nonfinite_steps = 0  # steps whose factors were non-finite (state left untouched)

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
            ps[i] = orthonormal_columns(first[offset:offset + n].view_as(ps[i]), eps=self.eps)
            offset += n
        for i in self.dense:
            n = tensors[i].numel()
            tensors[i].view(-1).copy_(first[offset:offset + n])
            offset += n

        # Second all-reduce: every R = Mᵀ P (m, r).
        if self.compressed:
            rs = {i: mats[i].T @ ps[i] for i in self.compressed}
            second = torch.cat([rs[i].reshape(-1) for i in self.compressed])
            self.all_reduce(second)
            # Both buffers are group means, the same on every member, so every member decides alike.
            # A non-finite factor (an overflowing gradient anywhere in the group) leaves the error
            # buffers and Q as they were: the non-finite estimate still reaches the gradients, where
            # the overflow check skips the update, and the next step starts from clean state.
            finite = bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all())
            offset = 0
            for i in self.compressed:
                n = rs[i].numel()
                r = second[offset:offset + n].view_as(rs[i])
                offset += n
                estimate = ps[i] @ r.T  # (n, m), identical on every member
                if self.error_feedback and finite:
                    self.errors[i] = mats[i] - estimate
                if self.q_update == "warm_start" and finite:
                    self.qs[i] = r.clone()
                tensors[i].view(-1).copy_(estimate.reshape(-1)[: tensors[i].numel()])
            self.nonfinite_steps += not finite
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
        if self.q_update != "resample" and i in self.qs:
            return self.qs[i]
        q = self.initial_q(i, m, dtype=dtype)
        if self.q_update == "fixed":
            self.qs[i] = q  # never updated: the paper's Q
        return q

    def initial_q(self, i: int, m: int, *, dtype=torch.float32) -> torch.Tensor:
        """Tensor i's Gaussian Q (m, r): the same draw on every member, seeded by (seed, tensor)
        and, for "resample" only, the step; never by rank. Drawn on the CPU so every device agrees,
        and so a run resumed without its state files draws the fixed Q it had."""
        step = self.steps if self.q_update == "resample" else 0
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + i) % (2**63))
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


def orthonormal_columns(p: torch.Tensor, *, eps: float = ORTHOGONALIZATION_EPS) -> torch.Tensor:
    """Orthonormal basis (n, r) of (nearly) the span of P's columns, n ≥ r, the paper's way
    (appendix E.2 step 5): Householder QR rather than Gram–Schmidt ("we found the latter to be
    numerically unstable"), after adding ε·I_{n×r} (the r×r identity on top, zeros below) so the
    input is not rank-deficient. Computed in fp32 whatever P's dtype.

    The paper's P is pre-scaled by hand-tuned constants (appendices D, E.2 step 3); tessera's is the
    raw fp32 mean, whose magnitude follows the gradients', so ε is taken relative to P's largest
    entry (absolute where P is all zero, which then yields the first r unit vectors). Deterministic:
    the same P gives the same basis on every member."""
    n, r = p.shape
    if n < r:
        raise ValueError(f"cannot orthonormalise {r} columns of length {n}")
    p = p.to(torch.float32, copy=True)
    scale = p.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    p.diagonal().add_(eps * scale)  # (r,) = the top r×r block's diagonal
    return torch.linalg.qr(p, mode="reduced").Q
