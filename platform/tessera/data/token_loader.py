"""Stage 2's input: token shards (jobs/encode.py) -> padded caption ids, masks and image tokens.

    token manifest ─▶ shard URIs ─read_parquet (file order shuffled per epoch, seeded)─▶
    [BPE-dropout: the captions re-tokenized] ─▶ pad_token_batch (fused into the read tasks)
    ─▶ streaming_split by Ray Train ─▶ iter_torch_batches (local shuffle buffer) in each worker

Batches are {"text_ids": int32 (B, T), "text_mask": bool (B, T), "image_tokens": int16 (B, G·G)}.
Captions longer than T are truncated; the ids under padding are 0 and never looked up (the prior
embeds padding positions with its own learned vectors). No image is decoded in stage 2.

With loader.bpe_dropout > 0 the train split's captions are segmented afresh in every epoch, each
from (seed, epoch, key, view): the same in every run, a new draw each epoch (the epoch is the
dataset's execution index, as for the file order; tessera.data.loader.dataset_epoch). The
validation rows (read_token_rows, or any split but train) keep the ids encode wrote.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera import published, storage
from tessera.config import TesseraConfig

COLUMNS = ["text_ids", "image_tokens"]
MANIFEST_KIND = "tessera.token_dataset"
# int16 holds every token id of the paper's K = 8192 with room to spare.
MAX_TOKENS = np.iinfo(np.int16).max + 1


def token_schema(grid_size: int, *, views: int = 1) -> pa.Schema:
    """A token shard's columns (jobs/encode.py writes them); with views > 1 a view column too."""
    return pa.schema([
        ("key", pa.string()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("text_ids", pa.list_(pa.int32())),  # the caption's BPE ids, unpadded
        ("image_tokens", pa.list_(pa.int16(), grid_size * grid_size)),  # (G*G,) row-major grid
        # 0: the whole image; 1..: random crops of it (encode.views)
        *([("view", pa.int16())] if views > 1 else []),
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


def bpe_seed(seed: int, epoch: int, key: str, view: int) -> int:
    """The seed of one row's BPE-dropout draw (stable across processes, unlike hash())."""
    text = f"{seed}/{epoch}/{view}/{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=2)
def _dropout(tokenizer_json: str, p: float):
    # One parse per worker process, not per block.
    from tessera.data.tokenizer import BPEDropout, CaptionTokenizer

    return BPEDropout(CaptionTokenizer.from_json(tokenizer_json), p)


@dataclass(frozen=True)
class CaptionBPEDropout:
    """BPE-dropout of a block of token-shard rows: text_ids replaced by a fresh segmentation of
    each caption (not the prior's caption dropout, which blanks whole captions)."""

    tokenizer_json: str
    p: float
    seed: int
    text_len: int  # a segmentation longer than this falls back to the plain one

    def apply(self, table: pa.Table, *, epoch: int) -> pa.Table:
        keys = table.column("key").to_pylist()
        views = table.column("view").to_pylist() if "view" in table.column_names else [0] * len(keys)
        seeds = [bpe_seed(self.seed, epoch, k, v) for k, v in zip(keys, views, strict=True)]
        ids = _dropout(self.tokenizer_json, self.p).ids(table.column("caption").to_pylist(), seeds,
                                                        fit=self.text_len)
        return table.set_column(table.schema.get_field_index("text_ids"), "text_ids",
                                pa.array(ids, pa.list_(pa.int32())))


def token_batch(table: pa.Table, *, text_len: int, dropout: CaptionBPEDropout | None = None
                ) -> dict[str, np.ndarray]:
    """A block of token-shard rows -> the prior's arrays, re-segmented by `dropout` (drawn for
    this execution of the dataset) when given."""
    if dropout is not None:
        from tessera.data.loader import dataset_epoch

        table = dropout.apply(table, epoch=dataset_epoch())
    return pad_token_batch(table, text_len=text_len)


def build_token_dataset(cfg: TesseraConfig, manifest: dict, *, split: str = "train"):
    """The Ray Data dataset stage 2 consumes (lazy: nothing is read until iterated);
    loader.bpe_dropout applies to the train split only."""
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
    dropout, columns = None, COLUMNS
    if cfg.loader.bpe_dropout > 0 and split == "train":
        if "tokenizer" not in manifest:
            raise ValueError(f"loader.bpe_dropout={cfg.loader.bpe_dropout} needs the captions' tokenizer, "
                             f"and the token dataset at {cfg.paths.prior_tokens} names none "
                             "(re-run jobs/encode.py, or set loader.bpe_dropout=0)")
        tokenizer_uri = storage.join(cfg.paths.prior_tokens, manifest["tokenizer"]["path"])
        tokenizer_json = storage.read_bytes(tokenizer_uri, opts).decode()
        dropout = CaptionBPEDropout(tokenizer_json, cfg.loader.bpe_dropout, cfg.loader.shuffle_seed,
                                    cfg.loader.text_len)
        columns = [*COLUMNS, "key", "caption", *(["view"] if manifest.get("views", 1) > 1 else [])]
    # select_columns is pushed down into the scan (read_parquet's columns= is deprecated in 2.60).
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle).select_columns(columns)
    return ds.map_batches(token_batch, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"text_len": cfg.loader.text_len, "dropout": dropout})
