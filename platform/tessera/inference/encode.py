"""The encode job: prepared image shards + an exported dVAE -> token shards (Parquet) + manifest.

    prepared manifest ─▶ one row per image shard ─map_batches(ShardEncoder, actor pool)─▶
      in each actor (the dVAE loaded once): read the tar, check and decode every sample, tokenize
      its caption, dVAE.encode in batches [and encode.views - 1 random crops of each training
      image], write {generation}/{split}/shard-NNNNNN.parquet
    ─▶ per-shard counts and skip reasons ─▶ manifest.json (written last: it publishes the tokens)

Token shards map one-to-one onto image shards, so a rerun writes the same files, and a sample
that cannot be decoded is counted under its reason and never reaches a token shard. The prior
trains from these rows alone; no image is decoded again.

Views (paper §B.2: "When training the transformer, we apply data augmentation to the images before
encoding them using the dVAE encoder"): with encode.views = K a training image gives K rows, view 0
of the whole image (what K = 1 writes) and views 1..K-1 of Listing 2's crops, view v drawn from
(encode.seed, v, the sample's key); the rows of an image are adjacent and carry their `view`.
Other splits keep one row (view 0) per image.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera import artifacts, published, storage
from tessera.config import TesseraConfig
from tessera.data.token_loader import MANIFEST_KIND, MAX_TOKENS, token_schema

log = logging.getLogger("tessera.encode")

# Why a sample of a prepared shard is left out of the token shards.
REASONS = {
    "undecodable_image": "the image bytes do not decode",
    "wrong_image_size": "the image is not the prepared resolution",
    "missing_field": "the sample lacks its image or caption file",
    "bad_caption": "the caption is not UTF-8 or tokenizes to nothing",
    "damaged_shard": "the shard ends mid-sample (samples before the damage are kept)",
}
def _options(cfg: TesseraConfig) -> storage.StorageOptions:
    return storage.StorageOptions.from_config(cfg.storage)


class ShardEncoder:
    """A Ray Data actor: holds one dVAE and turns whole image shards into token shards."""

    def __init__(self, *, dvae_uri: str, opts: storage.StorageOptions, tokenizer_json: str, image_ext: str,
                 resolution: int, batch_size: int, use_gpu: bool, measure_psnr: tuple[str, ...],
                 views: int = 1, view_scale: tuple[float, float] = (1.0, 9 / 8), seed: int = 0):
        import torch

        from tessera.data.tokenizer import CaptionTokenizer
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = artifacts.load("dvae", dvae_uri, options=opts, device=self.device)
        self.tokenizer = CaptionTokenizer.from_json(tokenizer_json)
        self.opts, self.image_ext, self.resolution = opts, image_ext, resolution
        self.batch_size, self.measure_psnr = batch_size, measure_psnr
        self.views, self.view_scale, self.seed = views, view_scale, seed

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"path": [], "num_samples": [], "skipped": [], "psnr_sum": []}
        for src, dst, split in zip(batch["src"], batch["dst"], batch["split"], strict=True):
            n, skipped, psnr_sum = self.encode_shard(str(src), str(dst), str(split))
            out["path"].append(str(dst))
            out["num_samples"].append(n)
            out["skipped"].append(json.dumps(skipped))
            out["psnr_sum"].append(psnr_sum)
        return {k: np.array(v) for k, v in out.items()}

    def _samples(self, data: bytes, skipped: dict[str, int]) -> tuple[list[str], list[str], np.ndarray]:
        from PIL import Image

        from tessera.data.tar import TarReadResult, iter_tar_samples

        keys, captions, images = [], [], []
        result = TarReadResult()
        for s in iter_tar_samples(io.BytesIO(data), result):
            if self.image_ext not in s.files or "txt" not in s.files:
                skipped["missing_field"] += 1
                continue
            try:
                caption = s.files["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                caption = ""
            if not caption:
                skipped["bad_caption"] += 1
                continue
            try:
                with Image.open(io.BytesIO(s.files[self.image_ext])) as im:
                    arr = np.asarray(im.convert("RGB"))
            except Exception:  # PIL raises many types for damaged bytes
                skipped["undecodable_image"] += 1
                continue
            if arr.shape != (self.resolution, self.resolution, 3):
                skipped["wrong_image_size"] += 1
                continue
            keys.append(s.key)
            captions.append(caption)
            images.append(arr)
        if result.truncated:
            skipped["damaged_shard"] += 1
        empty = np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        return keys, captions, np.stack(images) if images else empty

    def encode_shard(self, src: str, dst: str, split: str) -> tuple[int, dict[str, int], float]:
        import torch

        from tessera.data.loader import Crops, sample_id
        from tessera.models.dvae import psnr, to_model_input

        skipped = dict.fromkeys(REASONS, 0)
        keys, captions, images = self._samples(storage.read_bytes(src, self.opts), skipped)
        text_ids = self.tokenizer.ids(captions)
        keep = [i for i, ids in enumerate(text_ids) if ids]
        skipped["bad_caption"] += len(keys) - len(keep)
        keys, captions, text_ids = ([keys[i] for i in keep], [captions[i] for i in keep],
                                    [text_ids[i] for i in keep])
        images = images[keep]

        shape = self.model.shape
        views = self.views if split == "train" else 1
        # Listing 2 at the dVAE's resolution: a near-central full square, resized to t ∈ [1, 9/8]·size
        # by default, a random size x size crop of it; no flip (captions may say left or right).
        crops = Crops(size=shape.image_size, scale=self.view_scale, central=True, seed=self.seed)
        sids = np.array([sample_id(k) for k in keys], np.int64)
        tokens = np.zeros((len(keys), views, shape.grid_size * shape.grid_size), np.int16)
        psnr_sum = 0.0
        with torch.inference_mode():
            for start in range(0, len(keys), self.batch_size):
                chunk = images[start:start + self.batch_size]
                for view in range(views):
                    pixels = chunk if view == 0 else crops.crop_batch(chunk, sids[start:start + len(chunk)],
                                                                      draw=view)
                    x = to_model_input(torch.from_numpy(pixels).to(self.device), shape.image_size)
                    t = self.model.encode(x)  # (b, G, G)
                    tokens[start:start + len(t), view] = t.flatten(1).cpu().numpy().astype(np.int16)
                    if view == 0 and split in self.measure_psnr:
                        psnr_sum += float(psnr(self.model.decode(t), x)) * len(t)
        # Image-major rows: image i's views are rows i·V .. i·V + V - 1.
        def per_row(values: list) -> list:
            return [v for v in values for _ in range(views)]

        columns = {
            "key": pa.array(per_row(keys), pa.string()),
            "split": pa.array([split] * (len(keys) * views), pa.string()),
            "caption": pa.array(per_row(captions), pa.string()),
            "text_ids": pa.array(per_row(text_ids), pa.list_(pa.int32())),
            "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.int16()),
                                                              shape.grid_size * shape.grid_size),
        }
        if self.views > 1:
            columns["view"] = pa.array(np.tile(np.arange(views, dtype=np.int16), len(keys)), pa.int16())
        table = pa.table(columns, schema=token_schema(shape.grid_size, views=self.views))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(dst, buf.getvalue(), self.opts)
        return table.num_rows, skipped, psnr_sum


def read_token_shard(uri: str, options: storage.StorageOptions | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))


def run_encode(cfg: TesseraConfig) -> dict:
    """Run the encode job on the current Ray cluster; returns the token manifest."""
    import ray
    from ray.data import ActorPoolStrategy

    from tessera.data.loader import load_manifest, shard_uris

    started = time.time()
    opts = _options(cfg)
    e = cfg.encode
    data = load_manifest(cfg.paths.data, opts)
    dvae_meta = artifacts.read_meta("dvae", cfg.paths.encode_dvae, opts)
    if dvae_meta["shape"]["num_tokens"] > MAX_TOKENS:
        raise ValueError(f"dVAE codebook of {dvae_meta['shape']['num_tokens']} does not fit int16 token ids")
    storage.require_writable(cfg.paths.tokens, opts)
    old = published.existing(cfg.paths.tokens, opts)
    if old is not None and not e.overwrite:
        log.info("%s already holds token shards; set encode.overwrite=true to redo them", cfg.paths.tokens)
        return old

    published.clear_unpublished_generations(cfg.paths.tokens, opts, keep=old["generation"] if old else None)
    generation = published.new_generation()
    items = []
    for split in data["splits"]:
        for src, entry in zip(shard_uris(cfg.paths.data, data, split), data["splits"][split]["shards"],
                              strict=True):
            name = entry["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            items.append({"src": src, "split": split,
                          "dst": storage.join(cfg.paths.tokens, generation, split, f"{name}.parquet")})
    tokenizer_json = storage.read_bytes(storage.join(cfg.paths.data, data["tokenizer"]["path"]),
                                        opts).decode()
    measure = tuple(s for s in data["splits"] if s != "train")
    a = e.actors
    use_gpu = a.use_gpu if a.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoder, batch_size=1,
        compute=ActorPoolStrategy(min_size=1, max_size=a.num_actors),
        num_cpus=a.cpus_per_actor, num_gpus=1 if use_gpu else None,
        fn_constructor_kwargs=dict(dvae_uri=cfg.paths.encode_dvae, opts=opts, tokenizer_json=tokenizer_json,
                                   image_ext=data["image_format"], resolution=data["resolution"],
                                   batch_size=a.batch_size, use_gpu=use_gpu, measure_psnr=measure,
                                   views=e.views, view_scale=e.view_scale, seed=e.seed),
    ).take_all()
    by_path = {r["path"]: r for r in results}

    splits: dict[str, dict] = {}
    skipped = dict.fromkeys(REASONS, 0)
    psnr = {}
    for split in data["splits"]:
        entries, psnr_sum = [], 0.0
        for item in (i for i in items if i["split"] == split):
            r = by_path[item["dst"]]
            entries.append({"path": item["dst"][len(cfg.paths.tokens.rstrip("/")) + 1:],
                            "num_samples": int(r["num_samples"])})
            for k, v in json.loads(r["skipped"]).items():
                skipped[k] += v
            psnr_sum += float(r["psnr_sum"])
        n = sum(x["num_samples"] for x in entries)
        splits[split] = {"num_samples": n, "shards": entries}
        if split in measure and n:
            psnr[split] = round(psnr_sum / n, 3)

    shape = dvae_meta["shape"]
    wall = time.time() - started
    # In this generation, as the shards: a failed re-encode leaves the published one's as it was.
    tokenizer_path = f"{generation}/{data['tokenizer']['path'].rsplit('/', 1)[-1]}"
    total = sum(s["num_samples"] for s in splits.values())
    manifest = {
        **published.header(MANIFEST_KIND, generation=generation),
        "grid_size": shape["grid_size"],
        "num_image_tokens": shape["num_tokens"],
        "image_size": shape["image_size"],
        "text_vocab_size": data["tokenizer"]["vocab_size"],
        "tokenizer": {"path": tokenizer_path, "sha256": data["tokenizer"]["sha256"]},
        "data": {"uri": cfg.paths.data, "generation": data["generation"], "resolution": data["resolution"]},
        "dvae": {"uri": cfg.paths.encode_dvae, "step": dvae_meta.get("step"), "shape": shape},
        "num_samples": total,  # rows: with views > 1 a training image has `views` of them
        "views": e.views,
        "splits": splits,
        "skipped": skipped,
        "skip_reasons": REASONS,
        # Mean PSNR (dB) of decode(encode(x)) against x at the dVAE's resolution, per split.
        "roundtrip_psnr": psnr,
        "wall_time_s": round(wall, 2),
        "samples_per_s": round(total / wall, 1) if wall > 0 else None,
        "config": cfg.model_dump(mode="json"),
    }
    # The tokenizer travels with the tokens, so the prior needs only this folder.
    storage.write_text(storage.join(cfg.paths.tokens, tokenizer_path), tokenizer_json, opts)
    published.publish(cfg.paths.tokens, manifest, opts, old)
    return manifest


def summarize(manifest: dict) -> str:
    views = manifest.get("views", 1)
    lines = [f"token shards: {manifest['grid_size']}x{manifest['grid_size']} image tokens of "
             f"{manifest['num_image_tokens']}, generation {manifest['generation']}"
             + (f", {views} views of each training image" if views > 1 else "")]
    for name, s in manifest["splits"].items():
        extra = (f"; round-trip PSNR {manifest['roundtrip_psnr'][name]:.2f} dB"
                 if name in manifest["roundtrip_psnr"] else "")
        lines.append(f"  {name:8s} {s['num_samples']:>9,d} samples in {len(s['shards'])} shards{extra}")
    bad = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append(f"  skipped {json.dumps(bad) if bad else 'none'}")
    lines.append(f"  wall time {manifest['wall_time_s']:.1f} s ({manifest['samples_per_s']} samples/s)")
    return "\n".join(lines)
