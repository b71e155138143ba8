"""The prior's attention masks (DALL·E, appendix B.1 and Fig. 11) and the two paths that apply them.

The sequence is [text (T positions) ; image (G×G positions, row-major)]. Every pattern is causal.
Text positions see earlier text. Image positions see all of the text and, depending on the layer's
pattern, these image positions at raster distance d = q − kv ≥ 0 (q, kv in raster order):

    full     all of them
    row      d ≤ G: itself and the G before it, wrapping onto the previous row (Fig. 11a: "each
             image token attends to the previous 5 image tokens in raster order", G = 4); the
             Sparse Transformer's local pattern with stride G
    column   d mod G = 0: the same grid column (Fig. 11b; Fig. 11c is the same mask on transposed
             image states, a GPU-layout choice the dense and block-sparse paths here do not need)
    conv     d = r·G + e with 0 ≤ r ≤ k//2 and |e| ≤ k//2: a k×k window centred on the query
             (k odd), in raster offsets, so it wraps around the grid's edges like the row mask
             (Fig. 11d: "with wraparound behavior (similar to the row attention)")

Layer schedule (`layer_patterns`): the paper counts layers i = 1..depth and uses column attention
where (i − 2) mod 4 = 0 (layers 2, 6, 10, ...), row attention in the other layers, and convolutional
attention in the last layer; `full` uses full causal attention everywhere.

A pattern is one `mask_mod(batch, head, q_idx, kv_idx) -> bool` written in tensor ops, so the same
function builds the dense boolean mask (the reference path, any device; its rows also pick the keys
of KV-cached decoding) and FlexAttention's block mask (the block-sparse path). Both are built once
per (pattern, shape, device) and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATTERNS = ("full", "row", "column", "conv")
# Under CPU bf16 autocast the dense path computes attention in fp32 (see attend); off, it runs in bf16
# as on CUDA (bench/memory_plan.py's test turns it off to measure what CUDA saves).
CPU_BF16_ATTENTION_IN_FP32 = True
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
    """The pattern of each layer, first to last: 'full' everywhere, or the paper's 'sparse' schedule
    (layer i = 1..depth: conv if i = depth, else column if (i − 2) mod 4 = 0, else row)."""
    if attention == "full":
        return ["full"] * depth
    if attention != "sparse":
        raise ValueError(f"attention must be 'full' or 'sparse', got {attention!r}")
    return ["conv" if i == depth else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]


def mask_mod(spec: MaskSpec) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                         torch.Tensor]:
    """True where query position q may attend to key position kv."""
    T, G, pattern, half = spec.text_len, spec.grid, spec.pattern, spec.kernel // 2

    def mod(b, h, q, kv):
        causal = kv <= q
        if pattern == "full":
            return causal
        d = q - kv  # raster distance between two image positions (where `near` is read)
        if pattern == "row":
            near = d <= G
        elif pattern == "column":
            near = d % G == 0
        else:  # conv: the nearest allowed multiple r·G of G, then |d − r·G| within the half-width
            r = ((d + G // 2) // G).clamp(min=0, max=half)
            near = (d - r * G).abs() <= half
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
    query under a sparse pattern, the indices its mask row allows (the text + at most G + 1 image
    keys for row, G for column, (k//2)·k + k//2 + 1 for conv, not up to G·G); otherwise every position
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
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and CPU_BF16_ATTENTION_IN_FP32:
            # CPU's bf16 attention kernel is slow: its backward took ~4x the fp32 one's time
            # (12 vs 3.9 ms a call at 16 x 6 heads x 88 positions), most of a bf16 step. The scores are
            # a few % of the FLOPs, so under CPU autocast they run in fp32 (bench/train_throughput.py).
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if L != spec.seq_len:
        raise ValueError(f"the flex path needs the whole sequence ({spec.seq_len} positions), got {L}")
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask(spec, device))
