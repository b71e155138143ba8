"""Stage 2 worker loop: the transformer prior trained with DeepSpeed (ZeRO-3 by default), in a Ray
Train worker or in one process.

    hooks.batches() ─{text_ids, text_mask, image_tokens}─▶ caption dropout (seeded by step)
      ─▶ autocast(bf16 | fp16 | off) engine(...) ─▶ [per-resblock scaled] backward ─▶ step
      (a non-finite gradient under per-resblock scaling skips the update on every rank)
      every report_every: metrics (mean over ranks) ─▶ hooks.report
      every eval_every / at the end: validation image loss with and without captions, and a PNG
      grid of samples for fixed validation captions decoded with the stage-1 dVAE
      every checkpoint_every / at the end: checkpoint (DeepSpeed shards + state + EMA)

Mixed precision is torch autocast around the forward pass with fp32 weights and optimizer state
(DeepSpeed runs in fp32): bf16 needs no loss scaling; fp16 uses the paper's per-resblock gradient
scales (tessera.training.grad_scaler), which can also be switched on in fp32 to exercise them.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import numpy as np
import torch

from tessera.config import TesseraConfig
from tessera.models.prior import NAMED_SHAPES, Prior, PriorShape, bits_per_token, drop_captions
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

log = logging.getLogger("tessera.train_prior")
SCALER_KEY = "grad_scaler"


class Hooks(Protocol):
    def batches(self, epoch: int) -> Iterator[dict]: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def token_manifest(self) -> dict:
        """The token dataset's manifest (vocabularies, grid, where its dVAE is); every rank."""
        ...

    def validation_rows(self) -> dict | None:
        """Fixed validation rows, the same on every rank: text_ids, text_mask, image_tokens
        (numpy) and caption (object array); or None."""
        ...

    def image_decoder(self):
        """A callable: image tokens (B, G, G) -> images (B, 3, S, S) in [0, 1]; rank 0 only; or None."""
        ...

    def save_artifact(self, name: str, data: bytes) -> None: ...


def prior_shape(cfg: TesseraConfig, manifest: dict) -> PriorShape:
    """The named size, with vocabularies and grid from the token dataset, caption length from the
    loader, and the config's explicit overrides."""
    p = cfg.prior
    over = {k: getattr(p, k) for k in ("dim", "depth", "heads", "attention", "glu", "normformer")
            if getattr(p, k) is not None}
    return replace(NAMED_SHAPES[p.size], text_vocab=int(manifest["text_vocab_size"]),
                   image_vocab=int(manifest["num_image_tokens"]), grid=int(manifest["grid_size"]),
                   text_len=cfg.loader.text_len, **over)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("prior.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); not biases or norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def t(x):
        return (torch.tensor(x) if isinstance(x, np.ndarray) else x).to(device)

    return t(batch["text_ids"]).long(), t(batch["text_mask"]).bool(), t(batch["image_tokens"]).long()


@torch.no_grad()
def validation_losses(model: Prior, rows: dict, *, batch: int, device, precision: str) -> dict:
    """Image loss on fixed validation rows with their captions and with every caption dropped
    (the same model as an unconditional one); the gap is what the captions tell the model.
    Every rank runs all of it: under ZeRO-3 each forward pass gathers parameters collectively."""
    was_training = model.training
    model.eval()
    ids, mask, image = _to_device(rows, device)
    sums = {"val_image_loss": 0.0, "val_image_loss_uncond": 0.0, "val_text_loss": 0.0}
    n = ids.shape[0]
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        with _autocast(precision, device):
            cond = model(ids[sl], mask[sl], image[sl])
            uncond = model(ids[sl], torch.zeros_like(mask[sl]), image[sl])
        k = ids[sl].shape[0]
        sums["val_image_loss"] += float(cond["image_loss"]) * k
        sums["val_text_loss"] += float(cond["text_loss"]) * k
        sums["val_image_loss_uncond"] += float(uncond["image_loss"]) * k
    model.train(was_training)
    out = {k: v / n for k, v in sums.items()}
    out["val_image_bits"] = bits_per_token(out["val_image_loss"])
    out["val_caption_gain_bits"] = bits_per_token(out["val_image_loss_uncond"] - out["val_image_loss"])
    return out


def sample_grid_png(images: torch.Tensor, captions: list[str], *, per_caption: int,
                    references: torch.Tensor | None = None, scale: int = 4, gap: int = 2) -> bytes:
    """PNG: one row per caption (its text above): the reference image first when given (the
    validation image as its tokens decode), then `per_caption` samples. Images (N, 3, S, S)."""
    from PIL import Image, ImageDraw

    size = images.shape[-1]
    side, label = size * scale, 12
    cols = per_caption + (references is not None)
    width = cols * (side + gap) + gap  # a wider gap after the reference column
    canvas = Image.new("RGB", (width, len(captions) * (side + label + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def tile(img: torch.Tensor) -> Image.Image:
        arr = (img.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(arr).resize((side, side), Image.NEAREST)

    for r, caption in enumerate(captions):
        y = r * (side + label + gap)
        draw.text((2, y), caption[: max(1, width // 6)], fill=(0, 0, 0))
        row = ([references[r]] if references is not None else []) + [images[r * per_caption + c] for c in range(per_caption)]
        for c, img in enumerate(row):
            canvas.paste(tile(img), (c * (side + gap) + (gap if c and references is not None else 0), y + label))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def write_sample_grid(model: Prior, rows: dict, hooks: Hooks, *, step: int, cfg: TesseraConfig, device,
                      precision: str) -> None:
    """Samples for the first grid_captions validation captions; every rank samples (ZeRO-3
    collectives), rank 0 decodes and writes the PNG."""
    from tessera.sampling.sampler import sample_image_tokens

    p = cfg.prior
    k = min(p.grid_captions, len(rows["caption"]))
    if k == 0:
        return
    ids, mask, _ = _to_device({key: rows[key][:k] for key in ("text_ids", "text_mask", "image_tokens")}, device)
    ids, mask = ids.repeat_interleave(p.grid_samples, 0), mask.repeat_interleave(p.grid_samples, 0)
    was_training = model.training
    model.eval()
    with _autocast(precision, device):
        # Uncached: the KV-cache path calls the blocks' forward_cached, which bypasses the module
        # hooks ZeRO-3 gathers its partitioned parameters with.
        tokens = sample_image_tokens(model, ids, mask, temperature=p.grid_temperature, top_k=p.grid_top_k,
                                     seed=p.seed + step, use_cache=False)
    model.train(was_training)
    if dist.is_main():
        decode = hooks.image_decoder()
        if decode is not None:
            images = decode(tokens.cpu())
            g = model.shape.grid
            refs = decode(torch.as_tensor(np.array(rows["image_tokens"][:k], dtype=np.int64)).view(k, g, g))
            png = sample_grid_png(images, [str(c) for c in rows["caption"][:k]], per_caption=p.grid_samples,
                                  references=refs)
            hooks.save_artifact(f"samples/step-{step:07d}.png", png)


def progress_line(m: dict, total: int, started: float, first_step: int = 0) -> str:
    eta = eta_minutes(m["step"], total, started, first_step)
    line = (f"step {m['step']}/{total} loss {m['loss']:.4f} text {m['text_loss']:.3f} image {m['image_loss']:.3f} "
            f"({m['image_bits']:.2f} bits) {m['tokens_per_s']:.0f} tokens/s eta {eta:.1f} min")
    if m.get("skipped_updates"):
        line += f" skipped {m['skipped_updates']}"
    if "val_image_loss" in m:
        line += (f" | val image {m['val_image_loss']:.3f} uncond {m['val_image_loss_uncond']:.3f} "
                 f"text {m['val_text_loss']:.3f}")
    return line


def _ema_prior(ema: ParameterEMA, shape: PriorShape, impl: str, device) -> Prior:
    model = Prior(shape, attention_impl=impl).to(device)
    model.load_state_dict(ema.shadow)
    return model


def train_prior(cfg: TesseraConfig, hooks: Hooks) -> dict:
    """Train to cfg.prior.steps (resuming from the latest checkpoint); returns the last metrics."""
    p = cfg.prior
    join_process_group(p.use_gpu)
    import deepspeed

    from tessera.training.grad_comm import GradComm
    from tessera.training.grad_scaler import ResblockGradScaler, SkippableAdamW

    comm = GradComm(p.grad_comm, zero_stage=p.zero_stage, use_gpu=p.use_gpu)

    manifest = hooks.token_manifest()
    shape = prior_shape(cfg, manifest)
    torch.manual_seed(p.seed)
    model = Prior(shape, attention_impl=p.attention_impl)
    scaling = p.resblock_grad_scaling if p.resblock_grad_scaling is not None else p.precision == "fp16"
    # Hooks go on before DeepSpeed partitions the parameters (they stay the same tensors).
    scaler = ResblockGradScaler(model.gradient_segments(), replicas=dist.world_size(), model=model) if scaling else None
    adamw = SkippableAdamW(_param_groups(model, p.weight_decay), lr=p.lr, betas=p.betas, eps=p.eps)
    ds_config = build_deepspeed_config(micro_batch=p.micro_batch, grad_accum=p.grad_accum,
                                       world_size=dist.world_size(), zero_stage=p.zero_stage, precision="fp32",
                                       grad_clip=p.grad_clip, **comm.deepspeed_keys())
    model = comm.partition(model, ds_config)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=ds_config)
    comm.attach(engine)
    device = engine.device
    precision = resolve_precision(p.precision, device)
    ema = ParameterEMA(engine.module, p.ema_decay, zero_stage=p.zero_stage) if p.ema_decay else None

    step = 0
    resume = hooks.latest_checkpoint()
    if resume:
        engine.load_checkpoint(resume, tag=CHECKPOINT_TAG)
        state = load_state(resume)
        step = state["step"]
        load_ema(ema, resume)
        comm.load_from(resume)
        if scaler is not None and SCALER_KEY in state:
            scaler.load_state_dict(state[SCALER_KEY])
        log.info("resumed from step %d", step)

    rows = hooks.validation_rows()
    seq_tokens = shape.seq_len
    window = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0, "n": 0}
    last: dict = {}
    tick, sequences = time.time(), 0
    started, first_step = time.time(), step
    epoch = step
    micro = 0
    while step < p.steps:
        for batch in hooks.batches(epoch):
            if step >= p.steps:
                break
            ids, mask, image = _to_device(batch, device)
            # Caption dropout drawn from a per-(step, micro-step, rank) seed: a resumed run drops
            # the captions the uninterrupted one would have.
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + (step * p.grad_accum + micro % p.grad_accum) * 1_009
                                              + dist.rank())
            mask = drop_captions(mask, p.caption_dropout, generator=g)
            lr = p.lr * schedules.lr_factor(step, warmup=p.warmup_steps, total=p.steps, min_ratio=p.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(precision, device):
                out = engine(ids, mask, image, text_weight=p.text_weight, image_weight=p.image_weight)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(scaler.scale_loss(out["loss"]) if scaler is not None else out["loss"])
            skip = False
            if scaler is not None and boundary:
                flags = scaler.overflow_flags().to(torch.float32).cpu()
                if dist.world_size() > 1:
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                skip = scaler.update(flags.bool())
                adamw.skip_next = skip
            if boundary:
                comm.reduce(step, skip=skip)
            engine.step()
            micro += 1
            with torch.no_grad():
                window["loss"] += float(out["loss"])
                window["text_loss"] += float(out["text_loss"])
                window["image_loss"] += float(out["image_loss"])
                window["n"] += 1
            sequences += ids.shape[0]
            if not boundary:
                continue
            step += 1
            if ema is not None and not skip:
                ema.update(engine.module)
            if p.grad_comm.verify_every and step % p.grad_comm.verify_every == 0:
                comm.verify(engine)
            save = step % p.checkpoint_every == 0 or step == p.steps
            if step % p.report_every == 0 or save:
                n = max(1, window["n"])
                means = dist.all_reduce_mean([window[k] / n for k in ("loss", "text_loss", "image_loss")])
                elapsed = time.time() - tick
                last = {"step": step, "loss": means[0], "text_loss": means[1], "image_loss": means[2],
                        "image_bits": bits_per_token(means[2]), "lr": lr,
                        "tokens_per_s": sequences * seq_tokens * dist.world_size() / max(elapsed, 1e-9),
                        "grad_norm": _finite_or_none(engine.get_global_grad_norm()),
                        "skipped_updates": (scaler.skipped if scaler is not None else 0)}
                if scaler is not None:
                    last |= scaler.stats()
                last |= comm.metrics()
                if rows is not None and (step % p.eval_every == 0 or step == p.steps):
                    with comm.uncounted():  # evaluation's parameter gathers are not training traffic
                        eval_model = _ema_prior(ema, shape, p.attention_impl, device) if ema else engine.module
                        last |= validation_losses(eval_model, rows, batch=p.micro_batch, device=device,
                                                  precision=precision)
                        write_sample_grid(eval_model, rows, hooks, step=step, cfg=cfg, device=device,
                                          precision=precision)
                if dist.is_main():
                    announce(progress_line(last, p.steps, started, first_step))
                window = dict.fromkeys(window, 0.0) | {"n": 0}
                tick, sequences = time.time(), 0
                if save:
                    state = {"step": step, "shape": shape.to_dict(), "precision": precision,
                             "param_partition": comm.param_partition}
                    if scaler is not None:
                        state[SCALER_KEY] = {k: v.tolist() if torch.is_tensor(v) else v
                                             for k, v in scaler.state_dict().items()}
                    save_checkpoint(engine, hooks, last, state=state, config=cfg.model_dump(mode="json"),
                                    data_manifest=manifest if dist.is_main() else None, ema=ema,
                                    rank_files=comm.checkpoint_files(engine))
                else:
                    hooks.report(last, None)
        epoch += 1
    comm.close()
    return last


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class RayTrainHooks(RayTrainIO):
    """Stage 2's hooks under Ray Train: the token manifest, validation rows and the dVAE decoder."""

    def __init__(self, cfg: TesseraConfig):
        super().__init__(cfg, artifacts_uri=cfg.prior_uri, micro_batch=cfg.prior.micro_batch)
        self._manifest: dict | None = None
        self._decoder = None

    def token_manifest(self) -> dict:
        from tessera.data.encode import load_token_manifest

        if self._manifest is None:
            self._manifest = load_token_manifest(self.cfg.prior_tokens_uri, self.options)
        return self._manifest

    def validation_rows(self) -> dict | None:
        from tessera.data.token_pipeline import read_token_rows

        return read_token_rows(self.cfg.prior_tokens_uri, self.token_manifest(), "val", text_len=self.cfg.loader.text_len,
                               limit=self.cfg.prior.val_samples, options=self.options)

    def image_decoder(self):
        if self._decoder is None:
            self._decoder = self._load_decoder()
        return self._decoder or None

    def _load_decoder(self):
        from tessera.training.export import load_dvae

        uri = self.token_manifest().get("dvae", {}).get("uri")
        if not uri:
            return False
        try:
            dvae = load_dvae(uri, options=self.options)
        except Exception as e:  # noqa: BLE001 — the grid is a convenience; training goes on
            log.warning("no sample grid: cannot load the dVAE at %s (%s)", uri, e)
            return False
        return lambda tokens: dvae.decode(tokens)


def ray_train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    worker_logging()
    train_prior(config["cfg"], RayTrainHooks(config["cfg"]))
