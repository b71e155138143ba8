"""Training schedules as pure functions of the step (unit-tested at start, middle and end)."""

from __future__ import annotations

import math


def cosine(step: int, *, start: float, end: float, steps: int) -> float:
    """Half-cosine from `start` (step 0) to `end` (step >= steps); flat afterwards."""
    if steps <= 0:
        return end
    t = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def temperature(step: int, *, start: float = 1.0, end: float = 1 / 16, steps: int) -> float:
    """Gumbel-softmax τ: 1 → 1/16, cosine (paper §A.2)."""
    return cosine(step, start=start, end=end, steps=steps)


def kl_weight(step: int, *, end: float = 6.6, steps: int) -> float:
    """KL weight β: 0 → 6.6, cosine over the first `steps` updates (paper §A.2)."""
    return cosine(step, start=0.0, end=end, steps=steps)


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return cosine(step - warmup, start=1.0, end=min_ratio, steps=max(1, total - warmup))
