"""The evaluate job's work: what a bundle draws for the prepared val and held-out captions, and
how well it draws what they say.

    prepared val and held-out splits: first N each, caption + image
    (+ ground-truth attributes for shapes)
    ─▶ M candidates per caption on Ray Data (tessera.inference.batch_generate), ranked by the reranker
    ─▶ any data: R-precision under the scorer ({run}/scorer/export, trained apart from the reranker)
       and FID/KID against the real val images (with evaluate.inception_weights_uri), each without
       and with reranking (any_data.py); dVAE reconstruction PSNR, SSIM and codebook use; prior
       image loss (nats and bits per image token, with and without captions) on val and held-out
       images encoded by the bundle's own dVAE; sample grids; training curves
    ─▶ shapes data only (the classifier knows nothing else): the attribute classifier (reused from
       {run}/eval/classifier when its spec matches, else trained) reads every candidate: caption /
       attribute accuracy without reranking (candidate 0) and with it (the reranker's best), per
       split and object count; and the reconstructions (its ceiling)
    ─▶ grids + curves PNGs, report.md, report.json (last: its presence marks a finished evaluation);
       the figures also go into the run's own bundle's model card (README.md)
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera import model_card, published, storage
from tessera.data import shapes
from tessera.inference.evaluation import any_data
from tessera.inference.evaluation import report as draw
from tessera.inference.evaluation.classifier import ensure_classifier
from tessera.inference.evaluation.scenes import (
    canonical_scene,
    caption_correct,
    pair_accuracy,
    parse_caption,
    score_labels,
)
from tessera.paths import HISTORY, REPORT, STAGES
from tessera.sampling.seeds import caption_seed

log = logging.getLogger("tessera.evaluate")

KIND = "tessera.evaluation"
# Why a prepared sample is not evaluated.
SKIP_REASONS = {
    "missing_field": "the sample lacks its image or caption",
    "bad_attributes": "its JSON holds no readable shapes attributes",
    "caption_mismatch": "its caption does not say what its attributes do",
    "undecodable_image": "the image bytes do not decode",
}


@dataclass
class Split:
    name: str
    captions: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)  # (NUM_LABELS,) each
    images: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3) each
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


def read_split(data_uri: str, manifest: dict, split: str, limit: int, options=None, *,
               attributes: bool = True) -> Split:
    """The first `limit` usable samples of a prepared split, in shard order, bad ones skipped and
    counted. With `attributes` (shapes data) the ground truth comes from each sample's JSON
    attributes, checked against its caption; without, `labels` stays empty."""
    from PIL import Image

    from tessera.data.loader import shard_uris
    from tessera.data.tar import TarReadResult, iter_tar_samples

    out = Split(split)
    if limit <= 0:
        return out
    ext = manifest["image_format"]
    for uri in shard_uris(data_uri, manifest, split):
        for s in iter_tar_samples(io.BytesIO(storage.read_bytes(uri, options)), TarReadResult()):
            if ext not in s.files or "txt" not in s.files:
                out.skipped["missing_field"] += 1
                continue
            caption = s.files["txt"].decode("utf-8", errors="replace").strip()
            scene = None
            if attributes:
                try:
                    scene = canonical_scene(json.loads(s.files["json"])["attributes"])
                except (KeyError, TypeError, ValueError):
                    out.skipped["bad_attributes"] += 1
                    continue
                try:
                    if parse_caption(caption) != scene:
                        raise ValueError
                except ValueError:
                    out.skipped["caption_mismatch"] += 1
                    continue
            try:
                with Image.open(io.BytesIO(s.files[ext])) as im:
                    image = np.asarray(im.convert("RGB"))
            except Exception:  # PIL raises many types for damaged bytes
                out.skipped["undecodable_image"] += 1
                continue
            out.captions.append(caption)
            if scene is not None:
                out.labels.append(scene.labels())
            out.images.append(image)
            if len(out.captions) >= limit:
                return out
    return out


@torch.no_grad()
def dvae_figures(dvae, images: list[np.ndarray], labels: list[np.ndarray],
                 classifier=None) -> tuple[dict, torch.Tensor]:
    """PSNR of decode(encode(x)), codebook use, and the classifier (if any) on the
    reconstructions; also the tokens (B, G, G) for the prior's loss."""
    from tessera.inference.evaluation.metrics import ssim
    from tessera.models.dvae import codebook_usage, psnr, to_model_input, to_pixels

    x = to_model_input(np.stack(images), dvae.shape.image_size)  # (B, 3, S, S)
    tokens = torch.cat([dvae.encode(x[s:s + 256]) for s in range(0, len(x), 256)])
    recon = torch.cat([dvae.decode(tokens[s:s + 256]) for s in range(0, len(x), 256)])
    perplexity, used = codebook_usage(tokens, dvae.shape.num_tokens)
    figures = {"images": len(x), "psnr_db": round(float(psnr(recon, x)), 3),
               # SSIM's 11-pixel window needs images at least that large
               "ssim": round(float(ssim(recon, x).mean()), 4) if min(x.shape[-2:]) >= 11 else None,
               "codebook_size": dvae.shape.num_tokens,
               "codebook_usage": round(used, 4), "perplexity": round(perplexity, 2)}
    if classifier is not None:
        figures["classifier_on_reconstructions"] = score_labels(classifier.predict(to_pixels(recon)),
                                                                np.stack(labels))
    return figures, tokens


@torch.no_grad()
def image_tokens(dvae, images: list[np.ndarray], *, batch: int = 256) -> torch.Tensor:
    """The dVAE's tokens (B, G, G) of uint8 images (H, W, 3)."""
    from tessera.models.dvae import to_model_input

    x = to_model_input(np.stack(images), dvae.shape.image_size)  # (B, 3, S, S)
    return torch.cat([dvae.encode(x[s:s + batch]) for s in range(0, len(x), batch)])


@torch.no_grad()
def prior_figures(bundle, captions: list[str], tokens: torch.Tensor, *, batch: int = 64,
                  split: str = "val") -> dict:
    """Image loss per token of the bundle's prior on a split's images as its own dVAE encodes them,
    with their captions and with the captions dropped (the all-padding caption that caption dropout
    trains and guidance samples with): nats, and bits (nats / ln 2) per image token."""
    prior = bundle.prior
    ids, mask = bundle.tokenizer.encode(captions, text_len=prior.shape.text_len)
    ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
    image = tokens.flatten(1)
    cond, uncond = f"{split}_image_loss", f"{split}_image_loss_uncond"
    sums = {cond: 0.0, uncond: 0.0}
    for s in range(0, len(ids), batch):
        sl, k = slice(s, s + batch), len(ids[s:s + batch])
        sums[cond] += float(prior(ids[sl], mask[sl], image[sl])["image_loss"]) * k
        sums[uncond] += float(prior(ids[sl], torch.zeros_like(mask[sl]), image[sl])["image_loss"]) * k
    return {"rows": len(ids), "source": f"{split} images encoded by the bundle's dVAE",
            **{k: round(v / len(ids), 4) for k, v in sums.items()},
            **{k.replace("_loss", "_bits_per_token"): round(v / len(ids) / math.log(2), 4)
               for k, v in sums.items()}}


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def collect_generations(split: Split, rows: list[dict], candidates: int) -> dict:
    """One split's generated rows (one per candidate) as per-caption arrays: images
    (N, M, S, S, 3) uint8, ranks and reranker scores (N, M); `correct` is left to a scorer."""
    n, m = len(split.captions), candidates
    images = np.zeros((n, m, *_decode_png(rows[0]["png"]).shape), np.uint8) if rows else None
    ranks = np.tile(np.arange(m), (n, 1))
    scores = np.full((n, m), np.nan)
    for r in rows:
        i, j = r["index"], r["candidate"]
        images[i, j], ranks[i, j] = _decode_png(r["png"]), r["rank"]
        scores[i, j] = np.nan if r["score"] is None else r["score"]
    return {"images": images, "ranks": ranks, "scores": scores, "correct": None}


def score_generations(split: Split, arrays: dict, classifier, held_out: set) -> dict:
    """The attribute classifier's figures for one split's candidates (shapes data); also sets
    arrays["correct"] (N, M): whether it reads the caption in each."""
    images = arrays["images"]
    n, m = images.shape[:2]
    ranks = arrays["ranks"]
    target = np.stack(split.labels)  # (N, NUM_LABELS)
    predicted = classifier.predict(images.reshape(n * m, *images.shape[2:])).reshape(n, m, -1)
    correct = caption_correct(predicted.reshape(n * m, -1), np.repeat(target, m, axis=0)).reshape(n, m)
    best = ranks.argmin(axis=1)  # (N,) the reranker's pick
    first, picked = predicted[:, 0], predicted[np.arange(n), best]
    figures = {"captions": n, "without_reranking": score_labels(first, target),
               "with_reranking": score_labels(picked, target),
               "any_candidate": float(correct.any(axis=1).mean()), "mean_candidate": float(correct.mean())}
    if held_out and split.name == "heldout":
        novel = pair_accuracy(first, target, held_out)
        novel["colour_and_shape_reranked"] = pair_accuracy(picked, target, held_out)["colour_and_shape"]
        figures["novel_pairs"] = novel
    arrays["correct"] = correct
    return figures


def grid_rows(split: Split, arrays: dict, k: int) -> list[dict]:
    out = []
    for i in range(min(k, len(split.captions))):
        order = np.argsort(arrays["ranks"][i], kind="stable")
        out.append({"caption": split.captions[i], "images": [arrays["images"][i, j] for j in order],
                    "candidates": [int(j) for j in order],
                    "correct": None if arrays["correct"] is None
                    else [bool(arrays["correct"][i, j]) for j in order],
                    "scores": [None if np.isnan(arrays["scores"][i, j]) else float(arrays["scores"][i, j])
                               for j in order]})
    return out


def run_evaluate(cfg, bundle: str | None = None) -> dict:
    """Evaluate the bundle at `bundle` (default: evaluate.bundle_uri, else the run's bundle) on
    the current Ray cluster; returns report.json's contents."""
    from tessera.bundle import load_bundle
    from tessera.data.loader import load_manifest
    from tessera.inference import batch_generate
    from tessera.inference.evaluation.metrics import load_inception

    started = time.time()
    e, opts = cfg.evaluate, storage.StorageOptions.from_config(cfg.storage)
    uri, out_uri = bundle or cfg.paths.eval_bundle, cfg.paths.eval
    b = load_bundle(uri, options=opts)
    data = load_manifest(cfg.paths.data, opts)
    # The attribute classifier only reads shapes scenes; other data gets every other figure.
    is_shapes = data["source"]["kind"] == "shapes"
    held_out = {tuple(p.split()) for p in (data.get("shapes") or {}).get("held_out", [])}
    storage.require_writable(out_uri, opts)
    if storage.exists(storage.join(out_uri, REPORT), opts):  # a rerun is unfinished until its report is back
        fs, path = storage.resolve(storage.join(out_uri, REPORT), opts)
        fs.delete_file(path)
    if e.classifier.threads:
        torch.set_num_threads(e.classifier.threads)

    splits = {"val": read_split(cfg.paths.data, data, "val",
                                max(e.num_captions, e.recon_images, e.prior_val_rows), opts,
                                attributes=is_shapes),
              "heldout": read_split(cfg.paths.data, data, "heldout", max(e.num_heldout, e.prior_val_rows),
                                    opts, attributes=is_shapes)
              if "heldout" in data["splits"] else Split("heldout")}
    log.info("read %d val and %d held-out samples from %s", len(splits["val"].captions),
             len(splits["heldout"].captions),
             cfg.paths.data)

    classifier, cmeta, trained = _shapes_classifier(cfg, b, data, opts) if is_shapes else (None, None, False)

    val = splits["val"]
    recon = val.images[: e.recon_images]
    dvae, tokens = dvae_figures(b.dvae, recon, val.labels[: len(recon)], classifier) if recon else ({}, None)
    k = min(e.prior_val_rows, len(recon))
    prior = prior_figures(b, val.captions[:k], tokens[:k]) if k else {}
    held = splits["heldout"]
    k = min(e.prior_val_rows, len(held.images))
    if k:
        h = prior_figures(b, held.captions[:k], image_tokens(b.dvae, held.images[:k]), split="heldout")
        prior |= {"heldout_rows": h["rows"]} | {key: v for key, v in h.items() if key.startswith("heldout_")}
    history = _history_value(cfg, opts, "prior", "val_image_loss")
    if history is not None:
        prior["history_val_image_loss"] = history
    # The scorer (R-precision) and Inception features (FID/KID); neither stops the evaluation.
    scorer, scorer_entry = any_data.load_scorer(cfg.paths.eval_scorer, data_uri=cfg.paths.data,
                                                data_manifest=data, bundle_manifest=b.manifest, options=opts)
    extractor, fid_status = load_inception(e.inception_weights_uri, options=opts)
    real = any_data.real_features(extractor, val.images) if extractor is not None else fid_status
    if isinstance(real, str):
        extractor, fid_status = None, real

    # Generation: every candidate of every caption, ranked, as rows with PNG bytes.
    sampling, a = batch_generate.Sampling.of(e.sampling, keep=e.candidates), e.actors
    todo = {"val": e.num_captions, "heldout": e.num_heldout}
    items = [{"caption": c, "index": i, "seed": caption_seed(sampling.seed, i, stream), "split": name}
             for stream, name in enumerate(("val", "heldout"))
             for i, c in enumerate(splits[name].captions[: todo[name]])]
    for name in todo:
        splits[name] = Split(name, splits[name].captions[: todo[name]], splits[name].labels[: todo[name]],
                             splits[name].images[: todo[name]], splits[name].skipped)
    use_gpu = a.use_gpu if a.use_gpu is not None else _cluster_has_gpus()
    t0 = time.time()
    log.info("generating %d images for %d captions on %d actor(s)", len(items) * e.candidates, len(items),
             a.num_actors)
    rows = batch_generate.generate_images(items, bundle_uri=uri, sampling=sampling, options=opts,
                                          batch_size=a.batch_size,
                                    num_actors=a.num_actors, cpus_per_actor=a.cpus_per_actor, use_gpu=use_gpu)
    gen_seconds = time.time() - t0
    by_split: dict[str, list[dict]] = {"val": [], "heldout": []}
    for r in rows:
        by_split[str(r["split"])].append(r)

    report: dict = {**published.header(KIND),
                    "bundle": {"uri": uri, "name": b.name, "resolution": b.resolution,
                               "has_reranker": b.reranker is not None,
                               "steps": {p: m.get("step") for p, m in b.manifest["parts"].items()}},
                    "data": {"uri": cfg.paths.data, "generation": data["generation"],
                             "source": data["source"]["kind"],
                             "held_out": sorted(" ".join(p) for p in held_out)},
                    "settings": _settings(e), "splits": {}, "notes": [], "scorer": scorer_entry,
                    "fidelity": {"status": fid_status, "real_images": len(val.images) if extractor else 0,
                                 "real_split": "val"}}
    if b.reranker is None and e.candidates > 1:
        report["notes"].append("The bundle has no reranker: 'with reranking' keeps candidate 0 as well.")
    if classifier is None:
        report["notes"].append(f"The data's source is {data['source']['kind']!r}, not shapes: no caption "
                               "accuracy (the attribute classifier reads only shapes scenes).")
    files: dict[str, list[str]] = {"grids": [], "curves": []}
    for stream, (name, split) in enumerate(splits.items()):
        if not split.captions:
            continue
        arrays = collect_generations(split, by_split[name], e.candidates)
        figures = {"captions": len(split.captions)}
        if classifier is not None:
            figures = score_generations(split, arrays, classifier, held_out)
        picks = arrays["ranks"].argmin(axis=1)  # (N,) the reranker's pick
        if scorer is not None:
            figures["r_precision"] = any_data.r_precision_figures(
                scorer, split.captions, arrays["images"], picks, distractors=e.r_precision_distractors,
                seed=sampling.seed + stream)
        if extractor is not None:
            figures["fidelity"] = any_data.fidelity_figures(extractor, real, arrays["images"], picks)
        figures["skipped"] = split.skipped
        report["splits"][name] = figures
        if e.grid_captions:
            png = draw.sample_grid_png(grid_rows(split, arrays, e.grid_captions),
                                       title=f"{b.name}: {name} captions")
            storage.write_bytes(storage.join(out_uri, f"grid_{name}.png"), png, opts)
            files["grids"].append(f"grid_{name}.png")

    report["curves"] = {}
    for stage in STAGES:
        stage_uri = cfg.paths.stage(stage)
        rows_ = _history_rows(stage_uri, opts)
        png = draw.curves_png(stage, rows_) if rows_ else None
        if png is None:
            report["curves"][stage] = {"missing": True, "uri": storage.join(stage_uri, HISTORY)}
            continue
        storage.write_bytes(storage.join(out_uri, f"curves_{stage}.png"), png, opts)
        files["curves"].append(f"curves_{stage}.png")
        report["curves"][stage] = {"reports": len(rows_), "last": rows_[-1]}

    report["classifier"] = None if classifier is None else {
        "uri": cfg.paths.classifier, "trained_now": trained, "spec": cmeta["spec"],
        "train_seconds": cmeta.get("train_seconds"),
        "real": cmeta["accuracy"]["real"]["caption_accuracy"],
        "real_2x": cmeta["accuracy"]["real_2x"]["caption_accuracy"],
        "val_real": score_labels(classifier.predict(np.stack(val.images)),
                                 np.stack(val.labels))["caption_accuracy"] if val.images else None,
        "val_reconstruction": (dvae.get("classifier_on_reconstructions") or {}).get("caption_accuracy"),
        "renders": cmeta["accuracy"]}
    report["dvae"], report["prior"] = dvae, prior
    n_images = len(rows)
    report["generation"] = {"images": n_images, "seconds": round(gen_seconds, 1),
                            "images_per_s": round(n_images / gen_seconds, 2) if gen_seconds > 0 else None}
    report["files"] = files
    report["wall_time_s"] = round(time.time() - started, 1)
    storage.write_text(storage.join(out_uri, "report.md"), draw.markdown(report), opts)
    storage.write_json(storage.join(out_uri, REPORT), report, opts)
    if storage.absolute(uri).rstrip("/") == storage.absolute(cfg.paths.bundle).rstrip("/"):
        # Only the run's own bundle: one evaluated from elsewhere may not be ours to write to.
        model_card.add_evaluation(uri, report, storage.join(out_uri, REPORT), options=opts)
    return report


def _shapes_classifier(cfg, b, data: dict, opts):
    """(classifier, its metadata, trained now?) for the shapes captions, sized like the data."""
    t0, c = time.time(), cfg.evaluate.classifier
    dvae_digest = b.manifest["files"].get("dvae.safetensors", {}).get("sha256", "")
    # Scenes like the prepared data's: its shapes config says how many objects an image holds.
    max_objects = int(((data.get("config") or {}).get("data") or {}).get("source", {}).get("shapes", {})
                      .get("max_objects") or shapes.MAX_OBJECTS)
    c = c.model_copy(update={"image_size": c.image_size or b.resolution,
                             "max_objects": c.max_objects or max_objects})
    classifier, cmeta, trained = ensure_classifier(c, cfg.paths.classifier, options=opts, retrain=c.retrain,
                                                   dvae=b.dvae, dvae_sha256=dvae_digest)
    log.info("classifier %s (%.0f s): caption accuracy %.2f%% on fresh renders",
             "trained" if trained else "reused",
             time.time() - t0, 100 * cmeta["accuracy"]["real"]["caption_accuracy"])
    return classifier, cmeta, trained


def _settings(e) -> dict:
    """The evaluate section as the report records it: one flat mapping (sampling and actors inlined)."""
    flat = e.model_dump(mode="json", exclude={"classifier", "sampling", "actors"})
    return (flat | e.sampling.model_dump(mode="json") | e.actors.model_dump(mode="json")
            | {"candidates": e.candidates})


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _history_rows(stage_uri: str, opts) -> list[dict]:
    uri = storage.join(stage_uri, HISTORY)
    try:
        rows = storage.read_json(uri, opts).get("rows") if storage.exists(uri, opts) else None
    except (storage.StorageError, AttributeError):
        log.warning("%s: unreadable; its curves are left out", uri)
        return []
    return [r for r in rows or [] if isinstance(r, dict)]


def _history_value(cfg, opts, stage: str, key: str) -> float | None:
    """The last value of `key` a stage's history.json recorded."""
    for row in reversed(_history_rows(cfg.paths.stage(stage), opts)):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def summarize(report: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = [f"evaluation of {report['bundle']['name']} ({report['bundle']['uri']}) "
             f"in {report['wall_time_s']:.0f} s"]
    for name, s in report["splits"].items():
        r = s.get("r_precision") or {}
        if "without_reranking" in r:
            lines.append(f"  {name:8s} R-precision {pct(r['without_reranking'])} without reranking, "
                         f"{pct(r['with_reranking'])} with (chance {pct(r['chance'])}, "
                         f"{r['distractors']} distractors)")
        f = s.get("fidelity") or {}
        if "without_reranking" in f:
            wo, w = f["without_reranking"], f["with_reranking"]
            lines.append(f"  {name:8s} FID {wo['fid']:.2f} without reranking, {w['fid']:.2f} with; "
                         f"KID {wo['kid_mean']:.4f}, {w['kid_mean']:.4f}")
        if "with_reranking" not in s:  # not shapes data: no classifier read the images back
            lines.append(f"  {name:8s} {s['captions']:4d} captions drawn (sample grids; no caption accuracy)")
            continue
        wo, w = s["without_reranking"], s["with_reranking"]
        lines.append(f"  {name:8s} {s['captions']:4d} captions: caption accuracy "
                     f"{pct(wo['caption_accuracy'])} without reranking, "
                     f"{pct(w['caption_accuracy'])} with (best of {report['settings']['candidates']}); "
                     f"any candidate {pct(s['any_candidate'])}; colour/shape/size/layout "
                     f"{pct(w['colour'])}/{pct(w['shape'])}/{pct(w['size'])}/{pct(w['layout'])} reranked")
        if "novel_pairs" in s:
            lines.append(f"           held-out pairs drawn right: "
                         f"{pct(s['novel_pairs']['colour_and_shape'])} "
                         f"({pct(s['novel_pairs']['colour_and_shape_reranked'])} reranked) "
                         f"of {s['novel_pairs']['n']}")
    for status in (report["scorer"]["status"], report["fidelity"]["status"]):
        if "not computed" in status:
            lines.append(f"  {status}")
    c, d, p = report["classifier"], report["dvae"], report["prior"]
    if c:
        lines.append(f"  classifier: {pct(c['real'])} on fresh renders, {pct(c['val_real'])} on val images, "
                     f"{pct(c['val_reconstruction'])} on their dVAE reconstructions (the ceiling)")
    if d:
        ssim = "" if d.get("ssim") is None else f", SSIM {d['ssim']:.3f}"
        lines.append(f"  dVAE: {d['psnr_db']:.2f} dB PSNR{ssim}, {pct(d['codebook_usage'])} of "
                     f"{d['codebook_size']} codes used")
    if p:
        lines.append(f"  prior: val image loss {p['val_image_loss']:.3f} nats/token "
                     f"({p['val_image_bits_per_token']:.3f} bits; {p['val_image_loss_uncond']:.3f} nats "
                     "without captions)")
    if p.get("heldout_image_loss") is not None:
        lines.append(f"         held-out image loss {p['heldout_image_loss']:.3f} nats/token "
                     f"({p['heldout_image_bits_per_token']:.3f} bits; "
                     f"{p['heldout_image_loss_uncond']:.3f} nats without captions)")
    g = report["generation"]
    lines.append(f"  generated {g['images']} images in {g['seconds']:.0f} s ({g['images_per_s']}/s)")
    return "\n".join(lines)
