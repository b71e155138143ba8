"""Stage 2's input: token shards (jobs/encode.py) -> padded caption ids, masks and image tokens.

    token manifest ─▶ shard URIs ─read_parquet (file order shuffled per epoch, seeded)─▶
    pad_token_batch (fused into the read tasks) ─▶ streaming_split by Ray Train ─▶
    iter_torch_batches (local shuffle buffer) in each worker

Batches are {"text_ids": int32 (B, T), "text_mask": bool (B, T), "image_tokens": int16 (B, G·G)}.
Captions longer than T are truncated; the ids under padding are 0 and never looked up (the prior
embeds padding positions with its own learned vectors). No image is decoded in stage 2.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera import published, storage
from tessera.config import TesseraConfig

COLUMNS = ["text_ids", "image_tokens"]
MANIFEST_KIND = "tessera.token_dataset"
# int16 holds every token id of the paper's K = 8192 with room to spare.
MAX_TOKENS = np.iinfo(np.int16).max + 1


def token_schema(grid_size: int) -> pa.Schema:
    """A token shard's columns (jobs/encode.py writes them)."""
    return pa.schema([
        ("key", pa.string()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("text_ids", pa.list_(pa.int32())),  # the caption's BPE ids, unpadded
        ("image_tokens", pa.list_(pa.int16(), grid_size * grid_size)),  # (G*G,) row-major grid
    ])


def load_token_manifest(tokens_uri: str, options: storage.StorageOptions | None = None) -> dict:
    return published.read(tokens_uri, MANIFEST_KIND, what="token-shard dataset", produced_by="jobs/encode.py",
                          options=options)


def token_shard_uris(tokens_uri: str, manifest: dict, split: str) -> list[str]:
    splits = manifest["splits"]
    if not splits.get(split, {}).get("shards"):
        raise ValueError(f"{tokens_uri}: token dataset has no {split!r} split (has {sorted(splits)})")
    return [storage.join(tokens_uri, s["path"]) for s in splits[split]["shards"]]


def pad_token_batch(table: pa.Table, *, text_len: int) -> dict[str, np.ndarray]:
    """Rows of a token shard -> fixed-size numpy arrays (vectorised; no per-row Python)."""
    n = table.num_rows
    ids_col = table.column("text_ids").combine_chunks()
    lengths = pc.list_value_length(ids_col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
    pos = np.arange(text_len)
    mask = pos[None, :] < np.minimum(lengths, text_len)[:, None]
    if flat.size:
        ids = np.where(mask, flat[np.minimum(starts[:, None] + pos[None, :], flat.size - 1)],
                       0).astype(np.int32)
    else:
        ids = np.zeros((n, text_len), np.int32)
    image_col = table.column("image_tokens").combine_chunks()
    grid_tokens = image_col.type.list_size
    image = (image_col.flatten().to_numpy(zero_copy_only=False).reshape(n, grid_tokens)
             .astype(np.int16, copy=False))
    return {"text_ids": ids, "text_mask": mask, "image_tokens": image}


def read_token_rows(tokens_uri: str, manifest: dict, split: str, *, text_len: int, limit: int,
                    options: storage.StorageOptions | None = None) -> dict[str, np.ndarray] | None:
    """The first `limit` rows of a split, read directly (no Ray) so every rank reads the same
    ones; with their captions. None when the split is empty."""
    import pyarrow.parquet as pq

    if not manifest["splits"].get(split, {}).get("num_samples"):
        return None
    tables = []
    for uri in token_shard_uris(tokens_uri, manifest, split):
        fs, path = storage.resolve(uri, options)
        tables.append(pq.read_table(path, filesystem=fs, columns=["caption", *COLUMNS]))
        if sum(t.num_rows for t in tables) >= limit:
            break
    table = pa.concat_tables(tables).slice(0, limit)
    out = pad_token_batch(table, text_len=text_len)
    out["caption"] = np.array(table.column("caption").to_pylist(), dtype=object)
    return out


def build_token_dataset(cfg: TesseraConfig, manifest: dict, *, split: str = "train"):
    """The Ray Data dataset stage 2 consumes (lazy: nothing is read until iterated)."""
    import ray
    from ray.data import FileShuffleConfig

    opts = storage.StorageOptions.from_config(cfg.storage)
    uris = token_shard_uris(cfg.paths.prior_tokens, manifest, split)
    fs, _ = storage.resolve(uris[0], opts)
    paths = [storage.resolve(u, opts)[1] for u in uris]
    shuffle = (
        FileShuffleConfig(seed=cfg.loader.shuffle_seed, reseed_after_execution=True)
        if cfg.loader.file_shuffle and split == "train"
        else None
    )
    # select_columns is pushed down into the scan (read_parquet's columns= is deprecated in 2.60).
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle).select_columns(COLUMNS)
    return ds.map_batches(pad_token_batch, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"text_len": cfg.loader.text_len})
