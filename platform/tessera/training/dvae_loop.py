"""Stage 1 worker loop: the dVAE trained with DeepSpeed, in a Ray Train worker or in one process.

    hooks.batches() ─uint8 (B,H,W,3)─▶ float (B,3,S,S) ─▶ engine(images, τ, β) ─▶ backward/step
      every report_every: metrics (mean over ranks) ─▶ hooks.report
      every checkpoint_every / at the end: every rank saves its DeepSpeed state into one folder
      ─▶ hooks.report(checkpoint=folder); resume = hooks.latest_checkpoint()

The model knows nothing of this: DeepSpeed wraps it here (STYLE 1). Hooks decide where batches
come from and where reports/checkpoints go, so the same loop runs under Ray Train and in a test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import torch
import torch.nn.functional as F

from tessera.config import TesseraConfig
from tessera.models.dvae import DVAE, NAMED_SHAPES, DVAEShape, codebook_usage, psnr
from tessera.parallel import dist
from tessera.parallel.deepspeed_config import build_deepspeed_config
from tessera.training import schedules
from tessera.training.common import (
    CHECKPOINT_TAG,
    RayTrainIO,
    announce,
    eta_minutes,
    join_process_group,
    load_ema,
    load_state,
    save_checkpoint,
    worker_logging,
)
from tessera.training.ema import ParameterEMA

log = logging.getLogger("tessera.train_dvae")


class Hooks(Protocol):
    def batches(self, epoch: int) -> Iterator[dict]: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def validation_images(self) -> torch.Tensor | None:
        """A fixed uint8 (N, H, W, 3) batch, the same on every rank, or None."""
        ...

    def save_artifact(self, name: str, data: bytes) -> None:
        """Write a file (e.g. a PNG grid) into the run's storage; called on rank 0 only."""
        ...

    def data_manifest(self) -> dict | None:
        """The manifest of the dataset being trained on, stored with each checkpoint."""
        ...


def reconstruction_grid(originals: torch.Tensor, recon: torch.Tensor, *, per_row: int = 8) -> bytes:
    """PNG: rows of originals, each followed by a row of their reconstructions. (N, 3, S, S) in [0, 1]."""
    import io

    from PIL import Image

    n, _, size, _ = originals.shape
    rows = -(-n // per_row)
    canvas = Image.new("RGB", (per_row * size, 2 * rows * size), (255, 255, 255))
    for i in range(n):
        r, c = divmod(i, per_row)
        for k, img in enumerate((originals[i], recon[i])):
            arr = (img.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            canvas.paste(Image.fromarray(arr), (c * size, (2 * r + k) * size))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, shape: DVAEShape, *, step: int, hooks: Hooks) -> dict:
    """Validation PSNR and codebook use of argmax tokens (what the prior will see). Runs on every
    rank: under ZeRO-3 a forward pass of the engine's module gathers parameters collectively."""
    was_training = model.training
    model.eval()
    tokens = model.encode(images)
    recon = model.decode(tokens)
    model.train(was_training)
    ppl, used = codebook_usage(tokens, shape.num_tokens)
    if dist.is_main():
        hooks.save_artifact(f"samples/step-{step:07d}.png", reconstruction_grid(images[:32], recon[:32]))
    return {"val_psnr": float(psnr(recon, images)), "val_perplexity": ppl, "val_codes_used": used}


def progress_line(m: dict, total: int, started: float, first_step: int = 0) -> str:
    """One console line per report: where the run is, how it is doing, when it will end."""
    eta = eta_minutes(m["step"], total, started, first_step)
    line = (f"step {m['step']}/{total} loss {m['loss']:.4f} psnr {m['psnr']:.2f} kl {m['kl']:.3f} "
            f"codes {m['codes_used']:.0%} τ {m['tau']:.3f} β {m['beta']:.2f} {m['samples_per_s']:.0f} samples/s "
            f"eta {eta:.1f} min")
    if "val_psnr" in m:
        line += f" | val psnr {m['val_psnr']:.2f} codes {m['val_codes_used']:.0%}"
    return line


def _ema_model(ema: ParameterEMA, shape: DVAEShape, device) -> DVAE:
    """A plain (unsharded) dVAE holding the averaged weights, for evaluation."""
    model = DVAE(shape).to(device)
    model.load_state_dict(ema.shadow)
    return model


def dvae_shape(cfg: TesseraConfig) -> DVAEShape:
    shape = NAMED_SHAPES[cfg.dvae.size]
    return replace(shape, num_tokens=cfg.dvae.num_tokens) if cfg.dvae.num_tokens else shape


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) in [0, 1]; area-downsampled when the data is
    larger than the model's resolution."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def train_dvae(cfg: TesseraConfig, hooks: Hooks) -> dict:
    """Train to cfg.dvae.steps (resuming from the latest checkpoint); returns the last metrics."""
    t = cfg.dvae
    join_process_group(t.use_gpu)
    import deepspeed

    torch.manual_seed(t.seed)
    shape = dvae_shape(cfg)
    model = DVAE(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    ds_config = build_deepspeed_config(micro_batch=t.micro_batch, grad_accum=t.grad_accum, world_size=dist.world_size(),
                                       zero_stage=t.zero_stage, precision=t.precision, grad_clip=t.grad_clip)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device = engine.device
    ema = ParameterEMA(engine.module, t.ema_decay, zero_stage=t.zero_stage) if t.ema_decay else None

    step = 0
    resume = hooks.latest_checkpoint()
    if resume:
        engine.load_checkpoint(resume, tag=CHECKPOINT_TAG)
        step = load_state(resume)["step"]
        load_ema(ema, resume)
        log.info("resumed from step %d", step)

    tau_steps = t.tau_steps or t.steps
    data_manifest = hooks.data_manifest() if dist.is_main() else None
    val = hooks.validation_images()
    val = to_model_input(val.to(device), shape.image_size) if val is not None else None
    window = {"loss": 0.0, "recon_nll": 0.0, "kl": 0.0, "usage_kl": 0.0, "psnr": 0.0, "n": 0}
    last: dict = {}
    tick, samples = time.time(), 0
    started, first_step = time.time(), step
    epoch = step  # a fresh file order after a resume, not a replay of epoch 0
    micro = 0
    while step < t.steps:
        for batch in hooks.batches(epoch):
            if step >= t.steps:
                break
            # Gumbel noise from a per-(step, rank) seed: a resumed run draws what the
            # uninterrupted one would have, without checkpointing RNG state.
            torch.manual_seed(t.seed * 1_000_003 + step * 1_009 + dist.rank())
            images = to_model_input(batch["image"].to(device), shape.image_size)
            tau = schedules.temperature(step, start=t.tau_start, end=t.tau_end, steps=tau_steps)
            beta = schedules.kl_weight(step, end=t.beta_max, steps=t.beta_steps)
            lr = t.lr * schedules.lr_factor(step, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = engine(images, tau=tau, beta=beta, usage_weight=t.usage_weight, recon_loss=t.recon_loss,
                         logit_scale=t.logit_scale)
            engine.backward(out["loss"])
            engine.step()
            micro += 1
            if micro % t.grad_accum:
                continue
            step += 1
            if ema is not None:
                ema.update(engine.module)
            samples += images.shape[0]
            with torch.no_grad():
                window["loss"] += float(out["loss"])
                window["recon_nll"] += float(out["recon_nll"])
                window["kl"] += float(out["kl"])
                window["usage_kl"] += float(out["usage_kl"])
                window["psnr"] += float(psnr(out["recon"], images))
                window["n"] += 1
            save = step % t.checkpoint_every == 0 or step == t.steps
            if step % t.report_every == 0 or save:
                tokens = out["logits"].argmax(dim=1)
                ppl, used = codebook_usage(tokens, shape.num_tokens)
                n = max(1, window["n"])
                means = dist.all_reduce_mean([window[k] / n for k in ("loss", "recon_nll", "kl", "usage_kl", "psnr")]
                                             + [ppl, used])
                elapsed = time.time() - tick
                last = {"step": step, "loss": means[0], "recon_nll": means[1], "kl": means[2], "usage_kl": means[3],
                        "psnr": means[4], "perplexity": means[5], "codes_used": means[6], "tau": tau, "beta": beta, "lr": lr,
                        "samples_per_s": samples * dist.world_size() / max(elapsed, 1e-9)}
                if val is not None and (step % t.eval_every == 0 or step == t.steps):
                    last |= evaluate(_ema_model(ema, shape, device) if ema else engine.module, val, shape,
                                     step=step, hooks=hooks)
                if dist.is_main():
                    announce(progress_line(last, t.steps, started, first_step))
                window = dict.fromkeys(window, 0.0) | {"n": 0}
                tick, samples = time.time(), 0
                if save:
                    save_checkpoint(engine, hooks, last, state={"step": step, "shape": shape.to_dict()},
                                    config=cfg.model_dump(mode="json"), data_manifest=data_manifest, ema=ema)
                else:
                    hooks.report(last, None)
        epoch += 1
    return last


class RayTrainHooks(RayTrainIO):
    """Stage 1's hooks under Ray Train: validation images and the manifest of the prepared data."""

    def __init__(self, cfg: TesseraConfig):
        super().__init__(cfg, artifacts_uri=cfg.dvae_uri, micro_batch=cfg.dvae.micro_batch)

    def validation_images(self) -> torch.Tensor | None:
        return load_validation_images(self.cfg, limit=VALIDATION_IMAGES)

    def data_manifest(self) -> dict | None:
        from tessera import storage
        from tessera.data.pipeline import load_manifest

        return load_manifest(self.cfg.data_uri, storage.StorageOptions.from_config(self.cfg.storage))


VALIDATION_IMAGES = 64


def load_validation_images(cfg: TesseraConfig, *, limit: int) -> torch.Tensor | None:
    """The first `limit` images of the prepared validation split, read directly (no Ray): every
    rank reads the same ones."""
    from tessera import storage
    from tessera.data.pipeline import decode_shards, load_manifest, shard_uris

    opts = storage.StorageOptions.from_config(cfg.storage)
    manifest = load_manifest(cfg.data_uri, opts)
    if not manifest["splits"].get("val", {}).get("num_samples"):
        return None
    tok = storage.read_bytes(storage.join(cfg.data_uri, manifest["tokenizer"]["path"]), opts).decode()
    images = []
    for uri in shard_uris(cfg.data_uri, manifest, "val"):
        out = decode_shards({"bytes": [storage.read_bytes(uri, opts)]}, tokenizer_json=tok, text_len=1,
                            image_ext=manifest["image_format"], resolution=manifest["resolution"])
        images.append(torch.from_numpy(out["image"]))
        if sum(len(i) for i in images) >= limit:
            break
    return torch.cat(images)[:limit]


def ray_train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    worker_logging()
    cfg: TesseraConfig = config["cfg"]
    train_dvae(cfg, RayTrainHooks(cfg))
