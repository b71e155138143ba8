"""What the prior stage is built from besides its hooks: its shape (config + token dataset), its
precision, and its evaluation — validation image loss with and without captions, and a PNG grid
of samples for fixed validation captions.

Every rank runs the evaluation: under ZeRO-3 each forward pass gathers parameters collectively.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from tessera.models.dvae import to_pixels
from tessera.models.prior import NAMED_SHAPES, Prior, PriorShape, bits_per_token
from tessera.parallel import dist
from tessera.viz import GridRow, grid_png

log = logging.getLogger(__name__)


def prior_shape(cfg, manifest: dict) -> PriorShape:
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
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("prior.precision=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): emulated, so "
                    "slower than fp32; set prior.precision=fp32 on this machine")
    return precision


def autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def batch_to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text_ids long (B, T), text_mask bool (B, T), image_tokens long (B, G·G)) on `device`."""
    def t(x):
        return (torch.tensor(x) if isinstance(x, np.ndarray) else x).to(device)

    return t(batch["text_ids"]).long(), t(batch["text_mask"]).bool(), t(batch["image_tokens"]).long()


@torch.no_grad()
def validation_losses(model: Prior, rows: dict, *, batch: int, device, precision: str) -> dict:
    """Image loss on fixed validation rows with their captions and with every caption dropped
    (the same model as an unconditional one); the gap is what the captions tell the model."""
    was_training = model.training
    model.eval()
    ids, mask, image = batch_to_device(rows, device)
    sums = {"val_image_loss": 0.0, "val_image_loss_uncond": 0.0, "val_text_loss": 0.0}
    n = ids.shape[0]
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        with autocast(precision, device):
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
                    references: torch.Tensor | None = None, scale: int = 4) -> bytes:
    """PNG: one row per caption (its text above): the reference image first when given (the
    validation image as its tokens decode), then `per_caption` samples. Images (N, 3, S, S)."""
    samples = to_pixels(images)
    refs = to_pixels(references) if references is not None else None
    rows = [GridRow(images=([refs[r]] if refs is not None else [])
                           + list(samples[r * per_caption:(r + 1) * per_caption]),
                    caption=caption, gap_after={0} if refs is not None else set())
            for r, caption in enumerate(captions)]
    return grid_png(rows, scale=scale)


@torch.no_grad()
def write_sample_grid(model: Prior, rows: dict, io, *, step: int, cfg, device, precision: str) -> None:
    """Samples for the first grid_captions validation captions; every rank samples (ZeRO-3
    collectives), rank 0 decodes them with io.image_decoder() and writes the PNG."""
    from tessera.sampling.sampler import sample_image_tokens

    p = cfg.prior
    k = min(p.grid_captions, len(rows["caption"]))
    if k == 0:
        return
    ids, mask, _ = batch_to_device({key: rows[key][:k] for key in ("text_ids", "text_mask", "image_tokens")},
                                   device)
    ids, mask = ids.repeat_interleave(p.grid_samples, 0), mask.repeat_interleave(p.grid_samples, 0)
    was_training = model.training
    model.eval()
    with autocast(precision, device):
        # Uncached: the KV-cache path calls the blocks' forward_cached, which bypasses the module
        # hooks ZeRO-3 gathers its partitioned parameters with.
        tokens = sample_image_tokens(model, ids, mask, temperature=p.grid_temperature, top_k=p.grid_top_k,
                                     seed=p.seed + step, use_cache=False)
    model.train(was_training)
    decode = io.image_decoder() if dist.is_main() else None
    if decode is not None:
        g = model.shape.grid
        refs = decode(torch.as_tensor(np.array(rows["image_tokens"][:k], dtype=np.int64)).view(k, g, g))
        png = sample_grid_png(decode(tokens.cpu()), [str(c) for c in rows["caption"][:k]],
                              per_caption=p.grid_samples,
                              references=refs)
        io.save_artifact(f"samples/step-{step:07d}.png", png)
