"""The paper's discrete VAE (Ramesh et al. 2021, §2.1 and appendix A): torch only.

    image (B, 3, S, S) in [0, 1] ─map_pixels─▶ encoder ─▶ logits (B, K, G, G), G = S / 2^(groups-1)
    training: z = gumbel_softmax(logits, τ) ─▶ decoder ─▶ logit-Laplace (μ, ln b) per pixel
    inference: tokens = argmax(logits) ─one-hot─▶ decoder ─▶ sigmoid(μ) ─unmap_pixels─▶ image

Resblocks are bottlenecks (hidden width n_out/4) whose residual branch is multiplied by
post_gain = 1 / n_layers², so a deep stack starts close to the identity. The encoder ends and the
decoder starts with a 1×1 conv; downsampling is max-pool, upsampling is nearest. Convolutions start
as in OpenAI's released code (init="released"): weights normal(0, 1/√(n_in·k²)), biases zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Pixels are mapped into [ε, 1-ε] so the logit-Laplace density stays finite at 0 and 1.
LOGIT_LAPLACE_EPS = 0.1


@dataclass(frozen=True)
class DVAEShape:
    image_size: int = 256
    num_tokens: int = 8192  # K, the codebook size
    grid_size: int = 32  # G: tokens per side
    hidden: int = 256  # n_hid: width of the first group (doubles per group)
    blocks_per_group: int = 2
    decoder_init: int = 128  # channels of the decoder's first 1×1 conv
    # The decoder block's last conv (n_hid -> n_out): 3×3 in OpenAI's released dall_e decoder. 1 is
    # what bundles written before this field hold (artifacts reads a missing value as 1).
    decoder_kernel: int = 3

    def __post_init__(self) -> None:
        ratio = self.image_size // self.grid_size
        if self.image_size % self.grid_size or ratio & (ratio - 1) or ratio < 1:
            raise ValueError(f"image_size / grid_size must be a power of two, "
                             f"got {self.image_size}/{self.grid_size}")

    @property
    def groups(self) -> int:
        return int(math.log2(self.image_size // self.grid_size)) + 1

    def to_dict(self) -> dict:
        return asdict(self)


NAMED_SHAPES = {
    # 32 px -> 8×8 tokens: ~0.2 s per batch-32 step on 2 CPU cores (64 px -> 16×16 costs ~1 s).
    "debug": DVAEShape(image_size=32, num_tokens=128, grid_size=8, hidden=32, blocks_per_group=1,
                       decoder_init=64),
    "small": DVAEShape(image_size=128, num_tokens=2048, grid_size=16, hidden=64, blocks_per_group=2,
                       decoder_init=128),
    "paper": DVAEShape(),
}


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, *, post_gain: float, decoder: bool, last_kernel: int = 1):
        super().__init__()
        n_hid = n_out // 4
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        # As OpenAI's released dall_e code: the encoder's bottleneck is 3×3, 3×3, 3×3, 1×1; the
        # decoder's 1×1, 3×3, 3×3, then `last_kernel` (3×3 there).
        k0, k3 = (1, last_kernel) if decoder else (3, 1)
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_hid, k0, padding=k0 // 2),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_out, k3, padding=k3 // 2),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        gain = 1.0 / (shape.groups * shape.blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(3, shape.hidden, 7, padding=3)]
        n_in = shape.hidden
        for g in range(shape.groups):
            n_out = shape.hidden * 2 ** min(g, 3)
            for _ in range(shape.blocks_per_group):
                layers.append(_Block(n_in, n_out, post_gain=gain, decoder=False))
                n_in = n_out
            if g < shape.groups - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(n_in, shape.num_tokens, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, K, G, G) logits


class Decoder(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        gain = 1.0 / (shape.groups * shape.blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(shape.num_tokens, shape.decoder_init, 1)]
        n_in = shape.decoder_init
        for g in reversed(range(shape.groups)):
            n_out = shape.hidden * 2 ** min(g, 3)
            for _ in range(shape.blocks_per_group):
                layers.append(_Block(n_in, n_out, post_gain=gain, decoder=True,
                                     last_kernel=shape.decoder_kernel))
                n_in = n_out
            if g > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        # Two values per colour channel: the logit-Laplace location μ and log-scale ln b.
        layers += [nn.ReLU(), nn.Conv2d(n_in, 6, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, 6, S, S)


def logit_laplace_nll(stats: torch.Tensor, x_mapped: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per sub-pixel of x_mapped (in (ε, 1-ε)) under the logit-Laplace
    distribution with location μ and log-scale ln b from the decoder: stats (B, 6, S, S)."""
    mu, log_b = stats[:, :3], stats[:, 3:].clamp(min=-7.0)
    logit_x = torch.log(x_mapped) - torch.log1p(-x_mapped)
    nll = ((logit_x - mu).abs() * torch.exp(-log_b) + log_b + math.log(2)
           + torch.log(x_mapped * (1 - x_mapped)))
    return nll.mean()


INITS = ("released", "torch")


def released_init(module: nn.Module) -> None:
    """Every conv as OpenAI's released dall_e `Conv2d` starts: w ~ normal(0, 1/√(n_in·kw²)), b = 0
    (variance 1/fan_in: 3× PyTorch's default kaiming-uniform(a=√5), whose variance is 1/(3·fan_in))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=fan_in ** -0.5)
            nn.init.zeros_(m.bias)


class DVAE(nn.Module):
    def __init__(self, shape: DVAEShape, *, init: str = "released"):
        """init: "released" (OpenAI's released code) or "torch" (PyTorch's Conv2d default)."""
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.shape = shape
        self.encoder = Encoder(shape)
        self.decoder = Decoder(shape)
        if init == "released":
            released_init(self)

    def forward(self, images: torch.Tensor, *, tau: float, beta: float, usage_weight: float = 0.0,
                recon_loss: str = "logit_laplace", logit_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """images: (B, 3, S, S) in [0, 1]. Returns the loss (ELBO terms, per sub-pixel / position)
        and what metrics need.

        usage_weight weighs KL(q̄ || uniform), q̄ the posterior averaged over the batch and grid
        (wav2vec 2.0's diversity loss). The paper's per-position KL does not stop a short run from
        settling on a handful of codes; this term spreads the batch over the codebook instead.
        recon_loss "mse" is a Gaussian NLL with σ = 1/√200 (so it sits on the same nats scale).

        logit_scale multiplies the encoder's logits before the Gumbel noise (and in the KL terms).
        A freshly initialised debug encoder's logits spread by ~0.07 (std over K) against the Gumbel
        noise's 1.28: in a short run the sampled code stays mostly noise, the decoder learns to
        expect that, and colours and outlines come back averaged. Tokens (argmax) ignore it."""
        x = map_pixels(images)
        logits = self.encoder(x) * logit_scale  # (B, K, G, G)
        z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        stats = self.decoder(z)
        if recon_loss == "logit_laplace":
            recon_nll = logit_laplace_nll(stats, x)
        elif recon_loss == "mse":
            recon_nll = 100.0 * F.mse_loss(torch.sigmoid(stats[:, :3]), x)
        else:
            raise ValueError(f"recon_loss must be 'logit_laplace' or 'mse', got {recon_loss!r}")
        log_q = F.log_softmax(logits, dim=1)
        log_k = math.log(self.shape.num_tokens)
        # KL(q || uniform over K) per grid position = Σ q log q + log K.
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + log_k
        q_mean = log_q.exp().mean(dim=(0, 2, 3))  # (K,)
        usage_kl = (q_mean * torch.log(q_mean.clamp_min(1e-12))).sum() + log_k
        # Per-pixel NLL and per-position KL live on different scales: weigh KL by positions/pixels
        # so β means what it means for the ELBO over the whole image.
        kl_weight = (self.shape.grid_size**2) / (3 * self.shape.image_size**2)
        loss = recon_nll + beta * kl_weight * kl + usage_weight * usage_kl
        recon = unmap_pixels(torch.sigmoid(stats[:, :3]))
        return {"loss": loss, "recon_nll": recon_nll, "kl": kl, "usage_kl": usage_kl, "logits": logits,
                "recon": recon}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, G, G) int64 tokens (argmax, no noise)."""
        return self.encoder(map_pixels(images)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G, G) tokens -> (B, 3, S, S) images in [0, 1]."""
        z = F.one_hot(tokens, self.shape.num_tokens).permute(0, 3, 1, 2).to(next(self.parameters()).dtype)
        return unmap_pixels(torch.sigmoid(self.decoder(z)[:, :3]))


def to_model_input(images, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) (a tensor or numpy array) -> float (B, 3, size, size) in [0, 1],
    area-resized when the data is not at the model's resolution; float (B, 3, H, W) is resized only."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def to_pixels(images: torch.Tensor):
    """float (B, 3, S, S) in [0, 1] -> uint8 numpy (B, S, S, 3): what PNGs and classifiers take."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [0, 1]: (B, 3, S, S) each."""
    mse = ((a - b) ** 2).flatten(1).mean(dim=1).clamp(min=1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def codebook_usage(tokens: torch.Tensor, num_tokens: int) -> tuple[float, float]:
    """(perplexity, fraction of codes used) of a batch of tokens."""
    counts = torch.bincount(tokens.flatten(), minlength=num_tokens).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).float().mean())
