"""The prior's attention masks (DALL·E, appendix B.1) and the two paths that apply them.

The sequence is [text (T positions) ; image (G×G positions, row-major)]. Every pattern is causal.
Text positions see earlier text. Image positions see all of the text and, depending on the layer's
pattern, these earlier image positions:

    full     all of them
    row      those in the same grid row
    column   those in the same grid column
    conv     those within a k×k window centred on the query (k odd)

Layer schedule (`layer_patterns`): the paper's sparse transformer uses column attention in layers
i with (i − 2) mod 4 == 0 (i counted from 0 here), row attention in the others, and convolutional
attention in the last layer; `full` uses full causal attention everywhere.

A pattern is one `mask_mod(batch, head, q_idx, kv_idx) -> bool` written in tensor ops, so the same
function builds the dense boolean mask (the reference path, any device) and FlexAttention's block
mask (the block-sparse path). Both are built once per (pattern, shape, device) and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATTERNS = ("full", "row", "column", "conv")
IMPLS = ("auto", "dense", "flex")


@dataclass(frozen=True)
class MaskSpec:
    text_len: int
    grid: int
    pattern: str = "full"
    kernel: int = 3  # conv window side; odd

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"attention pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"conv attention kernel must be odd and positive, got {self.kernel}")
        if self.text_len < 1 or self.grid < 1:
            raise ValueError(f"text_len and grid must be positive, got {self.text_len}, {self.grid}")

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid * self.grid


def layer_patterns(depth: int, attention: str) -> list[str]:
    """The pattern of each layer: 'full' everywhere, or the paper's 'sparse' schedule."""
    if attention == "full":
        return ["full"] * depth
    if attention != "sparse":
        raise ValueError(f"attention must be 'full' or 'sparse', got {attention!r}")
    return ["conv" if i == depth - 1 else "column" if (i - 2) % 4 == 0 else "row" for i in range(depth)]


def mask_mod(spec: MaskSpec) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                         torch.Tensor]:
    """True where query position q may attend to key position kv."""
    T, G, pattern, half = spec.text_len, spec.grid, spec.pattern, spec.kernel // 2

    def mod(b, h, q, kv):
        causal = kv <= q
        if pattern == "full":
            return causal
        qi, ki = (q - T).clamp(min=0), (kv - T).clamp(min=0)
        qr, qc, kr, kc = qi // G, qi % G, ki // G, ki % G
        if pattern == "row":
            near = qr == kr
        elif pattern == "column":
            near = qc == kc
        else:  # conv
            near = ((qr - kr).abs() <= half) & ((qc - kc).abs() <= half)
        # Text queries (q < T) are causal only; image queries see all text, then `near` image keys.
        return causal & ((q < T) | (kv < T) | near)

    return mod


@functools.lru_cache(maxsize=64)
def dense_mask(spec: MaskSpec, device: str = "cpu") -> torch.Tensor:
    """(L, L) bool, True = attend."""
    idx = torch.arange(spec.seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(spec)(zero, zero, idx[:, None], idx[None, :])


def cached_key_positions(spec: MaskSpec, start: int, end: int, device: str = "cpu") -> slice | torch.Tensor:
    """Which cached keys the queries start..end-1 read during incremental decoding: for one image
    query under a sparse pattern, the indices its mask row allows (text + the row's / column's /
    window's earlier image positions: ~T + G keys instead of T + G·G); otherwise every position
    before `end` (the caller applies the dense mask rows)."""
    if end - start != 1 or spec.pattern == "full" or start < spec.text_len:
        return slice(0, end)
    return _allowed_keys(spec, start, device)


@functools.lru_cache(maxsize=8192)
def _allowed_keys(spec: MaskSpec, q: int, device: str) -> torch.Tensor:
    return dense_mask(spec, device)[q, : q + 1].nonzero().flatten()


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def block_mask(spec: MaskSpec, device: str = "cpu"):
    from torch.nn.attention.flex_attention import create_block_mask

    L = spec.seq_len
    return create_block_mask(mask_mod(spec), None, None, L, L, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """'auto': FlexAttention on CUDA where torch has it; the dense path elsewhere. On CPU,
    torch 2.13's FlexAttention has no backward (it can still serve sampling)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "flex" if torch.device(device).type == "cuda" and flex_available() else "dense"
    if impl == "flex" and not flex_available():
        raise RuntimeError("attention impl 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    return impl


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, impl: str = "dense",
           *, compiled: bool = True) -> torch.Tensor:
    """q, k, v: (B, H, L, D) with L = spec.seq_len, or a prefix of it (training on a shorter
    sequence). `impl` is 'dense' or 'flex' (see resolve_impl)."""
    L = q.shape[-2]
    device = str(q.device)
    if impl == "dense":
        mask = dense_mask(spec, device)[:L, :L]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if L != spec.seq_len:
        raise ValueError(f"the flex path needs the whole sequence ({spec.seq_len} positions), got {L}")
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask(spec, device))
