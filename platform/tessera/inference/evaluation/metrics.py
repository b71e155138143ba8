"""Image-generation metrics that work on any dataset. Torch and numpy only (storage to read weights).

    r_precision   generated image vs. its own caption among random other captions, embedded by a
                  contrastive model (AttnGAN's R-precision, R = 1)
    fidelity      FID (Fréchet distance of Gaussian fits) and KID (unbiased polynomial-kernel MMD²,
                  Bińkowski et al. 2018, as torch-fidelity computes it) between two feature sets
    ssim          structural similarity (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03)
    bits_per_token

Features come from any `FeatureExtractor`: uint8 images (B, 3, H, W) -> (B, D). The standard one
is Inception-v3 pool3 (D = 2048), loaded by `InceptionFeatures.from_uri` from
  - a torch.export archive (.pt2) of a module with that signature (needs torch only), e.g. made
    once where torch-fidelity is installed: torch.export.save(torch.export.export(
    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=pth),
    (uint8 (2, 3, 299, 299),), dynamic_shapes=({0: Dim("b"), 2: Dim("h"), 3: Dim("w")},)), "x.pt2"), or
  - torch-fidelity's own state dict (weights-inception-2015-12-05-6726825d.pth), which needs
    torch-fidelity and a torchvision matching the installed torch: torch-fidelity imports
    torchvision when it is imported, and PyPI's torchvision is a CUDA build that does not load
    beside a CPU torch, so tessera does not depend on it.
Nothing here downloads weights: without them `load_inception` says so and FID is skipped.
"""

from __future__ import annotations

import io
import math
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tessera import storage

FID_NOT_CONFIGURED = "FID not computed: no Inception weights configured (evaluate.inception_weights_uri)"


# ---- R-precision -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RPrecision:
    value: float  # fraction of images whose own caption outranks every distractor
    distractors: int  # per image: min(requested, distinct captions - 1)
    chance: float  # 1 / (distractors + 1)
    images: int


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], *,
                distractors: int = 99, seed: int, chunk: int = 1024) -> RPrecision:
    """image_emb[i] (N, D) was generated from captions[i], embedded as text_emb[i] (N, D).

    Distractors are drawn without replacement among the other distinct caption texts (a repeated
    caption is the same caption, never its own distractor); ties count against the image."""
    n = len(captions)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or image_emb.shape[0] != n:
        raise ValueError(f"r_precision: image_emb {tuple(image_emb.shape)}, text_emb {tuple(text_emb.shape)} "
                         f"and {n} captions must be (N, D), (N, D) and N")
    if distractors < 1:
        raise ValueError(f"r_precision: distractors must be >= 1, got {distractors}")
    first_row: dict[str, int] = {}
    for i, c in enumerate(captions):
        first_row.setdefault(c, i)
    u = len(first_row)  # distinct captions; text id = order of first appearance
    if u < 2:
        raise ValueError("r_precision needs at least 2 distinct captions")
    text_id = {c: t for t, c in enumerate(first_row)}
    own = np.array([text_id[c] for c in captions])  # (N,)
    first = np.array(list(first_row.values()))  # (U,) the row whose text embedding stands for each text
    k = min(distractors, u - 1)
    rng = np.random.default_rng(seed)
    # Draw among the U - 1 other texts, then step over the image's own text id.
    picks = np.stack([rng.choice(u - 1, size=k, replace=False) for _ in range(n)])  # (N, k)
    picks += picks >= own[:, None]
    img = F.normalize(image_emb.double(), dim=1)
    txt = F.normalize(text_emb.double(), dim=1)
    hits = 0
    for s in range(0, n, chunk):
        rows = slice(s, s + chunk)
        positive = (img[rows] * txt[rows]).sum(1)  # (c,)
        sims = img[rows] @ txt[torch.from_numpy(first)].T  # (c, U)
        negative = sims.gather(1, torch.from_numpy(picks[rows])).amax(1)  # (c,)
        hits += int((positive > negative).sum())
    return RPrecision(value=hits / n, distractors=k, chance=1 / (k + 1), images=n)


# ---- FID / KID -------------------------------------------------------------------------------

def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) of features (N, D), in float64 with the unbiased N - 1."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got {tuple(feats.shape)}")
    f = feats.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½).

    tr (S1 S2)^½ = Σ √λ(S1^½ S2 S1^½): a symmetric PSD matrix, so float64 eigh is stable where
    the general sqrtm of the non-symmetric S1 S2 is not (no scipy needed)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^½
    inner = root1 @ s2 @ root1
    tr_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_root)


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / D + 1)³ (x, y: (m, D) each)."""
    m, d = x.shape
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / (m * m))


def kid(feats1: torch.Tensor, feats2: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """(mean, std, subset size used) of MMD² over random subsets; the subset size shrinks to the
    smaller set so a small evaluation still gets a value (torch-fidelity would refuse)."""
    size = min(subset_size, feats1.shape[0], feats2.shape[0])
    if size < 2 or feats1.shape[1:] != feats2.shape[1:]:
        raise ValueError(f"kid needs two (N >= 2, D) feature sets, got {tuple(feats1.shape)} "
                         f"and {tuple(feats2.shape)}")
    rng = np.random.default_rng(seed)
    f1, f2 = feats1.double(), feats2.double()
    mmds = [_polynomial_mmd2(f1[rng.choice(len(f1), size, replace=False)],
                             f2[rng.choice(len(f2), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(mmds)), float(np.std(mmds)), size


def fidelity(real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
             seed: int = 0) -> dict:
    """FID and KID of generated features `fake` against real ones, both (N, D)."""
    kid_mean, kid_std, size = kid(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {"fid": frechet_distance(*gaussian_stats(real), *gaussian_stats(fake)), "kid_mean": kid_mean,
            "kid_std": kid_std, "kid_subset_size": size, "real": len(real), "generated": len(fake)}


class FeatureExtractor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...  # uint8 (B, 3, H, W) -> (B, D)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] (or uint8 already) -> uint8, as the 8-bit images FID is defined on."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, *,
                     batch_size: int = 64) -> torch.Tensor:
    """Features (N, D) float64 of images (N, 3, H, W) (floats in [0, 1] or uint8), in batches."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"extract_features expects images (N, 3, H, W), got {tuple(images.shape)}")
    out = [extractor(to_uint8(images[s:s + batch_size])) for s in range(0, len(images), batch_size)]
    return torch.cat([o.double().cpu().flatten(1) for o in out])


class InceptionUnavailable(RuntimeError):
    """Configured feature-extractor weights cannot be used; the message names the URI and why."""


class InceptionFeatures:
    """Inception-v3 pool3 features (or any module of that signature): uint8 (B, 3, H, W) -> (B, D)."""

    def __init__(self, module: torch.nn.Module, *, source: str, device: str | torch.device = "cpu"):
        self.module, self.source, self.device = module, source, torch.device(device)

    @classmethod
    def from_uri(cls, uri: str, *, options: storage.StorageOptions | None = None,
                 device: str | torch.device = "cpu") -> InceptionFeatures:
        data = storage.read_bytes(uri, options)
        names = zipfile.ZipFile(io.BytesIO(data)).namelist() if zipfile.is_zipfile(io.BytesIO(data)) else []
        if any(n.endswith("/archive_format") for n in names):  # torch.export.save's .pt2 layout
            module = torch.export.load(io.BytesIO(data)).module()
        elif names:  # torch.save output: take it for torch-fidelity's state dict
            module = _torch_fidelity_inception(uri, data)
        else:
            raise InceptionUnavailable(
                f"{uri}: neither a torch.export archive (.pt2) nor a torch.save state dict")
        return cls(module.to(device), source=uri, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(images.to(self.device))
        return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _torch_fidelity_inception(uri: str, data: bytes) -> torch.nn.Module:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # torchvision's ops fail with RuntimeError, not ImportError, on a mismatched torch
        raise InceptionUnavailable(
            f"{uri}: a torch-fidelity state dict needs torch-fidelity with a working torchvision ({e!r}); "
            "or configure a torch.export archive (.pt2) of the extractor") from None
    with tempfile.NamedTemporaryFile(suffix=".pth") as f:  # its constructor reads a path
        f.write(data)
        f.flush()
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=f.name)


def load_inception(uri: str | None, *, options: storage.StorageOptions | None = None,
                   device: str | torch.device = "cpu") -> tuple[InceptionFeatures | None, str]:
    """(extractor or None, status line for the report). Never raises for missing or unusable
    weights: an evaluation without FID still reports everything else."""
    if not uri:
        return None, FID_NOT_CONFIGURED
    try:
        extractor = InceptionFeatures.from_uri(uri, options=options, device=device)
        return extractor, f"Inception features from {uri}"
    except (InceptionUnavailable, storage.StorageError) as e:
        return None, f"FID not computed: {e}"
    except Exception as e:  # a corrupt archive or a state dict of another network
        return None, f"FID not computed: {uri}: cannot load ({type(e).__name__}: {e})"


# ---- SSIM, bits per token --------------------------------------------------------------------

def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image (B,) of images (B, C, H, W) in [0, 1]: per channel over the valid
    window positions (no padding), as Wang et al.'s reference code."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim expects two images batches of one (B, C, H, W) shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim: images {tuple(a.shape[-2:])} are smaller than the {window}-pixel window")
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g).expand(c, 1, window, window).to(a.device)  # depthwise (C, 1, w, w)
    a, b = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2  # data range 1
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def bits_per_token(nll_nats_sum: float, tokens: int) -> float:
    """Summed negative log-likelihood in nats -> bits per token."""
    if tokens <= 0:
        raise ValueError(f"bits_per_token: tokens must be positive, got {tokens}")
    return nll_nats_sum / math.log(2) / tokens
