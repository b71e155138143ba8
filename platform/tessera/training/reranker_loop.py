"""The reranker: a contrastive text–image model, on the shared training loop.

    io.batches() ─{image uint8 (B,H,W,3), text_ids, text_mask}─▶ float (B,3,S,S), S = the dVAE's
      image size ─▶ engine(ids, mask, images): symmetric InfoNCE over this rank's micro-batch
      each evaluation: text→image and image→text top-1 retrieval among val_pairs fixed validation
      pairs, per instance and per caption (the export records the last figures)

Negatives are the other pairs of the same rank's micro-batch (no cross-rank gather): the model
stays free of torch.distributed (STYLE 1), and at the debug size 64 negatives are plenty.
Besides the skeleton's io methods it calls io.data_manifest() (its tokenizer's vocab_size sizes
the model) and io.validation_pairs() (image, text_ids, text_mask, the same on every rank, or None).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tessera.models.dvae import NAMED_SHAPES as DVAE_SHAPES
from tessera.models.dvae import to_model_input
from tessera.models.reranker import NAMED_SHAPES, Reranker, RerankerShape, retrieval_accuracy, same_caption
from tessera.training.skeleton import Stage


def reranker_shape(cfg, manifest: dict, section: str = "reranker") -> RerankerShape:
    """The named size, with the caption vocabulary from the dataset's tokenizer, the caption length
    from the loader and the image size from the config section (default: what the dVAE decodes)."""
    r = getattr(cfg, section)
    try:
        vocab = int(manifest["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cfg.paths.data}: the prepared dataset's manifest names no tokenizer.vocab_size; "
                         "re-run jobs/prepare.py") from None
    image_size = r.image_size or DVAE_SHAPES[cfg.dvae.size].image_size
    try:
        return replace(NAMED_SHAPES[r.size], text_vocab=vocab, text_len=cfg.loader.text_len,
                       image_size=image_size)
    except ValueError as e:
        raise ValueError(f"{section}.image_size={image_size} does not fit "
                         f"{section}.size={r.size!r}: {e}") from None


def text_to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(batch["text_ids"]).to(device).long(),
            torch.as_tensor(batch["text_mask"]).to(device).bool())


@torch.no_grad()
def evaluate_retrieval(model: Reranker, pairs: dict, *, batch: int = 256) -> dict:
    """Top-1 retrieval among the validation pairs, both directions, per instance and per caption
    (val_*). Every rank runs it: under ZeRO-3 each forward pass gathers parameters collectively."""
    was_training = model.training
    model.eval()
    ids, mask, images = pairs["text_ids"], pairs["text_mask"], pairs["images"]
    text = torch.cat([model.encode_text(ids[s:s + batch], mask[s:s + batch])
                      for s in range(0, len(ids), batch)])
    image = torch.cat([model.encode_image(images[s:s + batch]) for s in range(0, len(images), batch)])
    model.train(was_training)
    return {f"val_{k}": v for k, v in retrieval_accuracy(text, image, same_caption(ids, mask)).items()}


def retrieval_summary(m: dict) -> str:
    """'val top-1 of 256: text→image 91% (caption 93%), image→text ...; chance 0.4% (caption 0.5%)'."""
    return (f"val top-1 of {m['val_pairs']}: text→image {m['val_t2i_top1']:.1%} "
            f"(caption {m['val_t2i_top1_caption']:.1%}), image→text {m['val_i2t_top1']:.1%} "
            f"(caption {m['val_i2t_top1_caption']:.1%}); chance {m['val_chance']:.1%} "
            f"(caption {m['val_chance_caption']:.1%})")


class RerankerStage(Stage):
    section = "reranker"
    retrieval: dict | None = None

    def build_model(self) -> Reranker:
        self.shape = reranker_shape(self.cfg, self.io.data_manifest(), self.section)
        return Reranker(self.shape)

    def setup(self) -> None:
        pairs = self.io.validation_pairs()
        self.pairs = None
        if pairs is not None:
            ids, mask = text_to_device(pairs, self.device)
            self.pairs = {"text_ids": ids, "text_mask": mask,
                          "images": to_model_input(pairs["image"].to(self.device), self.shape.image_size)}

    def data_manifest(self) -> dict:
        return self.io.data_manifest()

    def forward_backward(self, batch: dict, *, step: int, seed: int) -> tuple[dict[str, float], int]:
        ids, mask = text_to_device(batch, self.device)
        images = to_model_input(batch["image"].to(self.device), self.shape.image_size)  # (B, 3, S, S)
        out = self.engine(ids, mask, images)
        self.engine.backward(out["loss"])
        self.logit_scale = float(out["logit_scale"])
        return {k: float(out[k].detach()) for k in ("loss", "accuracy")}, images.shape[0]

    def step_metrics(self, m: dict) -> dict:
        return {"logit_scale": self.logit_scale}

    def evaluate(self, step: int) -> dict:
        if self.pairs is None:
            return {}
        with self.eval_model() as model:
            self.retrieval = evaluate_retrieval(model, self.pairs) | {"val_step": step}
        return self.retrieval

    def progress(self, m: dict) -> str:
        return f"batch acc {m['accuracy']:.0%} logit scale {m['logit_scale']:.1f}"

    def progress_eval(self, m: dict) -> str:
        return self.summary(m)

    @classmethod
    def summary(cls, m: dict) -> str:
        return retrieval_summary(m) if "val_pairs" in m else ""

    def state(self) -> dict:
        return {"export": {"retrieval": self.retrieval}} if self.retrieval else {}

    def restore(self, state: dict, checkpoint_dir: str) -> None:
        self.retrieval = (state.get("export") or {}).get("retrieval") or state.get("retrieval")


class ScorerStage(RerankerStage):
    """Evaluate's contrastive model for R-precision: the reranker's stage on its own section
    (another seed) and folder, so the model that grades samples is not the one that picked them."""

    section = "scorer"


def train_reranker(cfg, io) -> dict:
    """Train to cfg.reranker.steps (resuming from io's latest checkpoint); the last metrics."""
    return RerankerStage(cfg, io).run()
