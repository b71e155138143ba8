"""Evaluation metrics on hand-built cases: R-precision of perfect, unrelated and shuffled matchers;
FID/KID closed forms and their plumbing through a small random conv net standing in for Inception
(loaded from a real torch.export archive, locally and from S3); SSIM against an independent numpy
implementation and closed forms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tessera import storage
from tessera.inference.evaluation.metrics import (
    FID_NOT_CONFIGURED,
    InceptionFeatures,
    bits_per_token,
    extract_features,
    fidelity,
    frechet_distance,
    gaussian_stats,
    kid,
    load_inception,
    r_precision,
    ssim,
)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---- R-precision -----------------------------------------------------------------------------

def test_perfect_matcher_scores_one_and_chance_follows_distractors():
    text = unit(300, 64, 0)
    r = r_precision(text * 3.0, text, [f"caption {i}" for i in range(300)], seed=0)  # normalised inside
    assert (r.value, r.distractors, r.chance, r.images) == (1.0, 99, 0.01, 300)


def test_unrelated_embeddings_score_chance():
    n = 3000
    r = r_precision(unit(n, 32, 1), unit(n, 32, 2), [str(i) for i in range(n)], distractors=9, seed=0)
    assert r.chance == 0.1
    assert abs(r.value - 0.1) < 0.02  # binomial std ≈ 0.0055


def test_shuffled_matcher_with_every_caption_as_distractor_scores_zero():
    text = unit(50, 64, 3)
    shuffled = text[torch.roll(torch.arange(50), 1)]  # image i is exactly caption i - 1
    r = r_precision(shuffled, text, [f"c{i}" for i in range(50)], distractors=99, seed=0)
    assert (r.value, r.distractors) == (0.0, 49)  # 49 others: all of them, so caption i - 1 always is one


def test_distractors_are_drawn_without_replacement_among_the_others():
    # Image i sits nearer caption c(i) than its own and far from all others, so it ranks first
    # exactly when c(i) is not drawn: probability 1 - k / (U - 1).
    n, k = 1001, 99
    text = unit(n, 2048, 4)
    confuser = torch.roll(torch.arange(n), 7)
    image = text + 1.2 * text[confuser]
    caps = [f"c{i}" for i in range(n)]
    r = r_precision(image, text, caps, distractors=k, seed=5)
    assert abs(r.value - (1 - k / (n - 1))) < 0.03  # std ≈ 0.0094
    assert r_precision(image, text, caps, distractors=k, seed=5) == r  # seeded
    assert r_precision(image, text, caps, distractors=k, seed=6).value != r.value


def test_repeated_captions_are_never_their_own_distractors():
    # 3 texts, each generated twice. Repeats embed identically: counted as distractors they would
    # tie with the image's own caption and lose.
    caps = ["red", "blue", "green"] * 2
    text = unit(3, 16, 6).repeat(2, 1)
    r = r_precision(text, text, caps, distractors=99, seed=0)
    assert (r.value, r.distractors, r.chance) == (1.0, 2, pytest.approx(1 / 3))


def test_r_precision_rejects_bad_input():
    e = unit(4, 8, 0)
    with pytest.raises(ValueError, match="3 captions"):
        r_precision(e, e, ["a", "b", "c"], seed=0)
    with pytest.raises(ValueError, match="2 distinct captions"):
        r_precision(e, e, ["a"] * 4, seed=0)
    with pytest.raises(ValueError, match="distractors"):
        r_precision(e, e, list("abcd"), distractors=0, seed=0)


# ---- FID / KID -------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    d = 6
    mu = torch.arange(d, dtype=torch.float64)
    # Diagonal covariances: |Δμ|² + Σ (√a - √b)².
    a, b = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    want = float(mu.square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(torch.zeros(d), torch.diag(a), mu, torch.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    # Non-commuting covariances: tr (S1 S2)^½ as Σ √ of numpy's eigenvalues of the product.
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    s1, s2 = m1 @ m1.T / d, m2 @ m2.T / d
    tr_root = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = float(np.trace(s1) + np.trace(s2) - 2 * tr_root)
    got = frechet_distance(torch.zeros(d), torch.from_numpy(s1), torch.zeros(d), torch.from_numpy(s2))
    assert got == pytest.approx(want, rel=1e-9)


def test_kid_is_the_unbiased_polynomial_mmd():
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64) + 0.5
    k = lambda p, q: (float(p @ q) / 5 + 1) ** 3  # noqa: E731
    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std, size = kid(x, y, subsets=3, subset_size=50, seed=0)  # whole sets: every subset equal
    assert size == 12 and std == pytest.approx(0, abs=1e-12)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


class RandomConvFeatures(nn.Module):
    """A small random conv net standing in for Inception: uint8 (B, 3, H, W) -> (B, 16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # weights large enough that features vary between images as Inception's do
            for p in self.net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.net(x.float() / 255)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")


@torch.no_grad()
def test_fid_and_kid_plumbing_with_random_conv_features():
    extractor = RandomConvFeatures().eval()
    images = smooth_images(160, 0)
    real = extract_features(extractor, images, batch_size=48)
    assert real.shape == (160, 16) and real.dtype == torch.float64
    mu, sigma = gaussian_stats(real)
    self_fid = frechet_distance(mu, sigma, mu, sigma)
    assert abs(self_fid) < 1e-6 * float(sigma.trace())
    g = torch.Generator().manual_seed(1)
    fids, kids = [], []
    for level in (0.1, 0.2, 0.4):
        noised = (images + level * torch.randn(images.shape, generator=g)).clamp(0, 1)
        r = fidelity(real, extract_features(extractor, noised), kid_subsets=50, kid_subset_size=100, seed=0)
        fids.append(r["fid"])
        kids.append(r["kid_mean"])
        assert (r["kid_subset_size"], r["real"], r["generated"]) == (100, 160, 160)
    assert 0 < fids[0] < fids[1] < fids[2] and 0 < kids[0] < kids[1] < kids[2]
    # Unbiased MMD² of a set against itself is ≈ 0, slightly negative where drawn subsets overlap.
    self_kid = kid(real, real, subsets=50, subset_size=100, seed=0)[0]
    assert abs(self_kid) < min(kids[0], kids[2] / 100)
    shifted = fidelity(real, extract_features(extractor, (images + 0.1).clamp(0, 1)), kid_subset_size=100)
    assert shifted["fid"] > fids[0] and shifted["kid_mean"] > 0


def export(module: nn.Module) -> bytes:
    import io

    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    h, w = (torch.export.Dim(n, min=16, max=512) for n in "hw")
    dims = {0: torch.export.Dim("b"), 2: h, 3: w}
    program = torch.export.export(module.eval(), (x,), dynamic_shapes=(dims,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def test_inception_features_load_a_torch_export_archive_from_a_file_and_s3(tmp_path, bucket):
    module = RandomConvFeatures()
    data = export(module)
    (tmp_path / "features.pt2").write_bytes(data)
    storage.write_bytes(f"s3://{bucket}/weights/features.pt2", data)
    images = (torch.rand(5, 3, 40, 24) * 255).to(torch.uint8)  # not the exported example's size
    for uri in (str(tmp_path / "features.pt2"), f"s3://{bucket}/weights/features.pt2"):
        extractor, status = load_inception(uri)
        assert isinstance(extractor, InceptionFeatures) and uri in status
        torch.testing.assert_close(extractor(images), module(images))


def test_without_usable_weights_fid_is_skipped_with_the_reason(tmp_path):
    assert load_inception(None) == (None, FID_NOT_CONFIGURED)
    assert "evaluate.inception_weights_uri" in FID_NOT_CONFIGURED
    missing = str(tmp_path / "nope.pt2")
    extractor, status = load_inception(missing)
    assert extractor is None and status.startswith("FID not computed") and missing in status
    (tmp_path / "junk.bin").write_bytes(b"not weights")
    extractor, status = load_inception(str(tmp_path / "junk.bin"))
    assert extractor is None and "neither a torch.export archive" in status
    # A torch.save state dict: torch-fidelity's format, unusable without it (or of another net).
    torch.save(RandomConvFeatures().state_dict(), tmp_path / "sd.pth")
    extractor, status = load_inception(str(tmp_path / "sd.pth"))
    assert extractor is None and status.startswith("FID not computed") and "sd.pth" in status


# ---- SSIM, bits per token --------------------------------------------------------------------

def ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Per-window weighted moments over explicit windows (centred variances), channel by channel."""
    x = np.arange(11) - 5
    w = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for ca, cb in zip(a, b, strict=True):
        pa = np.lib.stride_tricks.sliding_window_view(ca, (11, 11))  # (H-10, W-10, 11, 11)
        pb = np.lib.stride_tricks.sliding_window_view(cb, (11, 11))
        ma, mb = (pa * w).sum((-2, -1)), (pb * w).sum((-2, -1))
        da, db = pa - ma[..., None, None], pb - mb[..., None, None]
        va, vb, cov = (da * da * w).sum((-2, -1)), (db * db * w).sum((-2, -1)), (da * db * w).sum((-2, -1))
        maps.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(maps))


def test_ssim_against_an_independent_implementation_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 24, 20, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(a, b)
    assert got.shape == (3,)
    for i in range(3):
        assert float(got[i]) == pytest.approx(ssim_numpy(a[i].numpy(), b[i].numpy()), abs=1e-10)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.all(ssim(b, a) == got)  # symmetric
    noisier = (a + 0.4 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert torch.all(ssim(a, noisier) < got) and torch.all(got < 1)
    # Constant images: zero variances, so SSIM is the luminance term (2pq + C1) / (p² + q² + C1).
    p, q, c1 = 0.3, 0.7, 0.01**2
    const = ssim(*(torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (p, q)))
    assert float(const) == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), rel=1e-12)


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\) and \(1, 3, 16, 16\)"):
        ssim(torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16))


def test_bits_per_token():
    assert bits_per_token(64 * math.log(2), 32) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="tokens must be positive"):
        bits_per_token(1.0, 0)
