"""The paper's transformer prior (Ramesh et al. 2021, §2.2 and appendix B): torch only.

    sequence = [caption (T positions) ; image tokens (G×G, row-major)]
    caption position t: token embedding of its id, or, where the caption has ended, a learned
      padding embedding *of that position* (no id is remapped; ids stay the tokenizer's)
      + a learned text position embedding
    image position (r, c): token embedding + row embedding[r] + column embedding[c]
    ─▶ depth × pre-norm blocks (attention with the layer's mask, see attention.py; feed-forward)
    ─▶ final norm ─▶ text head on positions 0..T-2 (next caption token),
                     image head on positions T-1..T+N-2 (next image token)

Loss: mean cross-entropy over real (non-padding) caption targets and over image targets,
combined as text_weight · text + image_weight · image (paper: 1/8 and 7/8). The heads and the loss
run in float32 whatever the autocast dtype (paper, appendix D: "The logits for the text and image
tokens are computed and stored in 32-bit precision").

Options: `glu` (GEGLU feed-forward, as DALL·E Mega) and `normformer` (NormFormer's extra norms:
after attention, and inside the feed-forward after the activation). `Prior(...,
activation_checkpointing=True)` recomputes each block's activations in the backward pass of
training instead of keeping them (not in eval, under no_grad, or in KV-cached decoding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tessera.models.attention import (
    MaskSpec,
    attend,
    cached_key_positions,
    dense_mask,
    layer_patterns,
    resolve_impl,
)

MASKS_VERSION = 2


@dataclass(frozen=True)
class PriorShape:
    text_vocab: int = 16_384
    image_vocab: int = 8192
    text_len: int = 256
    grid: int = 32
    dim: int = 3968
    depth: int = 64
    heads: int = 62
    ff_mult: int = 4
    attention: str = "sparse"  # 'sparse' (the paper's row/column/conv schedule) or 'full'
    conv_kernel: int = 11
    glu: bool = False
    normformer: bool = False
    # Version of the sparse masks and layer schedule (attention.py). 1: tessera's first ones
    # (row = same grid row, column layers one later, conv without wraparound), which exports
    # written before this field were trained with (artifacts reads a missing value as 1).
    masks: int = MASKS_VERSION

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.attention == "sparse" and self.masks != MASKS_VERSION:
            raise ValueError(f"this prior was trained with sparse attention masks version {self.masks}; "
                             f"this code builds only version {MASKS_VERSION} (the paper's row window, layer "
                             f"schedule and wrapping conv mask): retrain it")
        layer_patterns(1, self.attention)  # validates the name
        MaskSpec(self.text_len, self.grid, "conv", self.conv_kernel)  # validates the kernel

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.num_image_tokens

    def to_dict(self) -> dict:
        return asdict(self)


NAMED_SHAPES = {
    # The debug dVAE's 8×8 grid of 128 codes, 32 caption tokens.
    "debug": PriorShape(text_vocab=1024, image_vocab=128, text_len=32, grid=8, dim=256, depth=4, heads=8,
                        attention="full", conv_kernel=3),
    "small": PriorShape(text_vocab=16_384, image_vocab=2048, text_len=64, grid=16, dim=512, depth=12, heads=8,
                        conv_kernel=5),
    "paper": PriorShape(),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, spec: MaskSpec, normformer: bool):
        super().__init__()
        self.heads, self.spec = heads, spec
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.post_norm = nn.LayerNorm(dim) if normformer else nn.Identity()

    def forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, self.spec, impl)  # (B, H, L, Dh)
        return self.post_norm(self.out(y.transpose(1, 2).reshape(B, L, D)))

    def forward_cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       start: int) -> torch.Tensor:
        """x (B, n, D) at sequence positions start..start+n-1; their keys and values are written
        into the caches (B, H, L, Dh) and the queries attend over positions 0..start+n-1 with this
        layer's mask rows. The same call serves the prompt (n > 1) and each new token (n = 1)."""
        B, n, D = x.shape
        end = start + n
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        keys = cached_key_positions(self.spec, start, end, str(x.device))
        if isinstance(keys, slice):  # every earlier position: no gather
            ck, cv, mask = (cache_k[:, :, :end], cache_v[:, :, :end],
                            dense_mask(self.spec, str(x.device))[start:end, :end])
        else:  # one query under a sparse pattern: only the keys its mask row allows, (B, H, m, Dh)
            ck, cv, mask = cache_k.index_select(2, keys), cache_v.index_select(2, keys), None
        y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask)  # (B, H, n, Dh)
        return self.post_norm(self.out(y.transpose(1, 2).reshape(B, n, D)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, glu: bool, normformer: bool):
        super().__init__()
        hidden = dim * mult
        self.glu = glu
        self.inp = nn.Linear(dim, 2 * hidden if glu else hidden)
        self.mid_norm = nn.LayerNorm(hidden) if normformer else nn.Identity()
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.glu:
            a, gate = h.chunk(2, dim=-1)
            h = a * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.out(self.mid_norm(h))


class Block(nn.Module):
    def __init__(self, shape: PriorShape, pattern: str):
        super().__init__()
        spec = MaskSpec(shape.text_len, shape.grid, pattern, shape.conv_kernel)
        self.pattern = pattern
        self.norm1 = nn.LayerNorm(shape.dim)
        self.attn = Attention(shape.dim, shape.heads, spec, shape.normformer)
        self.norm2 = nn.LayerNorm(shape.dim)
        self.ff = FeedForward(shape.dim, shape.ff_mult, shape.glu, shape.normformer)

    def forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), impl)
        return x + self.ff(self.norm2(x))

    def forward_cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       start: int) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.norm1(x), cache_k, cache_v, start)
        return x + self.ff(self.norm2(x))


class Prior(nn.Module):
    def __init__(self, shape: PriorShape, *, attention_impl: str = "auto",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.shape = shape
        self.attention_impl = attention_impl
        # A model-level switch (not applied from training/ as STYLE.md §1 prefers) because it must
        # skip the KV-cached sampling path, which only the model tells apart.
        self.activation_checkpointing = activation_checkpointing
        D, T, G = shape.dim, shape.text_len, shape.grid
        self.text_emb = nn.Embedding(shape.text_vocab, D)
        self.text_pad = nn.Parameter(torch.zeros(T, D))  # one learned padding embedding per position
        self.text_pos = nn.Parameter(torch.zeros(T, D))
        self.image_emb = nn.Embedding(shape.image_vocab, D)
        self.image_row = nn.Parameter(torch.zeros(G, D))
        self.image_col = nn.Parameter(torch.zeros(G, D))
        self.blocks = nn.ModuleList(Block(shape, p) for p in layer_patterns(shape.depth, shape.attention))
        self.norm = nn.LayerNorm(D)
        self.text_head = nn.Linear(D, shape.text_vocab, bias=False)
        self.image_head = nn.Linear(D, shape.image_vocab, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for p in (self.text_emb.weight, self.image_emb.weight, self.text_pad, self.text_pos,
                  self.image_row, self.image_col, self.text_head.weight, self.image_head.weight):
            nn.init.normal_(p, std=std)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.out, block.ff.inp, block.ff.out):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            # Residual outputs scaled down with depth (GPT-2) so the stack starts near the identity.
            for lin in (block.attn.out, block.ff.out):
                lin.weight.data.mul_(1 / math.sqrt(2 * self.shape.depth))

    def embed(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
              image_tokens: torch.Tensor) -> torch.Tensor:
        """text_ids (B, T) int, text_mask (B, T) bool (True = a caption token), image_tokens (B, n) int
        with n ≤ G·G -> (B, T + n, D)."""
        T, G = self.shape.text_len, self.shape.grid
        if text_ids.shape[1] != T:
            raise ValueError(f"captions must be padded to text_len={T}, got {text_ids.shape[1]} positions")
        # Whatever id sits under padding is never looked up; a real id out of range fails loudly.
        ids = text_ids.masked_fill(~text_mask, 0)
        text = torch.where(text_mask[..., None], self.text_emb(ids), self.text_pad) + self.text_pos
        n = image_tokens.shape[1]
        pos = (self.image_row[:, None, :] + self.image_col[None, :, :]).reshape(G * G, -1)[:n]
        image = self.image_emb(image_tokens) + pos
        return torch.cat([text, image], dim=1)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.attention_impl, x.device)
        if impl == "flex" and x.shape[1] != self.shape.seq_len:
            impl = "dense"  # the block mask covers the full sequence only
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: the recomputation re-runs module hooks (the per-resblock gradient
            # scaler's entry hook, ZeRO-3's gathers) under the forward's autocast state.
            x = checkpoint(block, x, impl, use_reentrant=False) if recompute else block(x, impl)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T + N, D) -> text logits (B, T-1, text_vocab) predicting caption
        positions 1..T-1 and image logits (B, N, image_vocab) predicting image positions 0..N-1, in
        float32 whatever the autocast dtype (paper, appendix D)."""
        T, N = self.shape.text_len, self.shape.num_image_tokens
        return (_float32_head(self.text_head, h[:, : T - 1]),
                _float32_head(self.image_head, h[:, T - 1: T + N - 1]))

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor, *,
                text_weight: float = 1 / 8, image_weight: float = 7 / 8) -> dict[str, torch.Tensor]:
        """Teacher-forced training step over whole sequences: the loss and its two parts."""
        N = self.shape.num_image_tokens
        if image_tokens.shape[1] != N:
            raise ValueError(f"image_tokens must hold {N} tokens per image, got {image_tokens.shape[1]}")
        # The whole sequence goes in (so the block-sparse path sees the shape its mask was built for);
        # the output at the last image position predicts nothing and is not used.
        h = self.hidden(self.embed(text_ids, text_mask, image_tokens))
        text_logits, image_logits = self.logits(h)  # float32
        with torch.autocast(h.device.type, enabled=False):  # the loss in float32 too
            text_loss = masked_cross_entropy(text_logits, text_ids[:, 1:], text_mask[:, 1:])
            image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]),
                                         image_tokens.reshape(-1).long())
            loss = text_weight * text_loss + image_weight * image_loss
        return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}

    def gradient_segments(self) -> list[tuple[nn.Module | None, list[nn.Parameter]]]:
        """The network cut into segments for per-resblock gradient scaling, input to output:
        (the module the segment's activation enters, its parameters). Embeddings; each block;
        the final norm with both heads."""
        embed = [self.text_emb.weight, self.text_pad, self.text_pos, self.image_emb.weight, self.image_row,
                 self.image_col]
        top = [*self.norm.parameters(), *self.text_head.parameters(), *self.image_head.parameters()]
        return [(None, embed), *((b, list(b.parameters())) for b in self.blocks), (self.norm, top)]

    def new_cache(self, batch: int, *, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        s = self.shape
        size = (batch, s.heads, s.seq_len, s.dim // s.heads)
        return KVCache([torch.zeros(size, device=device, dtype=dtype) for _ in self.blocks],
                       [torch.zeros(size, device=device, dtype=dtype) for _ in self.blocks])

    @torch.no_grad()
    def extend(self, cache: KVCache, x: torch.Tensor) -> torch.Tensor:
        """Embedded positions x (B, n, D) following the cache's `length` positions -> the image
        logits (B, image_vocab) predicted at the last of them; the cache grows by n."""
        start = cache.length
        if start + x.shape[1] > self.shape.seq_len:
            raise ValueError(f"the sequence holds {self.shape.seq_len} positions; "
                             f"cannot extend {start} by {x.shape[1]}")
        for block, k, v in zip(self.blocks, cache.k, cache.v, strict=True):
            x = block.forward_cached(x, k, v, start)
        cache.length = start + x.shape[1]
        return _float32_head(self.image_head, self.norm(x[:, -1]))

    def embed_image_token(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """tokens (B,) at image position `index` (row-major) -> (B, 1, D)."""
        G = self.shape.grid
        return (self.image_emb(tokens) + self.image_row[index // G] + self.image_col[index % G])[:, None]

    @torch.no_grad()
    def next_image_logits(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
                          image_tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, image_vocab) of the next image token given a caption and the first n tokens."""
        h = self.hidden(self.embed(text_ids, text_mask, image_tokens))
        return _float32_head(self.image_head, h[:, -1])


@dataclass
class KVCache:
    """Keys and values of every layer, (B, H, seq_len, Dh) each, filled up to `length`."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows (index (B',) into the batch), e.g. to fan a prompt out into
        candidates after computing its prefix once."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


def _float32_head(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """head(h) outside autocast: in float32 with the float32 weights training keeps (a model cast to
    a low dtype as a whole computes in that dtype), returned as float32. The module is called, not its
    weight read, so that ZeRO-3's hooks gather the partitioned weight first."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.to(head.weight.dtype)).float()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions where mask is True; 0 when there are none."""
    targets = targets.long().masked_fill(~mask, 0)  # padding ids are not classes
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1)


def drop_captions(text_mask: torch.Tensor, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Caption dropout: each caption is replaced by the all-padding caption with probability p, so
    the model also learns p(image) and sampling can use classifier-free guidance."""
    if p <= 0:
        return text_mask
    keep = torch.rand(text_mask.shape[0], generator=generator, device="cpu") >= p
    return text_mask & keep.to(text_mask.device)[:, None]


def bits_per_token(nats: torch.Tensor | float) -> float:
    return float(nats) / math.log(2)
