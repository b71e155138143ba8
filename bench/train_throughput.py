"""Training throughput of the prior vs a plain-PyTorch transformer of the same shape, same run.

    python bench/train_throughput.py --dim 256 --depth 4 --heads 8 --text-len 32 --grid 8 \
        --text-vocab 1024 --image-vocab 128 --batch 16 --threads 2 --attention full

One step = forward, backward and AdamW on a batch of [caption ; image] sequences. The reference
is `nn.TransformerEncoder` (pre-norm, GELU, 4× feed-forward) under a causal mask with one
embedding table and one head over both vocabularies: what a straightforward PyTorch port of
the model does. Prints one JSON line: tokens/s of each (median of --repeats timed windows) and
the ratio. Needs torch only (no Ray, no DeepSpeed), so it runs on any machine the model runs on.
`--precision bf16` runs both under bf16 autocast (the emoji preset's prior.precision): on a CPU with
native bf16 (AVX512-BF16/AMX) its matrix products are ~3x faster than fp32's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tessera.models.prior import Prior, PriorShape  # noqa: E402


class Reference(nn.Module):
    def __init__(self, s: PriorShape):
        super().__init__()
        self.s = s
        self.emb = nn.Embedding(s.text_vocab + s.image_vocab, s.dim)
        self.pos = nn.Parameter(torch.zeros(s.seq_len, s.dim))
        layer = nn.TransformerEncoderLayer(s.dim, s.heads, s.ff_mult * s.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, s.depth, enable_nested_tensor=False)
        self.head = nn.Linear(s.dim, s.text_vocab + s.image_vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(s.seq_len),
                             persistent=False)

    def forward(self, text_ids, text_mask, image_tokens):
        seq = torch.cat([text_ids, image_tokens + self.s.text_vocab], dim=1)
        h = self.encoder(self.emb(seq) + self.pos, mask=self.causal, is_causal=True)
        logits = self.head(h[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def batch(s: PriorShape, B: int, device: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s.text_vocab, (B, s.text_len), generator=g)
    lengths = torch.randint(s.text_len // 4, s.text_len + 1, (B,), generator=g)
    mask = torch.arange(s.text_len)[None, :] < lengths[:, None]
    image = torch.randint(0, s.image_vocab, (B, s.num_image_tokens), generator=g)
    return ids.to(device), mask.to(device), image.to(device)


def tokens_per_s(model: nn.Module, loss_fn, data, s: PriorShape, B: int, steps: int, warmup: int,
                 repeats: int, device: str, precision: str = "fp32") -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * B * s.seq_len / (time.perf_counter() - t))
    return rates


def matmul_flops_per_step(s: PriorShape, B: int) -> float:
    """Forward + backward FLOPs of the prior's matrix products for one batch (3 × 2 × MACs)."""
    L, T, N, D = s.seq_len, s.text_len, s.num_image_tokens, s.dim
    per_layer = L * (4 * D * D + 2 * s.ff_mult * D * D) + 2 * L * L * D  # projections, FF, QK^T and AV
    heads = (T - 1) * D * s.text_vocab + N * D * s.image_vocab
    return 6.0 * B * (s.depth * per_layer + heads)


def sgemm_gflops(D: int, rows: int, device: str) -> float:
    """What this machine's BLAS does on a GEMM the size of the model's feed-forward."""
    a, b = torch.randn(rows, D, device=device), torch.randn(D, 4 * D, device=device)
    for _ in range(3):
        a @ b
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * rows * D * 4 * D * n / (time.perf_counter() - t) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--text-vocab", type=int, default=1024)
    p.add_argument("--image-vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", choices=["full", "sparse"], default="full")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: both models under bf16 autocast (fp32 weights), as prior.precision: bf16")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    s = PriorShape(text_vocab=a.text_vocab, image_vocab=a.image_vocab, text_len=a.text_len, grid=a.grid,
                   dim=a.dim, depth=a.depth, heads=a.heads, attention=a.attention,
                   conv_kernel=min(11, 2 * (a.grid // 2) - 1 if a.grid > 1 else 1))
    data = batch(s, a.batch, a.device)

    prior = Prior(s).to(a.device)
    ref = Reference(s).to(a.device)
    # Interleave the two so machine noise falls on both alike.
    rates = {"tessera": [], "reference": []}
    for _ in range(a.repeats):
        rates["tessera"] += tokens_per_s(prior, lambda m, d: m(*d)["loss"], data, s, a.batch, a.steps,
                                         a.warmup, 1, a.device, a.precision)
        rates["reference"] += tokens_per_s(ref, lambda m, d: m(*d), data, s, a.batch, a.steps, a.warmup, 1,
                                           a.device, a.precision)
    ours, base = statistics.median(rates["tessera"]), statistics.median(rates["reference"])
    flops = matmul_flops_per_step(s, a.batch)
    gemm = sgemm_gflops(a.dim, a.batch * s.seq_len, a.device)
    print(json.dumps({
        "bench": "train_throughput",
        "shape": {k: getattr(a, k) for k in ("dim", "depth", "heads", "text_len", "grid", "text_vocab",
                                             "image_vocab", "batch", "threads", "attention", "precision")},
        "device": a.device, "torch": torch.__version__, "machine": platform.machine(),
        "tokens_per_step": a.batch * s.seq_len,
        "tessera_tokens_per_s": round(ours, 1), "reference_tokens_per_s": round(base, 1),
        "ratio": round(ours / base, 3),
        # The ceiling: tokens/s if every matrix product ran at this machine's measured GEMM rate.
        "matmul_gflop_per_step": round(flops / 1e9, 2), "sgemm_gflops": round(gemm, 1),
        "matmul_bound_tokens_per_s": round(gemm * 1e9 / flops * a.batch * s.seq_len, 1),
        "tessera_windows": [round(r, 1) for r in rates["tessera"]],
        "reference_windows": [round(r, 1) for r in rates["reference"]],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
