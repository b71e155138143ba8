"""The training input loader: a prepared dataset's manifest -> the Ray Data dataset a training
stage consumes, and the worker-side iterator over its shard.

    manifest.json ─▶ shard URIs ─read_webdataset (file order shuffled per epoch, seeded)─▶
    decode PNG/JPEG + tokenize captions (fused into the read tasks) ─▶ streaming_split by
    Ray Train ─▶ iter_torch_batches (local shuffle buffer) in each worker

Batches are {"image": uint8 (B, H, W, 3), "text_ids": int32 (B, L), "text_mask": bool (B, L),
"sample_id": int64 (B,)}. Images stay uint8 until the model moves them to its device (4x less to
copy than float); sample_id is a stable hash of the sample key, for bookkeeping and tests.
"""

from __future__ import annotations

import functools
import hashlib
import io

import numpy as np
from PIL import Image

from tessera import published, storage
from tessera.config import TesseraConfig
from tessera.data.prepare import MANIFEST_KIND
from tessera.data.tokenizer import CaptionTokenizer


def load_manifest(data_uri: str, options: storage.StorageOptions | None = None) -> dict:
    return published.read(data_uri, MANIFEST_KIND, what="prepared dataset", produced_by="jobs/prepare.py",
                          options=options)


def shard_uris(data_uri: str, manifest: dict, split: str) -> list[str]:
    splits = manifest["splits"]
    if split not in splits or not splits[split]["shards"]:
        raise ValueError(f"{data_uri}: prepared dataset has no {split!r} split (has {sorted(splits)})")
    return [storage.join(data_uri, s["path"]) for s in splits[split]["shards"]]


def sample_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> CaptionTokenizer:
    # One parse per worker process, not per batch.
    return CaptionTokenizer.from_json(tokenizer_json)


def decode_batch(batch: dict, *, tokenizer_json: str, text_len: int, image_ext: str, resolution: int) -> dict:
    """Raw WebDataset columns (bytes) -> model-ready numpy arrays."""
    images = np.empty((len(batch["__key__"]), resolution, resolution, 3), dtype=np.uint8)
    for i, data in enumerate(batch[image_ext]):
        with Image.open(io.BytesIO(data)) as im:
            images[i] = np.asarray(im.convert("RGB"))
    captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in batch["txt"]]
    ids, mask = _tokenizer(tokenizer_json).encode(captions, text_len=text_len)
    return {
        "image": images,
        "text_ids": ids,
        "text_mask": mask,
        "sample_id": np.array([sample_id(k.rsplit("/", 1)[-1]) for k in batch["__key__"]], dtype=np.int64),
    }


def decode_shards(batch: dict, **decode_kwargs) -> dict:
    """Whole tar shards (one per row, as read_binary_files gives them) -> decoded samples."""
    from tessera.data.tar import TarReadResult, iter_tar_samples

    ext = decode_kwargs["image_ext"]
    cols: dict[str, list] = {"__key__": [], ext: [], "txt": []}
    for data in batch["bytes"]:
        result = TarReadResult()
        for s in iter_tar_samples(io.BytesIO(data), result):
            cols["__key__"].append(s.key)
            cols[ext].append(s.files[ext])
            cols["txt"].append(s.files["txt"])
        if result.truncated:
            # Prepared shards are written atomically, so this is storage corruption, not input noise.
            raise OSError(f"prepared shard is damaged: {result.error}")
    return decode_batch(cols, **decode_kwargs)


def read_validation_samples(data_uri: str, manifest: dict, *, limit: int, text_len: int,
                            options: storage.StorageOptions | None = None) -> dict[str, np.ndarray] | None:
    """The first `limit` samples of the prepared val split, read directly (no Ray), so every rank
    reads the same ones: {"image", "text_ids", "text_mask"} as decode_batch gives them; None when
    the split is missing or empty."""
    if not manifest["splits"].get("val", {}).get("num_samples"):
        return None
    tokenizer_json = storage.read_bytes(storage.join(data_uri, manifest["tokenizer"]["path"]),
                                        options).decode()
    parts: dict[str, list] = {"image": [], "text_ids": [], "text_mask": []}
    for uri in shard_uris(data_uri, manifest, "val"):
        out = decode_shards({"bytes": [storage.read_bytes(uri, options)]}, tokenizer_json=tokenizer_json,
                            text_len=text_len, image_ext=manifest["image_format"],
                            resolution=manifest["resolution"])
        for k in parts:
            parts[k].append(out[k])
        if sum(len(i) for i in parts["image"]) >= limit:
            break
    return {k: np.concatenate(v)[:limit] for k, v in parts.items()}


def build_training_dataset(cfg: TesseraConfig, *, split: str = "train", data_uri: str | None = None):
    """The Ray Data dataset a training stage consumes (lazy: nothing is read until iterated)."""
    import ray
    from ray.data import FileShuffleConfig

    opts = storage.StorageOptions.from_config(cfg.storage)
    data_uri = data_uri or cfg.paths.data
    manifest = load_manifest(data_uri, opts)
    uris = shard_uris(data_uri, manifest, split)
    fs, _ = storage.resolve(uris[0], opts)
    paths = [storage.resolve(u, opts)[1] for u in uris]
    tokenizer_json = storage.read_bytes(storage.join(data_uri, manifest["tokenizer"]["path"]), opts).decode()
    shuffle = (
        FileShuffleConfig(seed=cfg.loader.shuffle_seed, reseed_after_execution=True)
        if cfg.loader.file_shuffle and split == "train"
        else None
    )
    # One row per shard (the whole tar, ~1-30 MB), parsed and decoded in the same task: whole
    # blocks (batch_size=None) let Ray fuse the decode into the read, so raw bytes never pass
    # through the object store, and no per-sample Python rows are built on the way.
    ds = ray.data.read_binary_files(paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths))
    return ds.map_batches(
        decode_shards,
        batch_size=None,
        fn_kwargs=dict(tokenizer_json=tokenizer_json, text_len=cfg.loader.text_len,
                       image_ext=manifest["image_format"], resolution=manifest["resolution"]),
    )


def _writable_collate():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WritableTensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            import torch

            return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()}

    return WritableTensors()


def iter_training_batches(shard, loader_cfg, *, epoch: int = 0):
    """Inside a Train worker: torch batches from `ray.train.get_dataset_shard(...)`."""
    buffer = loader_cfg.local_shuffle_buffer
    return shard.iter_torch_batches(
        batch_size=loader_cfg.batch_size,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=(loader_cfg.shuffle_seed + 1_000_003 * epoch) if buffer else None,
        prefetch_batches=loader_cfg.prefetch_batches,
        # Without a shuffle buffer the arrays are views of read-only blocks in the object store;
        # copy them so a training step may modify its batch in place.
        collate_fn=None if buffer else _writable_collate(),
        drop_last=False,
    )


def train_data_config(cfg: TesseraConfig):
    """Ray Train's DataConfig with Data's CPU use bounded, so reading never waits on the CPUs
    the Train workers hold (and vice versa) on a small machine."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    options = ExecutionOptions()
    if cfg.ray.data_cpu_limit is not None:
        options.resource_limits = ExecutionResources(cpu=cfg.ray.data_cpu_limit)
    return DataConfig(execution_options=options)
