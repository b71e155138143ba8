"""Reranker worker loop: the contrastive text–image model trained with DeepSpeed, in a Ray Train
worker or in one process.

    hooks.batches() ─{image uint8 (B,H,W,3), text_ids, text_mask}─▶ float (B,3,S,S), S = the dVAE's
      image size ─▶ engine(ids, mask, images): symmetric InfoNCE over this rank's micro-batch ─▶ step
      every report_every: metrics (mean over ranks) ─▶ hooks.report
      every eval_every / at the end: text→image and image→text top-1 retrieval among val_pairs
      fixed validation pairs, per instance and per caption
      every checkpoint_every / at the end: checkpoint (DeepSpeed state + the last retrieval figures)

Negatives are the other pairs of the same rank's micro-batch (no cross-rank gather): the model
stays free of torch.distributed (STYLE 1), and at the debug size 64 negatives are plenty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import numpy as np
import torch

from tessera.config import TesseraConfig
from tessera.models.dvae import NAMED_SHAPES as DVAE_SHAPES
from tessera.models.reranker import NAMED_SHAPES, Reranker, RerankerShape, retrieval_accuracy, same_caption
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
from tessera.training.dvae_loop import to_model_input
from tessera.training.ema import ParameterEMA

log = logging.getLogger("tessera.train_reranker")


class Hooks(Protocol):
    def batches(self, epoch: int) -> Iterator[dict]: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def data_manifest(self) -> dict:
        """The prepared dataset's manifest (its tokenizer's vocab_size sizes the model); every rank."""
        ...

    def validation_pairs(self) -> dict | None:
        """Fixed validation pairs, the same on every rank: image uint8 (N, H, W, 3), text_ids (N, T),
        text_mask (N, T); or None."""
        ...


def reranker_shape(cfg: TesseraConfig, manifest: dict) -> RerankerShape:
    """The named size, with the caption vocabulary from the dataset's tokenizer, the caption length
    from the loader and the image size from the config (default: what the dVAE decodes)."""
    r = cfg.reranker
    try:
        vocab = int(manifest["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cfg.data_uri}: the prepared dataset's manifest names no tokenizer.vocab_size; "
                         "re-run jobs/prepare.py") from None
    image_size = r.image_size or DVAE_SHAPES[cfg.dvae.size].image_size
    try:
        return replace(NAMED_SHAPES[r.size], text_vocab=vocab, text_len=cfg.loader.text_len, image_size=image_size)
    except ValueError as e:
        raise ValueError(f"reranker.image_size={image_size} does not fit reranker.size={r.size!r}: {e}") from None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not biases, norm gains or the logit scale."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _text(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch["text_ids"], batch["text_mask"]
    ids = torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids
    mask = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
    return ids.to(device).long(), mask.to(device).bool()


@torch.no_grad()
def evaluate(model: Reranker, pairs: dict, *, batch: int = 256) -> dict:
    """Top-1 retrieval among the validation pairs, both directions, per instance and per caption
    (val_*). Every rank runs it: under ZeRO-3 each forward pass gathers parameters collectively."""
    was_training = model.training
    model.eval()
    ids, mask, images = pairs["text_ids"], pairs["text_mask"], pairs["images"]
    text = torch.cat([model.encode_text(ids[s:s + batch], mask[s:s + batch]) for s in range(0, len(ids), batch)])
    image = torch.cat([model.encode_image(images[s:s + batch]) for s in range(0, len(images), batch)])
    model.train(was_training)
    return {f"val_{k}": v for k, v in retrieval_accuracy(text, image, same_caption(ids, mask)).items()}


def progress_line(m: dict, total: int, started: float, first_step: int = 0) -> str:
    eta = eta_minutes(m["step"], total, started, first_step)
    line = (f"step {m['step']}/{total} loss {m['loss']:.4f} batch acc {m['accuracy']:.0%} "
            f"logit scale {m['logit_scale']:.1f} {m['samples_per_s']:.0f} samples/s eta {eta:.1f} min")
    if "val_pairs" in m:
        line += " | " + retrieval_summary(m)
    return line


def retrieval_summary(m: dict) -> str:
    """'val top-1 of 256: text→image 91% (caption 93%), image→text ...; chance 0.4% (caption 0.5%)'."""
    return (f"val top-1 of {m['val_pairs']}: text→image {m['val_t2i_top1']:.1%} (caption {m['val_t2i_top1_caption']:.1%}), "
            f"image→text {m['val_i2t_top1']:.1%} (caption {m['val_i2t_top1_caption']:.1%}); "
            f"chance {m['val_chance']:.1%} (caption {m['val_chance_caption']:.1%})")


def _ema_model(ema: ParameterEMA, shape: RerankerShape, device) -> Reranker:
    model = Reranker(shape).to(device)
    model.load_state_dict(ema.shadow)
    return model


def train_reranker(cfg: TesseraConfig, hooks: Hooks) -> dict:
    """Train to cfg.reranker.steps (resuming from the latest checkpoint); returns the last metrics."""
    r = cfg.reranker
    join_process_group(r.use_gpu)
    import deepspeed

    manifest = hooks.data_manifest()
    shape = reranker_shape(cfg, manifest)
    torch.manual_seed(r.seed)
    model = Reranker(shape)
    optimizer = torch.optim.AdamW(_param_groups(model, r.weight_decay), lr=r.lr, betas=r.betas, eps=r.eps)
    ds_config = build_deepspeed_config(micro_batch=r.micro_batch, grad_accum=r.grad_accum, world_size=dist.world_size(),
                                       zero_stage=r.zero_stage, precision=r.precision, grad_clip=r.grad_clip)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device = engine.device
    ema = ParameterEMA(engine.module, r.ema_decay, zero_stage=r.zero_stage) if r.ema_decay else None

    step, retrieval = 0, None
    resume = hooks.latest_checkpoint()
    if resume:
        engine.load_checkpoint(resume, tag=CHECKPOINT_TAG)
        state = load_state(resume)
        step, retrieval = state["step"], state.get("retrieval")
        load_ema(ema, resume)
        log.info("resumed from step %d", step)

    pairs = hooks.validation_pairs()
    if pairs is not None:
        ids, mask = _text(pairs, device)
        pairs = {"text_ids": ids, "text_mask": mask, "images": to_model_input(pairs["image"].to(device), shape.image_size)}
    window = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    last: dict = {}
    tick, samples = time.time(), 0
    started, first_step = time.time(), step
    epoch = step  # a fresh file order after a resume, not a replay of epoch 0
    micro = 0
    while step < r.steps:
        for batch in hooks.batches(epoch):
            if step >= r.steps:
                break
            ids, mask = _text(batch, device)
            images = to_model_input(batch["image"].to(device), shape.image_size)  # (B, 3, S, S)
            lr = r.lr * schedules.lr_factor(step, warmup=r.warmup_steps, total=r.steps, min_ratio=r.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = engine(ids, mask, images)
            engine.backward(out["loss"])
            engine.step()
            micro += 1
            with torch.no_grad():
                window["loss"] += float(out["loss"])
                window["accuracy"] += float(out["accuracy"])
                window["n"] += 1
            samples += images.shape[0]
            if micro % r.grad_accum:
                continue
            step += 1
            if ema is not None:
                ema.update(engine.module)
            save = step % r.checkpoint_every == 0 or step == r.steps
            if step % r.report_every == 0 or save:
                n = max(1, window["n"])
                loss, accuracy = dist.all_reduce_mean([window["loss"] / n, window["accuracy"] / n])
                elapsed = time.time() - tick
                last = {"step": step, "loss": loss, "accuracy": accuracy, "logit_scale": float(out["logit_scale"]),
                        "lr": lr, "samples_per_s": samples * dist.world_size() / max(elapsed, 1e-9)}
                if pairs is not None and (step % r.eval_every == 0 or step == r.steps):
                    retrieval = evaluate(_ema_model(ema, shape, device) if ema else engine.module, pairs)
                    retrieval["val_step"] = step
                    last |= retrieval
                if dist.is_main():
                    announce(progress_line(last, r.steps, started, first_step))
                window = dict.fromkeys(window, 0.0) | {"n": 0}
                tick, samples = time.time(), 0
                if save:
                    state = {"step": step, "shape": shape.to_dict(), "retrieval": retrieval}
                    save_checkpoint(engine, hooks, last, state=state, config=cfg.model_dump(mode="json"),
                                    data_manifest=manifest if dist.is_main() else None, ema=ema)
                else:
                    hooks.report(last, None)
        epoch += 1
    return last


class RayTrainHooks(RayTrainIO):
    """The reranker's hooks under Ray Train: the prepared dataset's manifest and validation pairs."""

    def __init__(self, cfg: TesseraConfig):
        super().__init__(cfg, artifacts_uri=cfg.reranker_uri, micro_batch=cfg.reranker.micro_batch)
        self._manifest: dict | None = None

    def data_manifest(self) -> dict:
        from tessera.data.pipeline import load_manifest

        if self._manifest is None:
            self._manifest = load_manifest(self.cfg.data_uri, self.options)
        return self._manifest

    def validation_pairs(self) -> dict | None:
        pairs = load_validation_pairs(self.cfg, self.data_manifest(), limit=self.cfg.reranker.val_pairs)
        if pairs is None:
            log.warning("%s has no validation split: no retrieval accuracy will be reported", self.cfg.data_uri)
        return pairs


def load_validation_pairs(cfg: TesseraConfig, manifest: dict, *, limit: int) -> dict | None:
    """The first `limit` image–caption pairs of the prepared validation split, read directly (no
    Ray): every rank reads the same ones. None when the split is missing or holds fewer than 2."""
    from tessera import storage
    from tessera.data.pipeline import decode_shards, shard_uris

    opts = storage.StorageOptions.from_config(cfg.storage)
    if manifest["splits"].get("val", {}).get("num_samples", 0) < 2:
        return None
    tok = storage.read_bytes(storage.join(cfg.data_uri, manifest["tokenizer"]["path"]), opts).decode()
    parts: dict[str, list] = {"image": [], "text_ids": [], "text_mask": []}
    for uri in shard_uris(cfg.data_uri, manifest, "val"):
        out = decode_shards({"bytes": [storage.read_bytes(uri, opts)]}, tokenizer_json=tok, text_len=cfg.loader.text_len,
                            image_ext=manifest["image_format"], resolution=manifest["resolution"])
        for k in parts:
            parts[k].append(torch.from_numpy(out[k]))
        if sum(len(i) for i in parts["image"]) >= limit:
            break
    return {k: torch.cat(v)[:limit] for k, v in parts.items()}


def ray_train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    worker_logging()
    cfg: TesseraConfig = config["cfg"]
    train_reranker(cfg, RayTrainHooks(cfg))
