"""Stage 2: the transformer prior (DeepSpeed ZeRO-3 by default), on the shared training loop.

    io.batches() ─{text_ids, text_mask, image_tokens}─▶ caption dropout (seeded by the micro-batch)
      ─▶ autocast(bf16 | fp16 | off) engine(...) ─▶ [per-resblock scaled] backward
      ─▶ at the accumulation boundary: the scaler's overflow vote (a non-finite gradient skips the
         update on every rank), then gradient communication between nodes (prior.grad_comm)
      each evaluation: tessera.training.prior_parts (validation losses, a grid of samples)

Autocast around the forward pass with fp32 weights and optimizer state (DeepSpeed runs in fp32):
bf16 needs no loss scaling; fp16 uses the paper's per-resblock gradient scales (grad_scaler). Its
io also answers token_manifest(), validation_rows() and image_decoder().
"""

from __future__ import annotations

import math

import torch

from tessera.models.prior import Prior, bits_per_token, drop_captions
from tessera.parallel import dist
from tessera.training.prior_parts import (
    autocast,
    batch_to_device,
    prior_shape,
    resolve_precision,
    validation_losses,
    write_sample_grid,
)
from tessera.training.skeleton import Stage, decay_groups

SCALER_KEY = "grad_scaler"


class PriorStage(Stage):
    section = "prior"

    def start(self) -> None:
        from tessera.training.grad_comm import GradComm

        p = self.t
        self.comm = GradComm(p.grad_comm, zero_stage=p.zero_stage, use_gpu=p.use_gpu)  # collective

    def build_model(self) -> Prior:
        self.shape = prior_shape(self.cfg, self.io.token_manifest())
        return Prior(self.shape, attention_impl=self.t.attention_impl,
                     activation_checkpointing=self.t.activation_checkpointing)

    def optimizer(self, model):
        from tessera.training.grad_scaler import ResblockGradScaler, SkippableAdamW

        p = self.t
        scaling = p.resblock_grad_scaling if p.resblock_grad_scaling is not None else p.precision == "fp16"
        # The scaler's hooks go on before DeepSpeed partitions the parameters (the same tensors).
        self.scaler = ResblockGradScaler(model.gradient_segments(), replicas=dist.world_size(),
                                         model=model) if scaling else None
        self.adamw = SkippableAdamW(decay_groups(model, p.weight_decay), lr=p.lr, betas=p.betas, eps=p.eps)
        return self.adamw

    def deepspeed_config(self, **overrides) -> dict:  # fp32 engine: autocast gives the mixed precision
        return super().deepspeed_config(precision="fp32", **self.comm.deepspeed_keys(), **overrides)

    def prepare_model(self, model, ds_config):
        return self.comm.partition(model, ds_config)

    def on_engine(self) -> None:
        self.comm.attach(self.engine)
        self.precision = resolve_precision(self.t.precision, self.device)

    def setup(self) -> None:
        self.rows = self.io.validation_rows()

    def data_manifest(self) -> dict:
        return self.io.token_manifest()

    def restore(self, state: dict, checkpoint_dir: str) -> None:
        self.comm.load_from(checkpoint_dir)
        if self.scaler is not None and SCALER_KEY in state:
            self.scaler.load_state_dict(state[SCALER_KEY])

    def forward_backward(self, batch: dict, *, step: int, seed: int) -> tuple[dict[str, float], int]:
        p = self.t
        ids, mask, image = batch_to_device(batch, self.device)
        mask = drop_captions(mask, p.caption_dropout, generator=torch.Generator().manual_seed(seed))
        with autocast(self.precision, self.device):
            out = self.engine(ids, mask, image, text_weight=p.text_weight, image_weight=p.image_weight)
        self.engine.backward(self.scaler.scale_loss(out["loss"]) if self.scaler is not None else out["loss"])
        with torch.no_grad():
            return {k: float(out[k].detach()) for k in ("loss", "text_loss", "image_loss")}, ids.shape[0]

    def before_step(self, *, step: int, boundary: bool) -> bool:
        skip = False
        if self.scaler is not None and boundary:
            flags = self.scaler.overflow_flags().to(torch.float32).cpu()
            if dist.world_size() > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            skip = self.adamw.skip_next = self.scaler.update(flags.bool())
        if boundary:
            self.comm.reduce(step, skip=skip)
        return skip

    def after_step(self, step: int) -> None:
        if self.t.grad_comm.verify_every and step % self.t.grad_comm.verify_every == 0:
            self.comm.verify(self.engine)

    def step_metrics(self, m: dict) -> dict:
        norm, scaler = self.engine.get_global_grad_norm(), self.scaler
        return {"image_bits": bits_per_token(m["image_loss"]),
                "tokens_per_s": m["samples_per_s"] * self.shape.seq_len,
                "grad_norm": float(norm) if norm is not None and math.isfinite(float(norm)) else None,
                "skipped_updates": scaler.skipped if scaler else 0, **(scaler.stats() if scaler else {}),
                **self.comm.metrics()}

    def evaluate(self, step: int) -> dict:
        if self.rows is None:
            return {}
        # Evaluation's parameter gathers are not training traffic.
        with self.comm.uncounted(), self.eval_model() as model:
            out = validation_losses(model, self.rows, batch=self.t.micro_batch, device=self.device,
                                    precision=self.precision)
            write_sample_grid(model, self.rows, self.io, step=step, cfg=self.cfg, device=self.device,
                              precision=self.precision)
        return out

    def progress(self, m: dict) -> str:
        line = f"text {m['text_loss']:.3f} image {m['image_loss']:.3f} ({m['image_bits']:.2f} bits)"
        return line + (f" skipped {m['skipped_updates']}" if m.get("skipped_updates") else "")

    def progress_eval(self, m: dict) -> str:
        return (f"val image {m['val_image_loss']:.3f} uncond {m['val_image_loss_uncond']:.3f} "
                f"text {m['val_text_loss']:.3f}") if "val_image_loss" in m else ""

    def state(self) -> dict:
        out = {"precision": self.precision, "param_partition": self.comm.param_partition}
        if self.scaler is not None:
            out[SCALER_KEY] = {k: v.tolist() if torch.is_tensor(v) else v
                               for k, v in self.scaler.state_dict().items()}
        return out

    def rank_files(self) -> dict[str, bytes]:
        return self.comm.checkpoint_files(self.engine)

    def close(self) -> None:
        self.comm.close()


def train_prior(cfg, io) -> dict:
    """Train to cfg.prior.steps (resuming from io's latest checkpoint); the last metrics."""
    return PriorStage(cfg, io).run()
