"""Stage 1: the dVAE, on the shared training loop (tessera.training.skeleton).

    io.batches() ─uint8 (B,H,W,3)─▶ float (B,3,S,S) ─▶ engine(images, τ, β) ─▶ backward
      (under dvae.augment the batches arrive as the paper's Listing 1 crops, made in the input
       pipeline: tessera.training.ray_io.dvae_crops; validation images are never cropped)
      τ (Gumbel temperature) and β (KL weight) follow the paper's cosine schedules (§A.2)
      each report: reconstruction PSNR, KL, codebook use of the last micro-batch's argmax tokens
      each evaluation: PSNR and codebook use on fixed validation images, and a PNG grid of them
      with their reconstructions (io.save_artifact)

Besides the skeleton's io methods it calls io.validation_images() (a fixed uint8 (N, H, W, 3)
batch, the same on every rank, or None) and io.data_manifest() (stored with each checkpoint).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tessera.models.dvae import DVAE, NAMED_SHAPES, DVAEShape, codebook_usage, psnr, to_model_input, to_pixels
from tessera.parallel import dist
from tessera.training import schedules
from tessera.training.skeleton import Stage
from tessera.viz import GridRow, grid_png


def dvae_shape(cfg) -> DVAEShape:
    shape = NAMED_SHAPES[cfg.dvae.size]
    return replace(shape, num_tokens=cfg.dvae.num_tokens) if cfg.dvae.num_tokens else shape


def reconstruction_grid(originals: torch.Tensor, recon: torch.Tensor, *, per_row: int = 8) -> bytes:
    """PNG: rows of originals, each followed by a row of their reconstructions. (N, 3, S, S) in [0, 1]."""
    a, b = to_pixels(originals), to_pixels(recon)
    rows = []
    for s in range(0, len(a), per_row):
        rows += [GridRow(images=list(a[s:s + per_row])), GridRow(images=list(b[s:s + per_row]))]
    return grid_png(rows)


class DVAEStage(Stage):
    section = "dvae"

    def build_model(self) -> DVAE:
        self.shape = dvae_shape(self.cfg)
        return DVAE(self.shape, init=self.cfg.dvae.init)

    def setup(self) -> None:
        val = self.io.validation_images()
        self.val = to_model_input(val.to(self.device), self.shape.image_size) if val is not None else None

    def data_manifest(self) -> dict | None:
        return self.io.data_manifest()

    def forward_backward(self, batch: dict, *, step: int, seed: int) -> tuple[dict[str, float], int]:
        t = self.t
        images = to_model_input(batch["image"].to(self.device), self.shape.image_size)  # (B, 3, S, S)
        self.tau = schedules.temperature(step, start=t.tau_start, end=t.tau_end, steps=t.tau_steps or t.steps)
        self.beta = schedules.kl_weight(step, end=t.beta_max, steps=t.beta_steps)
        out = self.engine(images, tau=self.tau, beta=self.beta, usage_weight=t.usage_weight,
                          recon_loss=t.recon_loss, logit_scale=t.logit_scale)
        self.engine.backward(out["loss"])
        self.last_logits = out["logits"].detach()
        with torch.no_grad():
            values = {k: float(out[k].detach()) for k in ("loss", "recon_nll", "kl", "usage_kl")}
            values["psnr"] = float(psnr(out["recon"], images))
        return values, images.shape[0]

    def step_metrics(self, m: dict) -> dict:
        ppl, used = codebook_usage(self.last_logits.argmax(dim=1), self.shape.num_tokens)
        ppl, used = dist.all_reduce_mean([ppl, used])
        return {"perplexity": ppl, "codes_used": used, "tau": self.tau, "beta": self.beta}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Validation PSNR and codebook use of argmax tokens (what the prior will see). Every rank
        runs it: under ZeRO-3 a forward pass of the engine's module gathers parameters collectively."""
        if self.val is None:
            return {}
        with self.eval_model() as model:
            was_training = model.training
            model.eval()
            tokens = model.encode(self.val)
            recon = model.decode(tokens)
            model.train(was_training)
        ppl, used = codebook_usage(tokens, self.shape.num_tokens)
        if dist.is_main():
            self.io.save_artifact(f"samples/step-{step:07d}.png",
                                  reconstruction_grid(self.val[:32], recon[:32]))
        return {"val_psnr": float(psnr(recon, self.val)), "val_perplexity": ppl, "val_codes_used": used}

    def progress(self, m: dict) -> str:
        return (f"psnr {m['psnr']:.2f} kl {m['kl']:.3f} codes {m['codes_used']:.0%} τ {m['tau']:.3f} "
                f"β {m['beta']:.2f}")

    def progress_eval(self, m: dict) -> str:
        return f"val psnr {m['val_psnr']:.2f} codes {m['val_codes_used']:.0%}" if "val_psnr" in m else ""


def train_dvae(cfg, io) -> dict:
    """Train to cfg.dvae.steps (resuming from io's latest checkpoint); the last metrics."""
    return DVAEStage(cfg, io).run()
