"""Autoregressive sampling of image tokens from the prior. Torch only.

    prompt rows ─▶ [classifier-free guidance: the same rows again with the caption dropped]
                ─▶ prefix (caption + primed image tokens) through the prior once, filling the KV cache
                ─▶ fan out to `samples_per_prompt` rows per prompt (the cache rows are copied)
                ─▶ per image position: logits ─▶ guidance ─▶ temperature ─▶ top-k ─▶ top-p ─▶ draw

Each row draws from its own generator, seeded per row: an image depends on its prompt, options
and seed only, not on what else shares the batch. The draw is an inverse-CDF lookup of one
uniform per row and step, so the cached and the uncached paths (`use_cache=False` reruns the
whole prefix per token; the reference, and what ZeRO-3-partitioned modules need) pick the same
tokens from the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tessera.models.prior import Prior


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and outside the nucleus set to -inf.

    top_p keeps the smallest set of most likely tokens whose probability reaches p (always at
    least the most likely one)."""
    out = logits.clone()
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, out.shape[-1])
        kth = out.topk(k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # A token is dropped when the tokens before it already reach p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def row_seeds(seed: int | Sequence[int], rows: int) -> list[int]:
    """One seed per row: a sequence as given; an int s gives rows s, s+1, ... (so row 0 of a batch
    seeded s draws what a batch of one seeded s draws)."""
    if isinstance(seed, int):
        return [seed + i for i in range(rows)]
    seeds = [int(s) for s in seed]
    if len(seeds) != rows:
        raise ValueError(f"got {len(seeds)} seeds for {rows} sampled rows")
    return seeds


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on logits (B, V): uncond + s·(cond − uncond); rows with s = 1 keep
    cond exactly."""
    if uncond is None:
        return cond
    s = scale[:, None]
    return torch.where(s == 1, cond, uncond + s * (cond - uncond))


def draw(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_k: int | None,
         top_p: float | None) -> torch.Tensor:
    """One token per row of logits (B, V) from uniforms (B,) in [0, 1): the inverse CDF of the
    filtered distribution. temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    cdf = probs.cumsum(-1)  # (B, V)
    u = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)  # scaled so rounding in the sum cannot overrun
    # First token whose cdf exceeds u: always one with positive probability.
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_image_tokens(prior: Prior, text_ids: torch.Tensor, text_mask: torch.Tensor, *,
                        temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] = 0,
                        guidance_scale: float | Sequence[float] = 1.0, prime: torch.Tensor | None = None,
                        samples_per_prompt: int = 1, use_cache: bool = True) -> torch.Tensor:
    """Image tokens (B·samples_per_prompt, G, G) for captions text_ids/text_mask (B, T); the
    samples of prompt i are rows i·m .. i·m+m-1.

    guidance_scale: 1 = plain conditional sampling; s > 1 pushes away from the caption-free
    prediction (per prompt when a sequence). prime (B, k) int: the first k image tokens (e.g. the
    top k/G rows of an image's tokens) are given and the rest completed. seed: an int (row r uses
    seed + r) or one seed per output row."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    s = prior.shape
    B, m, device = text_ids.shape[0], samples_per_prompt, text_ids.device
    prime = torch.zeros(B, 0, dtype=torch.long, device=device) if prime is None else prime.to(device).long()
    if prime.shape[0] != B or prime.shape[1] >= s.num_image_tokens:
        raise ValueError(f"prime must be (batch={B}, k < {s.num_image_tokens}) image tokens, "
                         f"got {tuple(prime.shape)}")
    scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device).expand(B).repeat_interleave(m)
    guided = bool((scale != 1).any())
    generators = [torch.Generator(device="cpu").manual_seed(x) for x in row_seeds(seed, B * m)]

    # Rows [0, B·m) are conditional; with guidance, rows [B·m, 2·B·m) repeat them caption-free.
    ids, mask = text_ids.repeat_interleave(m, 0), text_mask.repeat_interleave(m, 0)
    if guided:
        ids, mask = torch.cat([ids, torch.zeros_like(ids)]), torch.cat([mask, torch.zeros_like(mask)])
    rows = ids.shape[0]
    tokens = prime.repeat_interleave(m, 0).repeat(rows // (B * m), 1)  # (rows, k)

    def split(logits: torch.Tensor) -> torch.Tensor:
        return guide(logits[: B * m], logits[B * m:] if guided else None, scale)

    if use_cache:
        # The prefix is computed once per distinct prompt (and branch), then fanned out.
        distinct = torch.arange(0, rows, m, device=device)
        cache = prior.new_cache(len(distinct), device=device, dtype=next(prior.parameters()).dtype)
        logits = prior.extend(cache, prior.embed(ids[distinct], mask[distinct], tokens[distinct]))
        fan = torch.arange(len(distinct), device=device).repeat_interleave(m)
        cache.reorder(fan)
        logits = logits[fan]
    for index in range(prime.shape[1], s.num_image_tokens):
        if not use_cache:
            logits = prior.next_image_logits(ids, mask, tokens)
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])
        nxt = draw(split(logits), uniforms, temperature=temperature, top_k=top_k, top_p=top_p)  # (B·m,)
        nxt = nxt.repeat(rows // (B * m))  # the caption-free rows continue with the same tokens
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if use_cache and index + 1 < s.num_image_tokens:
            logits = prior.extend(cache, prior.embed_image_token(nxt, index))
    return tokens[: B * m].view(-1, s.grid, s.grid)
