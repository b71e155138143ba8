"""The figures of generated images that any dataset gets (the attribute classifier reads shapes only),
per split, for candidate 0 ("without reranking") and the reranker's pick ("with reranking"):

    R-precision   each image's own caption ranked among `distractors` other distinct captions of its
                  split by the scorer: a contrastive model of the reranker's architecture trained
                  apart from it (jobs/train_scorer.py), so reranking is not graded by the reranker
    FID / KID     Inception features of the generated images against those of the real val images

Neither crashes an evaluation: without a usable scorer or Inception weights the report carries a
status line saying why the figure was not computed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tessera import artifacts, storage
from tessera.inference.evaluation.metrics import extract_features, fidelity, r_precision

log = logging.getLogger("tessera.evaluate")

NO_SCORER = "R-precision not computed: no scorer at {uri} (run train_scorer or set evaluate.scorer_uri)"


@dataclass(frozen=True)
class Scorer:
    model: torch.nn.Module  # tessera.models.reranker.Reranker, eval mode
    tokenizer: object  # tessera.data.tokenizer.CaptionTokenizer: the data's, which it was trained with
    uri: str
    step: int | None


def load_scorer(uri: str, *, data_uri: str, data_manifest: dict, bundle_manifest: dict,
                options: storage.StorageOptions | None = None) -> tuple[Scorer | None, dict]:
    """(the scorer, or None, and the report's entry for it: uri, step, sha256, status line).

    Refused, with the reason as its status: no export at `uri`, an unreadable one, the bundle's own
    reranker (same weights), or one trained with a tokenizer other than the data's."""
    from safetensors import SafetensorError

    from tessera.data.tokenizer import CaptionTokenizer

    entry: dict = {"uri": uri, "step": None, "sha256": None, "is_bundle_reranker": False}

    def refused(status: str) -> tuple[None, dict]:
        log.warning("%s", status)
        return None, entry | {"status": status}

    p, where = artifacts.PARTS["reranker"], storage.join(uri, artifacts.PARTS["reranker"].weights)
    tok = data_manifest.get("tokenizer") or {}
    if "path" not in tok:
        return refused(f"R-precision not computed: {data_uri}'s manifest names no tokenizer (re-run prepare)")
    try:
        if not storage.exists(storage.join(uri, p.meta), options):
            return refused(NO_SCORER.format(uri=uri))
        meta = artifacts.read_meta("reranker", uri, options)
        weights = storage.read_bytes(where, options)
        model = artifacts.build("reranker", meta, weights, where=where)
        tokenizer_json = storage.read_bytes(storage.join(data_uri, tok["path"]), options).decode()
    except (artifacts.ArtifactError, storage.StorageError) as e:
        return refused(f"R-precision not computed: {e}")
    except SafetensorError as e:  # bytes that are not a safetensors file at all
        return refused(f"R-precision not computed: {where}: not a safetensors file ({e})")
    entry |= {"step": meta.get("step"), "sha256": hashlib.sha256(weights).hexdigest()}
    reranker = (bundle_manifest.get("files") or {}).get(p.weights) or {}
    if entry["sha256"] == reranker.get("sha256"):
        entry["is_bundle_reranker"] = True
        return refused(f"R-precision not computed: the scorer at {uri} is the bundle's own reranker, which "
                       "would grade its own picks (train a separate one with train_scorer)")
    trained_with = ((meta.get("data") or {}).get("tokenizer") or {}).get("sha256")
    if trained_with and trained_with != tok.get("sha256"):
        return refused(f"R-precision not computed: the scorer at {uri} was trained with another tokenizer "
                       f"than {data_uri}'s (sha256 differs): its caption ids would mean other words")
    tokenizer = CaptionTokenizer.from_json(tokenizer_json)
    if tokenizer.vocab_size > model.shape.text_vocab:
        return refused(f"R-precision not computed: {data_uri}'s tokenizer ({tokenizer.vocab_size} tokens) "
                       f"exceeds the scorer's text_vocab {model.shape.text_vocab} ({uri})")
    status = (f"scorer {uri} (step {entry['step']}): a contrastive model trained apart from the bundle's "
              "reranker")
    return Scorer(model, tokenizer, uri, entry["step"]), entry | {"status": status}


def _chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> uint8 (N, 3, S, S)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _per_mode(images: np.ndarray, picks: np.ndarray, embed) -> dict[str, torch.Tensor]:
    """embed() of candidate 0 and of the picks, each image embedded once (the pick is often c0)."""
    first = embed(images[:, 0])
    moved = np.flatnonzero(picks != 0)
    picked = first.clone()
    if len(moved):
        picked[torch.from_numpy(moved)] = embed(images[moved, picks[moved]])
    return {"without_reranking": first, "with_reranking": picked}


@torch.no_grad()
def r_precision_figures(scorer: Scorer, captions: list[str], images: np.ndarray, picks: np.ndarray, *,
                        distractors: int, seed: int, batch: int = 256) -> dict:
    """R-precision of one split's images (N, M, S, S, 3) uint8 for their captions (N), without and
    with reranking (the same distractors for both), its chance level and distractor count."""
    if len(set(captions)) < 2:
        return {"status": "not computed: fewer than 2 distinct captions", "images": len(captions)}
    m = scorer.model
    ids, mask = scorer.tokenizer.encode(captions, text_len=m.shape.text_len)
    ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
    text = torch.cat([m.encode_text(ids[s:s + batch], mask[s:s + batch]) for s in range(0, len(ids), batch)])

    def embed(x: np.ndarray) -> torch.Tensor:
        return torch.cat([m.encode_image(_chw(x[s:s + batch]).float() / 255)
                          for s in range(0, len(x), batch)])

    out: dict = {}
    for mode, emb in _per_mode(images, picks, embed).items():
        r = r_precision(emb, text, captions, distractors=distractors, seed=seed)
        out[mode] = round(r.value, 4)
    return out | {"distractors": r.distractors, "chance": round(r.chance, 4), "images": r.images}


def real_features(extractor, real: list[np.ndarray]) -> torch.Tensor | str:
    """Features (N, D) of the real images, uint8 (H, W, 3) each, or the reason there are none."""
    if len(real) < 2:
        return f"FID not computed: {len(real)} real val image(s); it needs at least 2"
    try:
        return extract_features(extractor, _chw(np.stack(real)))
    except Exception as e:  # noqa: BLE001  (any module can be configured; the report says why it failed)
        return f"FID not computed: {extractor.source}: feature extraction failed ({type(e).__name__}: {e})"


def fidelity_figures(extractor, real: torch.Tensor, images: np.ndarray, picks: np.ndarray, *,
                     seed: int = 0) -> dict:
    """FID and KID of one split's images without and with reranking against real features (N, D)."""
    if len(images) < 2:
        return {"status": f"not computed: {len(images)} generated image(s); it needs at least 2"}
    try:
        feats = _per_mode(images, picks, lambda x: extract_features(extractor, _chw(x)))
    except Exception as e:  # noqa: BLE001
        return {"status": f"not computed: feature extraction failed ({type(e).__name__}: {e})"}
    return {mode: {k: round(v, 6) if isinstance(v, float) else v
                   for k, v in fidelity(real, f, seed=seed).items()} for mode, f in feats.items()}
