"""Prompts in, images out: tokenize, sample (KV cache, guidance), decode, rerank. Torch only.

One `ImageGenerator` holds a loaded bundle; `generate` takes a batch of jobs — (prompt, params)
pairs, as Serve's dynamic batching or an offline Ray Data batch hands them over — and groups jobs
whose sampling options match into one sampler call, so a batch of similar requests costs one
pass of the prior per image position. A job with an `image` is an edit (tessera.sampling.priming):
its image's top `keep_rows` token rows are kept and the rest drawn.
"""

from __future__ import annotations

import io
import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tessera.models.dvae import to_pixels
from tessera.sampling.priming import check_keep_rows, default_keep_rows, load_image, prime_tokens
from tessera.sampling.sampler import sample_image_tokens
from tessera.sampling.seeds import MAX_CANDIDATES, MAX_SEED, candidate_seeds


@dataclass(frozen=True)
class GenerationParams:
    n: int = 1
    seed: int | None = None  # None: a fresh random seed per job
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0  # 1: no classifier-free guidance
    candidates: int | None = None  # M ≥ n images drawn, the best n by the reranker kept; None: n
    # Image-to-image: (S, S, 3) uint8 at the model's resolution (priming.load_image makes one); its
    # first keep_rows token rows are kept (None: the upper half) and the rest drawn.
    image: np.ndarray | None = None
    keep_rows: int | None = None

    def validate(self, *, max_n: int = 10, max_candidates: int = MAX_CANDIDATES) -> None:
        """ValueError naming the first field at fault."""
        def bad(field: str, why: str):
            raise ValueError(f"{field}: {why}")

        if not 1 <= self.n <= max_n:
            bad("n", f"must be between 1 and {max_n}, got {self.n}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 10):
            bad("temperature", f"must be between 0 and 10, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", f"must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= 100):
            bad("guidance_scale", f"must be between 0 and 100, got {self.guidance_scale}")
        top = min(max_candidates, MAX_CANDIDATES)
        if self.candidates is not None and not self.n <= self.candidates <= top:
            bad("candidates", f"must be between n={self.n} and {top}, got {self.candidates}")
        if self.keep_rows is not None and self.image is None:
            bad("keep_rows", "only applies to an edit (a job with an image)")

    @property
    def draws(self) -> int:
        return self.candidates or self.n


class ImageGenerator:
    """Sampling state of one loaded bundle (tessera.bundle.Bundle) on one device."""

    def __init__(self, bundle, *, device: str = "cpu"):
        self.bundle = bundle
        self.device = torch.device(device)
        self.prior = bundle.prior.to(self.device).eval()
        self.dvae = bundle.dvae.to(self.device).eval()
        self.reranker = bundle.reranker.to(self.device).eval() if bundle.reranker is not None else None
        self.resolution = bundle.resolution
        self.text_len = bundle.text_len

    @classmethod
    def load(cls, uri: str, *, device: str = "cpu", options=None) -> ImageGenerator:
        """The model bundle at `uri` (a folder, or an s3:// / gs:// URI), checked and loaded."""
        from tessera.bundle import load_bundle

        return cls(load_bundle(uri, options=options, device=device), device=device)

    def draw(self, prompt: str, **params):
        """One image for `prompt` as a PIL image: the reranker's best of `candidates` when given.
        `params` are GenerationParams' fields (seed, temperature, top_k, top_p, guidance_scale, ...)."""
        from PIL import Image

        [[image]] = self.generate([(prompt, GenerationParams(n=1, **params))])
        return Image.fromarray(image)

    def edit(self, prompt: str, image, **params):
        """One image for `prompt` primed with the top rows of `image` (a path, file bytes or a PIL
        image, any size: resized and centre-cropped); `keep_rows` and GenerationParams' fields as
        for draw."""
        from PIL import Image

        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            image = buf.getvalue()
        elif not isinstance(image, bytes):
            image = Path(image).read_bytes()
        return self.draw(prompt, image=load_image(image, self.resolution), **params)

    def check(self, params: GenerationParams, **limits) -> None:
        params.validate(**limits)
        if params.draws > params.n and self.reranker is None:
            raise ValueError(f"candidates: this model ({self.bundle.name}) has no reranker, so candidates "
                             f"must equal n ({params.n}), got {params.candidates}")
        if params.image is not None:
            image, S = params.image, self.resolution
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            if got != f"uint8 {(S, S, 3)}":
                raise ValueError(f"image: must be a ({S}, {S}, 3) uint8 array at the model's resolution "
                                 f"(tessera.sampling.priming.load_image makes one), got {got}")
            check_keep_rows(self.keep_rows(params), self.prior.shape.grid)

    def keep_rows(self, params: GenerationParams) -> int:
        """Token rows of the job's image kept: 0 without an image."""
        if params.image is None:
            return 0
        return default_keep_rows(self.prior.shape.grid) if params.keep_rows is None else params.keep_rows

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.bundle.tokenizer.encode(prompts, text_len=self.text_len)
        return torch.from_numpy(ids).long().to(self.device), torch.from_numpy(mask).to(self.device)

    @torch.no_grad()
    def generate(self, jobs: list[tuple[str, GenerationParams]]) -> list[list[np.ndarray]]:
        """Per job, its n images as (H, W, 3) uint8 arrays, best-scored first when reranked."""
        jobs = [(p, params if params.seed is not None else replace(params, seed=secrets.randbelow(MAX_SEED)))
                for p, params in jobs]
        for _, params in jobs:
            self.check(params)
        out: list[list[np.ndarray]] = [[] for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        for i, (_, params) in enumerate(jobs):
            # One sampler call primes every row with the same number of tokens.
            key = (params.temperature, params.top_k, params.top_p, params.draws, self.keep_rows(params))
            groups.setdefault(key, []).append(i)
        for (temperature, top_k, top_p, draws, keep_rows), members in groups.items():
            prompts = [jobs[i][0] for i in members]
            ids, mask = self.encode_prompts(prompts)
            seeds = candidate_seeds([jobs[i][1].seed for i in members], draws)  # tessera.sampling.seeds
            prime = None
            if keep_rows:
                prime = prime_tokens(self.dvae, np.stack([jobs[i][1].image for i in members]), keep_rows)
            tokens = sample_image_tokens(self.prior, ids, mask, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seeds,
                                         guidance_scale=[jobs[i][1].guidance_scale for i in members],
                                         prime=prime, samples_per_prompt=draws)
            images = self.dvae.decode(tokens.to(self.device))  # (len(members)·draws, 3, S, S) in [0, 1]
            order = self.rank(prompts, images, draws)  # (len(members), draws)
            pixels = to_pixels(images)
            for row, i in enumerate(members):
                keep = order[row, : jobs[i][1].n]
                out[i] = [pixels[row * draws + int(j)] for j in keep]
        return out

    def rank(self, prompts: list[str], images: torch.Tensor, draws: int) -> torch.Tensor:
        """(prompts, draws) candidate indices, best first: by reranker score, or as drawn."""
        if self.reranker is None or draws == 1:
            return torch.arange(draws).expand(len(prompts), draws)
        scores = self.score([p for p in prompts for _ in range(draws)], images)
        return scores.view(len(prompts), draws).argsort(dim=1, descending=True, stable=True).cpu()

    @torch.no_grad()
    def score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """Reranker scores (B,) of prompt i with image i; images (B, 3, S, S) in [0, 1]."""
        if self.reranker is None:
            raise ValueError(f"{self.bundle.name} has no reranker")
        # The reranker's own caption length, which need not be the prior's.
        ids, mask = self.bundle.tokenizer.encode(prompts, text_len=self.reranker.shape.text_len)
        ids, mask = torch.from_numpy(ids).long().to(self.device), torch.from_numpy(mask).to(self.device)
        return self.reranker.score(ids, mask, images.to(self.device))
