"""Batch generation on Ray Data: captions in, PNGs (and reranker scores) out.

    caption rows {caption, index} ─map_batches(CandidateGenerator, actor pool)─▶ in each actor
      (the bundle loaded once): per batch of captions, M candidates each drawn in one sampler call
      (candidate j of a caption seeded s drew with seed s·1000 + j, as ImageGenerator draws),
      decoded, scored by the reranker, ranked ─▶ one row per kept image:
      {caption, index, seed, candidate, rank, score, png | file}

With generate.image_uri every caption is an edit of that one image: its top keep_rows token rows
prime each draw (tessera.sampling.priming), as POST /v1/images/edits does.

Each caption's seed s is a hash of (base seed, stream, caption index), so an image depends on its
caption, its index and the settings only, never on batching or actor placement, and the HTTP API
with seed s, n=1, candidates=M returns a caption's rank-0 image. Drawing all M with no reranking
and ranking afterwards gives evaluation both figures from the same draws: candidate 0 is the image
"without reranking", rank 0 the reranker's pick.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from tessera import published, storage
from tessera.sampling.seeds import candidate_seeds, caption_seed
from tessera.viz import png_bytes

log = logging.getLogger("tessera.generate")

# Why a line of a captions file is not generated.
SKIP_REASONS = {
    "empty": "the caption is empty or whitespace",
    "too_long": "the caption is longer than max_caption_chars",
    "not_utf8": "the line is not UTF-8",
    "bad_record": "a JSONL line that is not a JSON object with a string 'caption'",
}


@dataclass(frozen=True)
class Sampling:
    """How every caption of a run is sampled (GenerationParams without n and seed)."""

    candidates: int = 1  # M drawn per caption
    keep: int = 1  # the best `keep` by the reranker (or the first drawn without one) become rows
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    seed: int = 0  # the base seed
    keep_rows: int = 0  # token rows of the edited image kept (0: no image, plain generation)

    @classmethod
    def of(cls, config, *, keep: int) -> Sampling:
        """From a SamplingConfig: its candidates (at least `keep`), the best `keep` kept."""
        return cls(candidates=max(config.candidates or keep, keep), keep=keep, temperature=config.temperature,
                   top_k=config.top_k, top_p=config.top_p, guidance_scale=config.guidance_scale,
                   seed=config.seed)


def draw_candidates(generator, prompts: list[str], seeds: list[int], sampling: Sampling,
                    image: np.ndarray | None = None):
    """M candidates per prompt as drawn, and their reranker scores.

    generator: a tessera.sampling.generate.ImageGenerator; image: (S, S, 3) uint8 whose top
    sampling.keep_rows token rows prime every prompt. Returns uint8 images (B, M, S, S, 3) and
    scores (B, M) float32, or None when the bundle has no reranker."""
    import torch

    from tessera.models.dvae import to_pixels
    from tessera.sampling.priming import prime_tokens
    from tessera.sampling.sampler import sample_image_tokens

    m = sampling.candidates
    ids, mask = generator.encode_prompts(prompts)
    with torch.no_grad():
        prime = None
        if sampling.keep_rows:
            prime = prime_tokens(generator.dvae, image[None], sampling.keep_rows).expand(len(prompts), -1)
        tokens = sample_image_tokens(generator.prior, ids, mask, temperature=sampling.temperature,
                                     top_k=sampling.top_k,
                                     top_p=sampling.top_p, seed=candidate_seeds(seeds, m),
                                     guidance_scale=sampling.guidance_scale, prime=prime,
                                     samples_per_prompt=m)
        images = generator.dvae.decode(tokens.to(generator.device))  # (B·M, 3, S, S) in [0, 1]
        scores = None
        if generator.reranker is not None:
            scores = generator.score([p for p in prompts for _ in range(m)], images).view(len(prompts), m)
            scores = scores.float().cpu().numpy()
    pixels = to_pixels(images)
    return pixels.reshape(len(prompts), m, *pixels.shape[1:]), scores


def rank_candidates(scores: np.ndarray | None, candidates: int, rows: int) -> np.ndarray:
    """(rows, M) rank of each candidate, 0 = best score; as drawn without scores. Ties keep the
    drawing order, as ImageGenerator.rank does."""
    if scores is None:
        return np.tile(np.arange(candidates), (rows, 1))
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(candidates)[None, :].repeat(rows, 0), axis=1)
    return ranks


class CandidateGenerator:
    """A Ray Data actor holding one loaded bundle. Batches {"caption", "index", "seed", ...} become
    one row per kept image (other columns are copied onto each); with output_uri the PNG is written
    there (atomically) and the row names the file, else the row carries the PNG bytes."""

    def __init__(self, *, bundle_uri: str, options: storage.StorageOptions | None, sampling: dict,
                 output_uri: str | None = None, images_folder: str = "images", threads: int | None = None,
                 use_gpu: bool = False, image: np.ndarray | None = None):
        import torch

        from tessera.bundle import load_bundle
        from tessera.sampling.generate import GenerationParams, ImageGenerator

        if threads:
            torch.set_num_threads(threads)
        self.sampling = Sampling(**sampling)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.generator = ImageGenerator(load_bundle(bundle_uri, options=options, device=device),
                                        device=device)
        s = self.sampling
        params = GenerationParams(n=s.keep, seed=0, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                  guidance_scale=s.guidance_scale, candidates=s.candidates,
                                  image=image if s.keep_rows else None, keep_rows=s.keep_rows or None)
        self.generator.check(params, max_n=s.candidates, max_candidates=max(64, s.candidates))
        self.options, self.output_uri, self.images_folder = options, output_uri, images_folder
        self.image = image

    def __call__(self, batch: dict) -> dict:
        captions = [str(c) for c in batch["caption"]]
        indices = [int(i) for i in batch["index"]]
        seeds = [int(s) for s in batch["seed"]]
        s = self.sampling
        images, scores = draw_candidates(self.generator, captions, seeds, s, self.image)
        ranks = rank_candidates(scores, s.candidates, len(captions))
        extra = [k for k in batch if k not in ("caption", "index", "seed")]  # passed through per row
        out: dict[str, list] = {k: [] for k in ("caption", "index", "seed", "candidate", "rank", "score",
                                                *extra)}
        out["file" if self.output_uri else "png"] = []
        for i, caption in enumerate(captions):
            for j in np.argsort(ranks[i], kind="stable")[: s.keep]:
                for k in extra:
                    out[k].append(batch[k][i])
                data = png_bytes(images[i, j])
                if self.output_uri:
                    name = f"{self.images_folder}/{indices[i]:08d}-{int(ranks[i, j])}.png"
                    storage.write_bytes(storage.join(self.output_uri, name), data, self.options)
                    out["file"].append(name)
                else:
                    out["png"].append(data)
                out["caption"].append(caption)
                out["index"].append(indices[i])
                out["seed"].append(seeds[i])
                out["candidate"].append(int(j))
                out["rank"].append(int(ranks[i, j]))
                out["score"].append(float(scores[i, j]) if scores is not None else math.nan)
        numeric = ("index", "seed", "candidate", "rank", "score")
        return {k: np.array(v, dtype=None if k in numeric else object) for k, v in out.items()}


def generate_images(captions: list[dict], *, bundle_uri: str, sampling: Sampling, options=None,
                    batch_size: int = 16,
                    num_actors: int = 1, cpus_per_actor: float = 1.0, use_gpu: bool = False,
                    output_uri: str | None = None, images_folder: str = "images",
                    image: np.ndarray | None = None) -> list[dict]:
    """Run CandidateGenerator over caption rows ({"caption", "index", "seed"}) on the current Ray
    cluster; rows sorted by (index, rank). image: what every caption edits (with sampling.keep_rows).
    Needs Ray (started by the job)."""
    import ray
    from ray.data import ActorPoolStrategy

    if not captions:
        return []
    blocks = max(1, min(len(captions) // max(1, batch_size), 4 * num_actors))
    ds = ray.data.from_items(captions, override_num_blocks=blocks).map_batches(
        CandidateGenerator, batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else None,
        fn_constructor_kwargs=dict(bundle_uri=bundle_uri, options=options, sampling=asdict(sampling),
                                   output_uri=output_uri, images_folder=images_folder,
                                   threads=max(1, int(cpus_per_actor)), use_gpu=use_gpu, image=image))
    rows = ds.take_all()
    for r in rows:
        r["index"], r["seed"], r["candidate"], r["rank"] = (int(r[k])
                                                            for k in ("index", "seed", "candidate", "rank"))
        r["score"] = None if math.isnan(float(r["score"])) else float(r["score"])
    return sorted(rows, key=lambda r: (r["index"], r["rank"]))


def read_captions(uri: str, *, options=None, max_chars: int = 1000) -> tuple[list[dict], dict[str, int]]:
    """Caption rows {"caption", "index"} from a .txt file (one per line), .jsonl (objects with a
    "caption") or .parquet (a "caption" column), or a folder of them (numbered on in sorted order).
    index = the line/row number, counted over every line, so skipping one moves no other caption's
    seed. Bad lines are skipped and counted by reason (SKIP_REASONS)."""
    files = storage.require_inputs(uri, options, suffixes=(".txt", ".jsonl", ".parquet"))
    rows: list[dict] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    index = 0
    for f in files:
        for caption, reason in _file_captions(f, options):
            text = " ".join(caption.split()) if caption is not None else ""
            reason = reason or ("empty" if not text else "too_long" if len(text) > max_chars else None)
            if reason:
                skipped[reason] += 1
            else:
                rows.append({"caption": text, "index": index})
            index += 1
    return rows, skipped


def _file_captions(uri: str, options):
    """(caption, None) per line/row, or (None, a SKIP_REASONS key) for one that has none."""
    data = storage.read_bytes(uri, options)
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if "caption" not in table.column_names:
            raise storage.StorageError(f"{uri}: no 'caption' column (has {table.column_names})")
        yield from ((c, None) if isinstance(c, str) else (None, "empty")
                    for c in table.column("caption").to_pylist())
        return
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline ends the last line; it does not start another
    jsonl = uri.lower().endswith(".jsonl")
    for raw in lines:
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            yield None, "not_utf8"
            continue
        if not jsonl or not line.strip():
            yield line, None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        caption = record.get("caption") if isinstance(record, dict) else None
        yield (caption, None) if isinstance(caption, str) else (None, "bad_record")


MANIFEST_KIND = "tessera.generated_images"
INDEX = "index.jsonl"


def load_edit_image(cfg, bundle: dict) -> tuple[np.ndarray | None, int]:
    """generate.image_uri at the bundle's resolution and the token rows it keeps (generate.keep_rows,
    else the upper half); (None, 0) without an image. ValueError naming the field at fault."""
    from tessera.sampling.priming import check_keep_rows, default_keep_rows, load_image

    g = cfg.generate
    if not g.image_uri:
        return None, 0
    data = storage.read_bytes(g.image_uri, storage.StorageOptions.from_config(cfg.storage))
    try:
        image = load_image(data, int(bundle["resolution"]))
    except ValueError as e:
        raise ValueError(f"generate.image_uri ({g.image_uri}): {e}") from None
    grid = int(bundle["parts"]["prior"]["shape"]["grid"])
    keep_rows = default_keep_rows(grid) if g.keep_rows is None else g.keep_rows
    try:
        check_keep_rows(keep_rows, grid)
    except ValueError as e:
        raise ValueError(f"generate.{e}") from None
    return image, keep_rows


def run_generate(cfg) -> dict:
    """jobs/generate.py on the current Ray cluster: captions file (and with generate.image_uri, the
    image every caption edits) -> PNGs under a fresh generation folder, its index.jsonl, then
    manifest.json (last: it publishes them and retires the previous generation). Returns the manifest."""
    import time

    import ray

    from tessera.bundle import read_manifest

    started = time.time()
    g, opts = cfg.generate, storage.StorageOptions.from_config(cfg.storage)
    if not g.captions_uri:
        raise ValueError("generate.captions_uri: not set (a .txt, .jsonl or .parquet file of captions)")
    bundle_uri, out = cfg.paths.generate_bundle, cfg.paths.generated
    bundle = read_manifest(bundle_uri, opts)
    image, keep_rows = load_edit_image(cfg, bundle)
    captions, skipped = read_captions(g.captions_uri, options=opts, max_chars=g.max_caption_chars)
    if g.limit is not None:
        captions = captions[: g.limit]
    if not captions:
        raise ValueError(f"{g.captions_uri}: no usable captions (skipped: {skipped})")
    log.info("%d captions from %s (skipped %s)", len(captions), g.captions_uri,
             {k: v for k, v in skipped.items() if v} or "none")
    storage.require_writable(out, opts)
    old = published.existing(out, opts)
    published.clear_unpublished_generations(out, opts, keep=old.get("generation") if old else None)
    generation = published.new_generation()
    sampling, a = replace(Sampling.of(g.sampling, keep=g.n), keep_rows=keep_rows), g.actors
    items = [{**c, "seed": caption_seed(sampling.seed, c["index"])} for c in captions]
    use_gpu = a.use_gpu if a.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    t0 = time.time()
    rows = generate_images(items, bundle_uri=bundle_uri, sampling=sampling, options=opts,
                           batch_size=a.batch_size,
                           num_actors=a.num_actors, cpus_per_actor=a.cpus_per_actor, use_gpu=use_gpu,
                           output_uri=out, images_folder=f"{generation}/images", image=image)
    seconds = time.time() - t0
    index = "".join(json.dumps({k: r[k] for k in ("file", "caption", "index", "seed", "rank", "candidate",
                                                  "score")}) + "\n"
                    for r in rows)
    storage.write_text(storage.join(out, generation, INDEX), index, opts)
    manifest = {
        **published.header(MANIFEST_KIND, generation=generation), "index": f"{generation}/{INDEX}",
        "bundle": {"uri": bundle_uri, "name": bundle["name"], "resolution": bundle["resolution"]},
        "captions": {"uri": g.captions_uri, "lines": len(captions) + sum(skipped.values()),
                     "used": len(captions),
                     "skipped": skipped, "skip_reasons": SKIP_REASONS},
        "sampling": asdict(sampling), "images": len(rows),
        "edited_image": {"uri": g.image_uri, "keep_rows": keep_rows} if g.image_uri else None,
        "images_drawn": len(captions) * sampling.candidates,
        "seed_rule": "caption line i is seeded s = caption_seed(seed, i); "
                     "its candidate j drew with s*1000 + j",
        "wall_time_s": round(time.time() - started, 2),
        "images_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,  # kept images
        "drawn_per_s": round(len(captions) * sampling.candidates / seconds, 2) if seconds > 0 else None,
        "config": cfg.generate.model_dump(mode="json"),
    }
    published.publish(out, manifest, opts, old)
    return manifest


def summarize(manifest: dict) -> str:
    c = manifest["captions"]
    bad = {k: v for k, v in c["skipped"].items() if v}
    return (f"generated {manifest['images']} images for {c['used']} captions with "
            f"{manifest['bundle']['name']} ({manifest['sampling']['candidates']} drawn, "
            f"{manifest['sampling']['keep']} kept per caption) in "
            f"{manifest['wall_time_s']:.1f} s ({manifest['drawn_per_s']} drawn/s)\n"
            f"  skipped lines: {json.dumps(bad) if bad else 'none'}\n"
            f"  index: {manifest['index']}")
