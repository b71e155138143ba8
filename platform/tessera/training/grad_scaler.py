"""Per-resblock gradient scaling for fp16 training (DALL·E, Ramesh et al. 2021, appendix D).

One loss scale is not enough for a deep fp16 transformer: activation gradients change by orders of
magnitude between the output and the embeddings, so a scale that keeps the top in fp16 range lets
lower blocks underflow or overflow. Here the network is cut into segments (the embeddings, each
resblock, the top = final norm + output heads), and segment j has its own scale s_j.

Rules, applied by `update()` once per optimizer step (defaults; every constant is a keyword):
- after an update whose gradients were finite in every segment, every scale grows ×2^(1/1000);
- a segment whose gradients were non-finite has its scale divided by √2, and the whole update is
  skipped for all segments (so no scale grows on that update);
- a segment's scale is not shrunk again within 125 updates of its last shrink (the update is still
  skipped);
- every scale stays within [M·2^7, M·2^24], M = number of data-parallel replicas.

Mechanism:
- `scale_loss(loss)` multiplies the loss by the top segment's scale, so backward starts in units of
  s_top.
- A forward pre-hook on segment j's entry module passes its first positional input through an
  identity whose backward multiplies the gradient by s_{j-1}/s_j: the gradient that reaches segment
  j-1 is in its own units. Non-finite entries are set to 0 there and flag segment j (which produced
  them), so the segments below see finite gradients.
- A tensor hook on every parameter divides its gradient by its segment's scale before it accumulates
  into .grad, and flags the segment if the gradient is non-finite. .grad holds true gradients:
  clipping and the optimizer need no unscale step.
- Flags live on the parameters' device (no host sync per parameter) and accumulate over backward
  passes until `update()`. In data-parallel training all-reduce `overflow_flags()` with MAX and pass
  the result to `update(flags)`, so every rank skips and rescales alike.

What the model must satisfy, or gradients come out in mixed units:
- an entry's first positional input is the only path from the segment below into the segment (the
  residual add belongs inside the block);
- the loss depends on the network only through the top segment (no auxiliary losses from a block);
- no parameter is shared between segments (tied input/output embeddings are not supported).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# last_shrink of a segment that never shrank: far enough back that no cooldown covers it.
_NEVER = -(2**62)


class _RescaleGradient(torch.autograd.Function):
    """Identity forward; backward converts the activation gradient from units of s_j to s_{j-1}."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaler: ResblockGradScaler, segment: int) -> torch.Tensor:
        ctx.scaler = scaler
        ctx.segment = segment
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.scaler._rescale_activation_grad(grad, ctx.segment), None, None


class ResblockGradScaler:
    """Gradient scales per segment; `segments` runs from input to output as (entry, params) pairs.

    `entry` is the module whose first positional input is the activation entering the segment (None
    for the first segment, the embeddings); `params` the segment's parameters. When `model` is given,
    every trainable parameter of it must be in some segment.
    """

    def __init__(
        self,
        segments: Sequence[tuple[nn.Module | None, Sequence[nn.Parameter]]],
        *,
        replicas: int = 1,
        init_scale: float | None = None,
        growth: float = 2 ** (1 / 1000),
        shrink: float = 2**0.5,
        shrink_cooldown: int = 125,
        min_scale_power: int = 7,
        max_scale_power: int = 24,
        model: nn.Module | None = None,
    ):
        if not segments:
            raise ValueError("segments is empty: need at least the embeddings segment")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if growth < 1:
            raise ValueError(f"growth must be >= 1, got {growth}")
        if shrink <= 1:
            raise ValueError(f"shrink must be > 1, got {shrink}")
        if shrink_cooldown < 0:
            raise ValueError(f"shrink_cooldown must be >= 0, got {shrink_cooldown}")
        if min_scale_power > max_scale_power:
            raise ValueError(f"min_scale_power {min_scale_power} exceeds max_scale_power {max_scale_power}")
        self.growth = growth
        self.shrink = shrink
        self.shrink_cooldown = shrink_cooldown
        self.min_scale = replicas * 2.0**min_scale_power
        self.max_scale = replicas * 2.0**max_scale_power

        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}

        def describe(p: torch.Tensor) -> str:
            return (
                f"parameter {names[id(p)]!r}" if id(p) in names else f"a parameter of shape {tuple(p.shape)}"
            )

        owner: dict[int, int] = {}
        device = None
        for j, (entry, params) in enumerate(segments):
            if j == 0 and entry is not None:
                raise ValueError(
                    f"segments[0] is the embeddings and takes no entry, got {type(entry).__name__}"
                )
            if j > 0 and not isinstance(entry, nn.Module):
                raise ValueError(f"segments[{j}] needs an entry nn.Module, got {type(entry).__name__}")
            for p in params:
                if not p.requires_grad:
                    raise ValueError(f"segments[{j}] holds {describe(p)}, which does not require grad")
                if id(p) in owner:
                    raise ValueError(
                        f"{describe(p)} is in segments[{owner[id(p)]}] and segments[{j}]; "
                        "every parameter belongs to exactly one segment"
                    )
                owner[id(p)] = j
                if device is None:
                    device = p.device
        if model is not None:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
            if missing:
                raise ValueError(f"parameters of the model in no segment: {missing[:5]}")

        n = len(segments)
        init = replicas * 2.0**16 if init_scale is None else float(init_scale)
        # (n,) float64 on CPU; hooks read it at backward time, so it may be assigned to at any time.
        self.scales = torch.full((n,), init, dtype=torch.float64).clamp_(self.min_scale, self.max_scale)
        self.last_shrink = torch.full((n,), _NEVER, dtype=torch.int64)
        self.updates = 0
        self.skipped = 0
        self._flags = torch.zeros(n, dtype=torch.bool, device=device or "cpu")
        self._handles = []
        for j, (entry, params) in enumerate(segments):
            if entry is not None:
                self._handles.append(entry.register_forward_pre_hook(self._entry_hook(j), with_kwargs=True))
            for p in params:
                self._handles.append(p.register_hook(self._param_hook(j)))

    @property
    def num_segments(self) -> int:
        return self._flags.numel()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss in units of the top segment's scale, in fp32, to call backward() on."""
        return loss.float() * self.scales[-1].item()

    def overflow_flags(self) -> torch.Tensor:
        """(num_segments,) bool on the parameters' device: which segments overflowed since update()."""
        return self._flags.clone()

    def update(self, flags: torch.Tensor | None = None) -> bool:
        """Apply the rules to `flags` (default: this scaler's own), reset them; True: skip this update."""
        flags = self._flags if flags is None else flags
        if tuple(flags.shape) != (self.num_segments,):
            raise ValueError(f"flags has shape {tuple(flags.shape)}, expected ({self.num_segments},)")
        overflowed = flags.detach().cpu() != 0  # the one host sync per update
        skip = bool(overflowed.any())
        if skip:
            may_shrink = overflowed & (self.updates - self.last_shrink >= self.shrink_cooldown)
            self.scales[may_shrink] /= self.shrink
            self.last_shrink[may_shrink] = self.updates
            self.skipped += 1
        else:
            self.scales *= self.growth
        self.scales.clamp_(self.min_scale, self.max_scale)
        self.updates += 1
        self._flags.zero_()
        return skip

    def stats(self) -> dict[str, float | int]:
        return {
            "grad_scale_min": self.scales.min().item(),
            "grad_scale_max": self.scales.max().item(),
            "grad_scale_mean_log2": self.scales.log2().mean().item(),
            "skipped_updates": self.skipped,
        }

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {
            "scales": self.scales.clone(),
            "last_shrink": self.last_shrink.clone(),
            "updates": self.updates,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Accepts what state_dict() returned, also after a round trip through lists (json)."""
        missing = {"scales", "last_shrink", "updates", "skipped"} - set(state)
        if missing:
            raise KeyError(f"grad scaler state lacks {sorted(missing)}")
        scales = torch.as_tensor(state["scales"], dtype=torch.float64).cpu()
        last_shrink = torch.as_tensor(state["last_shrink"], dtype=torch.int64).cpu()
        for key, value in (("scales", scales), ("last_shrink", last_shrink)):
            if tuple(value.shape) != (self.num_segments,):
                raise ValueError(
                    f"grad scaler state {key!r} has shape {tuple(value.shape)}, "
                    f"expected ({self.num_segments},)"
                )
        self.scales = scales.clone()
        self.last_shrink = last_shrink.clone()
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self._flags.zero_()

    def remove(self) -> None:
        """Remove every hook; the model then backpropagates as if no scaler had been built."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _flag(self, segment: int, finite: torch.Tensor) -> None:
        self._flags[segment].logical_or_(finite.logical_not().to(self._flags.device))

    def _rescale_activation_grad(self, grad: torch.Tensor, segment: int) -> torch.Tensor:
        self._flag(segment, torch.isfinite(grad).all())
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        ratio = self.scales[segment - 1].item() / self.scales[segment].item()
        return grad if ratio == 1.0 else grad.mul_(ratio)

    def _entry_hook(self, segment: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(
                    f"{type(module).__name__}, the entry of segment {segment}, must take the activation "
                    "as its first positional argument"
                )
            if not (torch.is_grad_enabled() and args[0].requires_grad):
                return None
            return (_RescaleGradient.apply(args[0], self, segment), *args[1:]), kwargs

        return hook

    def _param_hook(self, segment: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad / self.scales[segment].item()
            self._flag(segment, torch.isfinite(grad).all())
            return grad

        return hook


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step() can be made a no-op: set `skip_next = True` when the scaler's update()
    returns True. DeepSpeed calls the base optimizer's step() itself, so the skip lives here; a
    skipped step leaves parameters, moments and step counts untouched (a closure is not called).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)
