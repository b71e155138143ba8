"""The contrastive reranker (a small CLIP, Radford et al. 2021): torch only.

    caption ids (B, T) + mask ─▶ token + position embedding ─▶ depth × pre-norm blocks (attention
      over real tokens only) ─▶ masked mean over real tokens ─▶ LayerNorm ─▶ Linear ─▶ t (B, E)
    image (B, 3, H, W) in [0, 1] ─resize to S─▶ conv stages (stride-2 downsampling) ─▶ pool to a
      P×P grid ─▶ flatten ─▶ MLP ─▶ i (B, E)
    t, i L2-normalised; logits = exp(logit_scale) · t iᵀ (B, B); loss = symmetric cross-entropy

The sampler draws M candidate images per caption and keeps the best n by `score` (the cosine of
each caption with its own image). The image tower keeps a coarse grid rather than a global pool:
captions name positions ("on the left") and relations ("above"), which a global average throws
away. Rows of a batch whose captions are identical (shapes repeat a caption with the objects
elsewhere) are all positives of each other, not negatives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# CLIP: τ starts at 0.07 and the logit scale exp(s) is clamped at 100.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class RerankerShape:
    text_vocab: int = 16_384
    text_len: int = 64
    image_size: int = 128  # S: images are resized to S×S before the conv stages
    embed_dim: int = 256  # E: the joint embedding
    text_dim: int = 256
    text_depth: int = 4
    text_heads: int = 4
    image_width: int = 64  # channels of the first stage (doubling per stage)
    image_stages: int = 4  # stride-2 stages: S -> S / 2^stages
    image_blocks: int = 2  # 3×3 convs per stage, the first with stride 2
    image_grid: int = 4  # P: the feature map is pooled to P×P before the projection

    def __post_init__(self) -> None:
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} is not divisible by text_heads {self.text_heads}")
        if self.image_blocks < 1 or self.image_stages < 1:
            raise ValueError(f"image_blocks and image_stages must be >= 1, "
                             f"got {self.image_blocks}, {self.image_stages}")
        if self.image_width % 8:
            raise ValueError(f"image_width {self.image_width} must be a multiple of 8 "
                             "(GroupNorm of 8 groups)")
        if (self.image_size % (2 ** self.image_stages)
                or self.image_size // 2 ** self.image_stages < self.image_grid):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2^image_stages "
                             f"(={2 ** self.image_stages}) leaving at least "
                             f"image_grid={self.image_grid} cells a side")

    def to_dict(self) -> dict:
        return asdict(self)


NAMED_SHAPES = {
    # The debug dVAE's 32 px images, 32 caption tokens: ~1 M parameters, ~0.25 s per batch-64
    # training step on one CPU thread; ~90% caption-level top-1 among 256 shapes pairs after
    # 300 such steps.
    "debug": RerankerShape(text_vocab=1024, text_len=32, image_size=32, embed_dim=128, text_dim=128,
                           text_depth=2,
                           text_heads=4, image_width=16, image_stages=3, image_blocks=1, image_grid=4),
    "small": RerankerShape(text_vocab=16_384, text_len=64, image_size=128, embed_dim=256, text_dim=256,
                           text_depth=4,
                           text_heads=4, image_width=32, image_stages=4, image_blocks=2, image_grid=4),
}


class TextBlock(nn.Module):
    """Pre-norm transformer block; padded positions are never attended to."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); keep (B, 1, 1, T) bool: the keys each query may attend to."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, T, Dh)
        x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
        return x + self.ff(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, shape: RerankerShape):
        super().__init__()
        self.shape = shape
        D = shape.text_dim
        self.token = nn.Embedding(shape.text_vocab, D)
        self.position = nn.Parameter(torch.randn(shape.text_len, D) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(D, shape.text_heads) for _ in range(shape.text_depth))
        self.norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, shape.embed_dim, bias=False)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_ids (B, T) int, text_mask (B, T) bool (True = a caption token), T ≤ text_len -> (B, E)."""
        T = text_ids.shape[1]
        if T > self.shape.text_len:
            raise ValueError(f"captions are {T} tokens long; "
                             f"this reranker reads at most text_len={self.shape.text_len}")
        # Columns past the longest caption are padding in every row: dropping them changes
        # nothing (positions are absolute, padding is masked) and saves their compute.
        real = text_mask.bool().any(0).nonzero()
        L = int(real.max()) + 1 if len(real) else 1
        mask = text_mask[:, :L].bool()
        ids = text_ids[:, :L].long().masked_fill(~mask, 0)  # whatever sits under padding is never looked up
        x = self.token(ids) + self.position[:L]  # (B, L, D)
        # An empty caption would leave a query row with no key at all (NaN softmax): let it see
        # position 0. Its pooled features are zero either way.
        keep = mask.clone()
        keep[:, 0] |= ~mask.any(dim=1)
        keep = keep[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        for block in self.blocks:
            x = block(x, keep)
        w = mask.to(x.dtype)[..., None]  # (B, L, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D)
        return self.proj(self.norm(pooled))


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out),
                         nn.GELU())


class ImageEncoder(nn.Module):
    def __init__(self, shape: RerankerShape):
        super().__init__()
        self.shape = shape
        w = shape.image_width
        layers = [_conv_block(3, w, 1)]
        for s in range(shape.image_stages):
            c_in, c_out = w * 2 ** s, w * 2 ** (s + 1)
            layers += [_conv_block(c_in, c_out, 2)] + [_conv_block(c_out, c_out, 1)
                                                       for _ in range(shape.image_blocks - 1)]
        self.convs = nn.Sequential(*layers)
        c_last, P = w * 2 ** shape.image_stages, shape.image_grid
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(c_last * P * P),
                                  nn.Linear(c_last * P * P, 2 * shape.embed_dim),
                                  nn.GELU(), nn.Linear(2 * shape.embed_dim, shape.embed_dim, bias=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], any H, W -> (B, E)."""
        S = self.shape.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (S, S):
            # Area averaging when shrinking (as the dVAE's input pipeline), bilinear when growing.
            shrink = x.shape[-1] > S and x.shape[-2] > S
            x = F.interpolate(x, size=(S, S), mode="area" if shrink else "bilinear",
                              align_corners=None if shrink else False)
        x = (x * 2 - 1).to(self.convs[0][0].weight.dtype)  # the weights' dtype: bf16 under a bf16 engine
        x = self.convs(x)  # (B, C, S / 2^stages, S / 2^stages)
        x = F.adaptive_avg_pool2d(x, self.shape.image_grid)  # (B, C, P, P)
        return self.head(x)


class Reranker(nn.Module):
    def __init__(self, shape: RerankerShape):
        super().__init__()
        self.shape = shape
        self.text = TextEncoder(shape)
        self.image = ImageEncoder(shape)
        # (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim
        # tensors do not allow.
        self.logit_scale = nn.Parameter(torch.full((1,), INIT_LOGIT_SCALE))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_ids (B, T) int, text_mask (B, T) bool -> (B, E), unit length."""
        return F.normalize(self.text(text_ids, text_mask).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] (resized to image_size when H, W differ) -> (B, E), unit length."""
        return F.normalize(self.image(images).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as CLIP (no gradient beyond the clamp)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()[0]  # ()

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
                images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch: row i's caption and image are a positive pair, and so
        is any pair whose captions are identical. accuracy: mean over both directions of the
        argmax landing on a positive."""
        t = self.encode_text(text_ids, text_mask)  # (B, E)
        i = self.encode_image(images)  # (B, E)
        logits = self.scale() * t @ i.T  # (B, B): captions × images
        positive = same_caption(text_ids, text_mask)  # (B, B) bool, diagonal True
        # symmetric, so the same for both directions
        target = positive.float() / positive.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        with torch.no_grad():
            rows = torch.arange(len(t), device=t.device)
            t2i = positive[rows, logits.argmax(1)].float().mean()
            i2t = positive[logits.argmax(0), rows].float().mean()
        return {"loss": loss, "accuracy": (t2i + i2t) / 2, "logit_scale": self.scale().detach()}

    def score(self, text_ids: torch.Tensor, text_mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of caption i with image i -> (B,)."""
        return (self.encode_text(text_ids, text_mask) * self.encode_image(images)).sum(-1)


def same_caption(text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j hold the same caption (same ids at the same real positions)."""
    mask = text_mask.bool()
    ids = text_ids.long().masked_fill(~mask, -1)  # (B, T); padding compares equal to padding only
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


@torch.no_grad()
def retrieval_accuracy(text_emb: torch.Tensor, image_emb: torch.Tensor,
                       positive: torch.Tensor) -> dict[str, float]:
    """Top-1 retrieval among N pairs: text_emb, image_emb (N, E) unit rows, pair i = (text i, image i);
    positive (N, N) bool marks pairs with identical captions (its diagonal is True).

    instance level: only image i (text i) is right; caption level: any image whose caption is
    identical is right (the honest figure when captions repeat). Chance is the expected accuracy
    of a random pick at each level."""
    n = text_emb.shape[0]
    sim = text_emb.float() @ image_emb.float().T  # (N, N)
    rows = torch.arange(n, device=sim.device)
    best_image, best_text = sim.argmax(1), sim.argmax(0)  # per caption, per image
    return {
        "pairs": n,
        "t2i_top1": float((best_image == rows).float().mean()),
        "i2t_top1": float((best_text == rows).float().mean()),
        "t2i_top1_caption": float(positive[rows, best_image].float().mean()),
        "i2t_top1_caption": float(positive[best_text, rows].float().mean()),
        "chance": 1 / n,
        "chance_caption": float(positive.float().sum(1).mean() / n),
    }
