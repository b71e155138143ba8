"""The prepare job's pipeline: raw pairs -> validated, resized WebDataset shards + tokenizer.json
+ manifest.json, all on Ray Data across the cluster.

    source files ─(one read task each)─▶ RAW rows ─process_table─▶ PROCESSED rows (materialized:
    small, the images are already resized) ─▶ skip counts, duplicate keys, stable order
    ─▶ plan_shards ─▶ one write task per shard ─▶ tokenizer ─▶ manifest (written last)

A dataset is published by its manifest. Shards of one run live in their own generation folder,
so re-preparing into the same URI never touches the dataset a manifest already points to until
the new manifest replaces it; a crashed run leaves no manifest and its folder is cleared next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from tessera import published, storage
from tessera.config import ConfigError, TesseraConfig
from tessera.data import plan, preprocess, sources
from tessera.data.tar import write_tar
from tessera.data.tokenizer import train_tokenizer

log = logging.getLogger("tessera.prepare")

MANIFEST_KIND = "tessera.prepared_dataset"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val", "heldout")
FILE_LEVEL_REASONS = ("truncated_shard", "unreadable_file")
_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet", ".pq")}


def _options(cfg: TesseraConfig) -> storage.StorageOptions:
    return storage.StorageOptions.from_config(cfg.storage)


def preflight(cfg: TesseraConfig) -> list[str]:
    """Everything that can be checked before work starts: the output is writable, the inputs
    exist, Parquet has the configured columns. Returns the input file URIs."""
    opts = _options(cfg)
    src = cfg.data.source
    if src.kind == "shapes":
        from tessera.data import shapes

        try:
            shapes.validate_held_out(src.shapes.held_out)
        except ValueError as e:
            raise ConfigError(f"data.source.shapes.held_out: {e}") from None
    storage.require_writable(cfg.paths.data, opts)
    if src.kind == "shapes":
        return []
    files = storage.require_inputs(src.uri, opts, suffixes=_SUFFIXES[src.kind])
    if src.kind == "parquet":
        cols = [src.image_column, src.caption_column] + ([src.key_column] if src.key_column else [])
        # The first file whose schema reads decides; corrupt files are counted later, not fatal.
        for i, uri in enumerate(files):
            try:
                sources.check_parquet_columns(uri, opts, columns=cols)
                break
            except storage.StorageError:
                if i == len(files) - 1:
                    raise
    return files


# --- Ray Data stages (module-level functions so they pickle by reference) ---------------------


def _read_files(batch: pa.Table, *, kind: str, opts: storage.StorageOptions, src: dict) -> Iterator[pa.Table]:
    for uri, index in zip(batch.column("uri").to_pylist(), batch.column("file_index").to_pylist(),
                          strict=True):
        if kind == "webdataset":
            yield from sources.read_tar_shard(uri, index, opts)
        else:
            yield from sources.read_parquet_file(uri, index, opts, **src)


def _render_shapes(batch: dict, *, shapes_cfg, image_size: int) -> pa.Table:
    return sources.render_shapes([int(i) for i in batch["id"]], shapes_cfg=shapes_cfg, image_size=image_size)


def _process(batch: pa.Table, *, rules: preprocess.Rules) -> pa.Table:
    return preprocess.process_table(batch, rules)


def _only_kept(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("reason"), ""))


def _only_repeated(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch.column("count()"), 1))


def _reason_counts(block: pa.Table) -> dict[str, int]:
    return {c["values"]: c["counts"] for c in pc.value_counts(block.column("reason")).to_pylist()}


def _kept_first_of_key(batch: pa.Table, *, first_order: dict[str, int]) -> pa.Table:
    batch = _only_kept(batch)
    if not first_order:
        return batch
    keys, orders = batch.column("key").to_pylist(), batch.column("order").to_pylist()
    keep = [first_order.get(k, o) == o for k, o in zip(keys, orders, strict=True)]
    return batch.filter(pa.array(keep))


def build_raw_dataset(cfg: TesseraConfig, files: list[str]):
    """RAW_SCHEMA rows from the configured source, one read task per input file."""
    import ray

    src = cfg.data.source
    if src.kind == "shapes":
        total = src.shapes.num_samples + src.shapes.num_heldout
        ds = ray.data.range(total, override_num_blocks=max(1, min(256, total // 500)))
        return ds.map_batches(_render_shapes, batch_size=250, fn_kwargs=dict(
            shapes_cfg=src.shapes, image_size=src.shapes.image_size))
    items = [{"uri": u, "file_index": i} for i, u in enumerate(files)]
    read_kw = dict(image_column=src.image_column, caption_column=src.caption_column,
                   key_column=src.key_column)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(kind=src.kind, opts=_options(cfg), src=read_kw))


def _publishable(block: pa.Table, split: str, first_order: dict[str, int]) -> pa.Table:
    """The block's rows that go into `split`'s shards: kept, and the first of their key."""
    block = _kept_first_of_key(block, first_order=first_order)
    return block.filter(pc.equal(block.column("split"), split))


def _write_shard(pieces: list, *, split: str, uri: str, image_ext: str, first_order: dict[str, int],
                 opts: storage.StorageOptions) -> int:
    """One shard from slices of the split's rows in ordered blocks. Runs as a Ray task."""
    import ray

    samples = []
    for block_ref, start, stop in pieces:
        rows = _publishable(ray.get(block_ref), split, first_order).slice(start, stop - start)
        for key, image, caption, meta in zip(*(rows.column(c).to_pylist()
                                               for c in ("key", "image", "caption", "meta")), strict=True):
            samples.append((key, {image_ext: image, "txt": caption.encode("utf-8"),
                                  "json": meta.encode("utf-8")}))
    storage.write_bytes(uri, write_tar(samples), opts)
    return len(samples)


def _split_counts(block: pa.Table, first_order: dict[str, int]) -> dict[str, int]:
    block = _kept_first_of_key(block, first_order=first_order)
    return {c["values"]: c["counts"] for c in pc.value_counts(block.column("split")).to_pylist()}


# --- the job ----------------------------------------------------------------------------------


def existing_manifest(cfg: TesseraConfig) -> dict | None:
    return published.existing(cfg.paths.data, _options(cfg))


def run_prepare(cfg: TesseraConfig) -> dict:
    """Run the prepare job on the current Ray cluster; returns the manifest."""
    from ray.data import DataContext

    started = time.time()
    files = preflight(cfg)
    old = existing_manifest(cfg)
    if old is not None and not cfg.data.overwrite:
        log.info("%s already holds a prepared dataset (%s); set data.overwrite=true to redo it",
                 cfg.paths.data, {s: v["num_samples"] for s, v in old["splits"].items()})
        return old

    # Blocks come out in input order (file, then position in file), so shard contents do not
    # depend on task timing and no global sort is needed.
    ctx = DataContext.get_current()
    saved_order, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        return _prepare(cfg, files, old=old, started=started)
    finally:
        ctx.execution_options.preserve_order = saved_order


def _prepare(cfg: TesseraConfig, files: list[str], *, old: dict | None, started: float) -> dict:
    import ray
    from ray.data.expressions import col

    opts = _options(cfg)
    published.clear_unpublished_generations(cfg.paths.data, opts, keep=old["generation"] if old else None)
    generation = published.new_generation()
    rules = preprocess.Rules.from_config(cfg.data)

    # 1. Read + process; the result holds resized images only, so it is small enough to keep.
    raw = build_raw_dataset(cfg, files)
    processed = raw.map_batches(_process, batch_size=64, batch_format="pyarrow",
                                fn_kwargs={"rules": rules}).materialize()
    reason_task = ray.remote(_reason_counts)
    reasons: dict[str, int] = {}
    for counts in ray.get([reason_task.remote(r) for r in processed.to_arrow_refs()]):
        for r, n in counts.items():
            reasons[r] = reasons.get(r, 0) + n
    kept_rows = reasons.get("", 0)

    # 2. Duplicate keys: aggregate keys only (nothing large moves), keep each key's first sample.
    from ray.data.aggregate import Count, Min

    # Keys only: one partition holds a few hundred thousand comfortably.
    partitions = max(1, min(64, -(-kept_rows // 250_000)))
    repeated = (processed.map_batches(_only_kept, batch_format="pyarrow").select_columns(["key", "order"])
                .groupby("key", num_partitions=partitions).aggregate(Count(), Min("order"))
                .map_batches(_only_repeated, batch_format="pyarrow").take_all()) if kept_rows else []
    first_order = {r["key"]: r["min(order)"] for r in repeated}
    reasons["duplicate_key"] = sum(r["count()"] - 1 for r in repeated)

    # 3. Shards: exact sizes from a pure plan over the ordered blocks, one write task per shard.
    # Skipped rows and later duplicates are dropped inside these tasks, block by block.
    refs = processed.to_arrow_refs()
    first_ref = ray.put(first_order)
    count_task = ray.remote(_split_counts)
    block_counts = ray.get([count_task.remote(r, first_ref) for r in refs])
    write_task = ray.remote(_write_shard)
    image_ext = cfg.data.image_format
    splits: dict[str, dict] = {}
    pending = []
    for split in SPLITS:
        per_block = [c.get(split, 0) for c in block_counts]
        if split == "heldout" and not sum(per_block):
            continue
        shards = plan.plan_shards(per_block, cfg.data.samples_per_shard)
        entries = []
        for i, slices in enumerate(shards):
            rel = f"{generation}/{split}/{plan.shard_name(i)}"
            pieces = [(refs[s.block], s.start, s.stop) for s in slices]
            pending.append(write_task.remote(pieces, split=split, uri=storage.join(cfg.paths.data, rel),
                                             image_ext=image_ext, first_order=first_ref, opts=opts))
            entries.append({"path": rel, "num_samples": sum(s.stop - s.start for s in slices)})
        splits[split] = {"num_samples": sum(per_block), "shards": entries}
    total_shards = len(pending)
    done = 0
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        ray.get(finished)
        done += 1
        if done == total_shards or done % max(1, total_shards // 10) == 0:
            log.info("wrote %d/%d shards", done, total_shards)

    # 4. Caption tokenizer from the training captions (streamed, captions only).
    train_final = (processed.filter(expr=(col("split") == "train") & (col("reason") == ""))
                   if splits.get("train", {}).get("num_samples") else None)
    limit = cfg.tokenizer.max_training_captions

    def captions() -> Iterator[str]:
        if train_final is None:
            return
        n = 0
        for b in train_final.select_columns(["caption"]).iter_batches(batch_format="pyarrow",
                                                                      batch_size=4096):
            for c in b.column("caption").to_pylist():
                if n >= limit:
                    return
                n += 1
                yield c

    tok = train_tokenizer(captions(), vocab_size=cfg.tokenizer.vocab_size,
                          min_frequency=cfg.tokenizer.min_frequency, lowercase=cfg.tokenizer.lowercase)
    tok_json = tok.to_str()
    storage.write_text(storage.join(cfg.paths.data, TOKENIZER), tok_json, opts)

    # 5. The manifest publishes the dataset; only then is the previous generation removed.
    kept_total = sum(s["num_samples"] for s in splits.values())
    skipped = {r: int(reasons.get(r, 0)) for r in preprocess.REASONS}
    # File-level damage rows stand for a file, not a sample.
    input_samples = kept_total + sum(n for r, n in skipped.items() if r not in FILE_LEVEL_REASONS)
    wall = time.time() - started
    manifest = {
        **published.header(MANIFEST_KIND, generation=generation),
        "source": {"kind": cfg.data.source.kind, "uri": cfg.data.source.uri, "num_files": len(files)},
        "resolution": cfg.data.resolution,
        "image_format": image_ext,
        "samples_per_shard": cfg.data.samples_per_shard,
        "input_samples": int(input_samples),
        "kept_samples": int(kept_total),
        "splits": splits,
        "skipped": skipped,
        "skip_reasons": {r: preprocess.REASONS[r] for r in skipped},
        "tokenizer": {"path": TOKENIZER, "vocab_size": tok.get_vocab_size(),
                      "sha256": hashlib.sha256(tok_json.encode()).hexdigest()},
        "wall_time_s": round(wall, 2),
        "rows_per_s": round(input_samples / wall, 1) if wall > 0 else None,
        "config": cfg.model_dump(mode="json"),
    }
    if cfg.data.source.kind == "shapes":
        from tessera.data import shapes

        held = cfg.data.source.shapes.held_out
        pairs = shapes.validate_held_out(held) if held is not None else shapes.DEFAULT_HELD_OUT
        manifest["shapes"] = {"held_out": sorted(f"{c} {s}" for c, s in pairs)}
    published.publish(cfg.paths.data, manifest, opts, old)
    return manifest


def summarize(manifest: dict) -> str:
    lines = [f"prepared dataset ({manifest['source']['kind']}) at {manifest['resolution']}px, "
             f"generation {manifest['generation']}"]
    for name, s in manifest["splits"].items():
        lines.append(f"  {name:8s} {s['num_samples']:>9,d} samples in {len(s['shards'])} shards")
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append(f"  input    {manifest['input_samples']:>9,d} samples; kept {manifest['kept_samples']:,d}; "
                 f"skipped {json.dumps(skipped) if skipped else 'none'}")
    lines.append(f"  tokenizer: {manifest['tokenizer']['vocab_size']} tokens")
    lines.append(f"  wall time {manifest['wall_time_s']:.1f} s ({manifest['rows_per_s']} rows/s)")
    return "\n".join(lines)
