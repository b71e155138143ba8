"""The prepare job: raw pairs -> validated, resized WebDataset shards + tokenizer.json +
manifest.json, streamed through Ray tasks at any input size.

    input unit ─(one task: read, process, write)─▶ parts/{unit}-{split}.parquet, then {unit}.json
    part keys ─(hash-partitioned via shuffle/, keys only)─▶ drops/ (every later occurrence of a key)
    part counts − drops ─plan_shards─▶ exact-size shards, one task per run of consecutive shards
    train captions (bounded sample) ─▶ tokenizer ─▶ manifest (written last)

A unit is one input file (or a range of procedural shapes). Its task holds one unit's resized
images and writes them to storage; keys travel between tasks through storage too, so the object
store holds only small results and the driver only per-unit counts, whatever the input size.
A unit is finished when its `{unit}.json` marker exists (written after its parts): a prepare that
dies part-way and is run again with the same inputs and data settings resumes in the same
unpublished generation and reads only the inputs without a marker. Parts, drops and shuffle files
are the shards' raw material; they are deleted once the manifest is written.

A dataset is published by its manifest. Shards and tokenizer of one run live in their own
generation folder, so re-preparing into the same URI never touches the dataset a manifest already
points to; once the new manifest replaces it, the old generation stays until the next publish
(tessera.published), so jobs still reading it can finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera import published, storage
from tessera.config import ConfigError, TesseraConfig
from tessera.data import plan, preprocess, sources
from tessera.data.heldout import HeldOut
from tessera.data.tar import write_tar
from tessera.data.tokenizer import train_tokenizer

log = logging.getLogger("tessera.prepare")

MANIFEST_KIND = "tessera.prepared_dataset"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val", "heldout")
FILE_LEVEL_REASONS = ("truncated_shard", "unreadable_file")
_SUFFIXES = {"webdataset": (".tar",), "emoji": (".tar",), "parquet": (".parquet", ".pq"),
             "files": sources.LOOSE_SUFFIXES}
RUN_SPEC = "prepare.json"  # in a generation folder: what it is being prepared from
PARTS_FORMAT = 1  # bump when the part files change, so an old unfinished generation is not resumed
SHAPES_PER_UNIT = 500
# Near-duplicate candidates share one of 5 bands of the grey dHash (so any pair within 4 of its
# 64 bits is a candidate); the colour dHash then decides (data.near_duplicate_bits).
CANDIDATE_BANDS = 5
PARTS_PER_KEY_TASK = 16
# Set by tests: "exit:<unit>" makes that unit's task kill its worker (os._exit) after reading,
# "sleep:<unit>" holds it for 10 minutes (the test kills the driver meanwhile).
FAULT_ENV = "TESSERA_PREPARE_FAULT"

PART_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("order", pa.int64()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("meta", pa.string()),
    ("dhash", pa.int64()),  # grey difference hash; null unless data.near_duplicates is "dhash"
    ("dhash_rgb", pa.binary()),  # colour difference hash (24 bytes), likewise
])


class PrepareStopped(RuntimeError):
    """An input's task failed (after data.task_retries); the finished inputs are kept for a rerun."""


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
    if cfg.data.heldout.active:
        HeldOut.load(cfg.data.heldout, opts)  # a missing or malformed list fails here, not in a task
    storage.require_writable(cfg.paths.data, opts)
    if src.kind == "shapes":
        return []
    if src.kind == "emoji":  # its shards first (nothing to do when they are there already)
        from tessera.data import emoji

        emoji.fetch_shards(src.uri, src.emoji, opts)
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


def units_of(cfg: TesseraConfig, files: list[str]) -> list[dict]:
    """The units of work, in input order: one per input file, or ranges of procedural samples."""
    src = cfg.data.source
    if src.kind == "files":  # runs of loose samples, each unit's file URIs listed in it
        samples, n = sources.group_loose_files(src.uri, files, _options(cfg)), sources.LOOSE_PER_UNIT
        if not samples:
            raise storage.StorageError(f"{src.uri}: no images or captions among its {len(files)} files")
        runs = [samples[i:i + n] for i in range(0, len(samples), n)]
        return [{"unit": u, "input": f"{src.uri}: {run[0][0]} .. {run[-1][0]}", "samples": run}
                for u, run in enumerate(runs)]
    if src.kind != "shapes":
        return [{"unit": i, "input": uri} for i, uri in enumerate(files)]
    total = src.shapes.num_samples + src.shapes.num_heldout
    return [{"unit": i, "input": f"shapes[{start}:{min(total, start + SHAPES_PER_UNIT)}]",
             "range": [start, min(total, start + SHAPES_PER_UNIT)]}
            for i, start in enumerate(range(0, total, SHAPES_PER_UNIT))]


def _fingerprint(cfg: TesseraConfig, units: list[dict]) -> str:
    """What a unit's parts depend on: the inputs and every data setting that shapes a sample."""
    data = cfg.data.model_dump(mode="json", exclude={"overwrite", "output_uri", "samples_per_shard",
                                                     "task_retries"})
    spec = {"format": PARTS_FORMAT, "data": data, "inputs": [u["input"] for u in units]}
    if cfg.data.heldout.uri:  # what the file says, not only its name
        spec["heldout"] = HeldOut.load(cfg.data.heldout, _options(cfg)).digest()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# --- Ray tasks (module-level functions, so they pickle by reference) --------------------------


def _raw_tables(unit: dict, *, kind: str, opts: storage.StorageOptions, src_cfg) -> Iterator[pa.Table]:
    if kind in ("webdataset", "emoji"):
        yield from sources.read_tar_shard(unit["input"], unit["unit"], opts)
    elif kind == "files":
        yield from sources.read_loose_files(unit["samples"], unit["unit"], opts)
    elif kind == "parquet":
        yield from sources.read_parquet_file(
            unit["input"], unit["unit"], opts, image_column=src_cfg.image_column,
            caption_column=src_cfg.caption_column, key_column=src_cfg.key_column)
    else:
        start, stop = unit["range"]
        for a in range(start, stop, 250):
            yield sources.render_shapes(list(range(a, min(stop, a + 250))), shapes_cfg=src_cfg.shapes,
                                        image_size=src_cfg.shapes.image_size)


def _part_uri(gen_uri: str, unit: int, split: str) -> str:
    return storage.join(gen_uri, "parts", f"{unit:06d}-{split}.parquet")


def _marker_uri(gen_uri: str, unit: int) -> str:
    return storage.join(gen_uri, "parts", f"{unit:06d}.json")


def process_unit(unit: dict, *, kind: str, src_cfg, rules: preprocess.Rules, gen_uri: str, near_dup: bool,
                 run_id: str, opts: storage.StorageOptions, fault: str = "",
                 heldout: HeldOut | None = None) -> dict:
    """Read one unit, process every sample, write its kept rows as one Parquet part per split,
    then its marker. Returns the marker: per-split kept counts and per-reason skip counts."""
    writers: dict[str, tuple[pa.BufferOutputStream, pq.ParquetWriter]] = {}
    kept: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for raw in _raw_tables(unit, kind=kind, opts=opts, src_cfg=src_cfg):
        if fault == f"exit:{unit['unit']}":
            os._exit(3)  # a worker dying mid-unit, for the resume tests
        if fault == f"sleep:{unit['unit']}":
            time.sleep(600)  # a unit still running when the test kills the driver
        table = preprocess.process_table(raw, rules)
        if heldout is not None:
            table = heldout.apply(table)
        for c in pc.value_counts(table.column("reason")).to_pylist():
            if c["values"]:
                reasons[c["values"]] = reasons.get(c["values"], 0) + c["counts"]
        table = table.filter(pc.equal(table.column("reason"), ""))
        for split in pc.unique(table.column("split")).to_pylist():
            rows = table.filter(pc.equal(table.column("split"), split))
            images = rows.column("image").to_pylist()
            hashes = [preprocess.dhash(b) for b in images] if near_dup else [(None, None)] * len(images)
            part = pa.table({"key": rows.column("key"), "order": rows.column("order"), "image": images,
                             "caption": rows.column("caption"), "meta": rows.column("meta"),
                             "dhash": pa.array([h[0] for h in hashes], pa.int64()),
                             "dhash_rgb": pa.array([h[1] for h in hashes], pa.binary())}, schema=PART_SCHEMA)
            if split not in writers:
                sink = pa.BufferOutputStream()
                writers[split] = (sink, pq.ParquetWriter(sink, PART_SCHEMA, compression="none"))
            writers[split][1].write_table(part)
            kept[split] = kept.get(split, 0) + part.num_rows
    for split, (sink, writer) in writers.items():
        writer.close()
        storage.write_bytes(_part_uri(gen_uri, unit["unit"], split), sink.getvalue().to_pybytes(), opts)
    marker = {"unit": unit["unit"], "input": unit["input"], "kept": kept, "skipped": reasons, "run": run_id}
    storage.write_json(_marker_uri(gen_uri, unit["unit"]), marker, opts)
    return marker


def read_part(uri: str, opts: storage.StorageOptions, *, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file written by this job; only the named columns' bytes are read (ranged reads
    on object stores), so the key and caption passes never read an image."""
    fs, path = storage.resolve(uri, opts)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except OSError as e:
        raise storage.StorageError(f"{uri}: cannot read ({e})") from None


def _bucket_of(values: pa.ChunkedArray, partitions: int) -> pa.Array:
    if pa.types.is_integer(values.type):
        return pc.cast(pc.modulo(values, partitions), pa.int32())  # sign of the divisor: >= 0
    return pa.array([zlib.crc32(v.encode()) % partitions for v in values.to_pylist()], pa.int32())


def hash_bands(hashes: np.ndarray, bands: int = CANDIDATE_BANDS) -> list[np.ndarray]:
    """The 64-bit hashes cut into `bands` bands, each tagged with its band number: two hashes that
    differ in fewer than `bands` bits agree exactly on at least one band (pigeonhole)."""
    u = hashes.astype(np.int64).view(np.uint64)
    edges = np.linspace(0, 64, bands + 1).astype(int)
    out = []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        band = (u >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        out.append((band | np.uint64(b << 56)).view(np.int64))
    return out


def map_keys(parts: list[tuple[int, str, str]], *, column: str, partitions: int, out_uri: str,
             exclude: dict[int, list[str]], opts: storage.StorageOptions,
             confirm: str | None = None) -> list[tuple[int, str]]:
    """Keys only: (value, order, unit, split) of each part's rows, minus rows already dropped,
    split into `partitions` files by a hash of the value; returns (partition, file URI) of each
    file written. With `confirm` (perceptual hashes), one row per band of the hash, carrying the
    `confirm` column's hash that decides. The files go to storage, not the object store, so that
    holds nothing that grows with the input."""
    tables = []
    for unit, split, uri in parts:
        t = read_part(uri, opts, columns=[column, "order", *([confirm] if confirm else [])])
        gone = _dropped_orders(exclude.get(unit, []), split, opts)
        if gone is not None:
            t = t.filter(pc.invert(pc.is_in(t.column("order"), value_set=gone)))
        t = t.filter(pc.is_valid(t.column(column)))
        tables.append(t.rename_columns(["value", "order", *(["hash"] if confirm else [])])
                      .append_column("unit", pa.array([unit] * t.num_rows, pa.int32()))
                      .append_column("split", pa.array([split] * t.num_rows, pa.string())))
    whole = pa.concat_tables(tables) if tables else pa.table({"value": pa.array([], pa.string())})
    if confirm and whole.num_rows:
        bands = hash_bands(whole.column("value").to_numpy())
        whole = pa.concat_tables([whole.set_column(0, "value", pa.array(band)) for band in bands])
    bucket = _bucket_of(whole.column("value"), partitions) if partitions > 1 else None
    written = []
    for p in range(partitions):
        mine = whole if bucket is None else whole.filter(pc.equal(bucket, p))
        if mine.num_rows:
            buf = pa.BufferOutputStream()
            pq.write_table(mine, buf)
            uri = storage.join(out_uri, f"p{p:04d}-{parts[0][0]:06d}.parquet")
            storage.write_bytes(uri, buf.getvalue().to_pybytes(), opts)
            written.append((p, uri))
    return written


def _near_repeats(hashes: list[bytes], same: np.ndarray, max_bits: int) -> np.ndarray:
    """For rows 1..n-1 sorted by (band value, order): is an earlier row of the same band value
    within max_bits bits of this row's (colour) hash?"""
    out = np.zeros(len(same), bool)
    starts = np.flatnonzero(np.r_[True, ~same])  # group starts, as row indices
    ends = np.r_[starts[1:], len(hashes)]
    groups = np.flatnonzero(ends - starts > 1)
    if not len(groups):
        return out
    width = len(hashes[0])
    h = np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), width)
    for g in groups:
        a, b = starts[g], ends[g]
        for i in range(a + 1, b):
            if (np.bitwise_count(h[a:i] ^ h[i]).sum(axis=1) <= max_bits).any():
                out[i - 1] = True
    return out


def reduce_keys(partition: int, uris: list[str], *, reason: str, drops_uri: str,
                opts: storage.StorageOptions, max_bits: int | None = None) -> list[tuple[int, str, int]]:
    """One hash partition: every occurrence of a value after its first (lowest input order) is
    dropped. With a "hash" column (banded perceptual hashes, see map_keys), a row is dropped when
    its hash is within max_bits bits of an earlier row's that shares the band value. Writes the
    drops per unit; returns (unit, split, count) per unit and split (in band mode a row found in
    several bands is counted by each partition that found it)."""
    if not uris:
        return []
    t = pa.concat_tables([read_part(u, opts) for u in uris])
    t = t.sort_by([("value", "ascending"), ("order", "ascending")])
    values = t.column("value").combine_chunks()
    repeat = pc.equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    if "hash" in t.column_names:
        repeat = _near_repeats(t.column("hash").to_pylist(), repeat, max_bits or 0)
    drops = t.slice(1).filter(pa.array(repeat)).select(["unit", "split", "order"])
    drops = drops.group_by(["unit", "split", "order"]).aggregate([])  # a row once per partition
    counts = []
    for unit in pc.unique(drops.column("unit")).to_pylist():
        mine = drops.filter(pc.equal(drops.column("unit"), unit))
        buf = pa.BufferOutputStream()
        pq.write_table(mine.select(["split", "order"]), buf)
        storage.write_bytes(storage.join(drops_uri, reason, f"{unit:06d}-{partition:04d}.parquet"),
                            buf.getvalue().to_pybytes(), opts)
        for c in pc.value_counts(mine.column("split")).to_pylist():
            counts.append((unit, c["values"], c["counts"]))
    return counts


def count_drops(files: dict[int, list[str]], *, opts: storage.StorageOptions) -> list[tuple[int, str, int]]:
    """(unit, split, rows) dropped, each row once however many drop files name it."""
    counts = []
    for unit, uris in files.items():
        t = pa.concat_tables([read_part(u, opts) for u in uris])
        t = t.group_by(["split", "order"]).aggregate([])
        counts += [(unit, c["values"], c["counts"]) for c in pc.value_counts(t.column("split")).to_pylist()]
    return counts


def _dropped_orders(drop_uris: list[str], split: str, opts: storage.StorageOptions) -> pa.Array | None:
    if not drop_uris:
        return None
    orders = []
    for uri in drop_uris:
        t = read_part(uri, opts)
        orders.append(t.filter(pc.equal(t.column("split"), split)).column("order").combine_chunks())
    return pa.concat_arrays(orders)


def write_shards(shards: list[tuple[str, list[tuple[int, int, int]]]], *, split: str,
                 parts: dict[int, str], drops: dict[int, list[str]], image_ext: str,
                 opts: storage.StorageOptions) -> int:
    """Consecutive shards of one split, each from (unit, start, stop) slices of the units'
    publishable rows (kept, not dropped); reads each part once."""
    cached: tuple[int, pa.Table] | None = None
    written = 0
    for uri, slices in shards:
        samples = []
        for unit, start, stop in slices:
            if cached is None or cached[0] != unit:
                t = read_part(parts[unit], opts, columns=["key", "order", "image", "caption", "meta"])
                gone = _dropped_orders(drops.get(unit, []), split, opts)
                if gone is not None:
                    t = t.filter(pc.invert(pc.is_in(t.column("order"), value_set=gone)))
                cached = (unit, t)
            rows = cached[1].slice(start, stop - start)
            columns = (rows.column(c).to_pylist() for c in ("key", "image", "caption", "meta"))
            for key, image, caption, meta in zip(*columns, strict=True):
                samples.append((key, {image_ext: image, "txt": caption.encode("utf-8"),
                                      "json": meta.encode("utf-8")}))
        storage.write_bytes(uri, write_tar(samples), opts)
        written += len(samples)
    return written


def tokenizer_from_parts(part_uris: list[str], *, limit: int, vocab_size: int, min_frequency: int,
                         lowercase: bool, opts: storage.StorageOptions) -> str:
    """The caption tokenizer from the first `limit` training captions (caption columns only)."""
    def captions() -> Iterator[str]:
        n = 0
        for uri in part_uris:
            for c in read_part(uri, opts, columns=["caption"]).column("caption").to_pylist():
                if n >= limit:
                    return
                n += 1
                yield c

    return train_tokenizer(captions(), vocab_size=vocab_size, min_frequency=min_frequency,
                           lowercase=lowercase).to_str()


# --- the job ----------------------------------------------------------------------------------


def existing_manifest(cfg: TesseraConfig) -> dict | None:
    return published.existing(cfg.paths.data, _options(cfg))


def run_prepare(cfg: TesseraConfig) -> dict:
    """Run the prepare job on the current Ray cluster; returns the manifest."""
    started = time.time()
    files = preflight(cfg)
    old = existing_manifest(cfg)
    if old is not None and not cfg.data.overwrite:
        log.info("%s already holds a prepared dataset (%s); set data.overwrite=true to redo it",
                 cfg.paths.data, {s: v["num_samples"] for s, v in old["splits"].items()})
        return old
    return _Prepare(cfg, files, old).run(started)


class _Prepare:
    def __init__(self, cfg: TesseraConfig, files: list[str], old: dict | None) -> None:
        self.cfg, self.files, self.old = cfg, files, old
        self.opts = _options(cfg)
        self.units = units_of(cfg, files)
        self.heldout = HeldOut.load(cfg.data.heldout, self.opts)
        self.run_id = uuid.uuid4().hex[:12]

    def run(self, started: float) -> dict:
        import ray

        cfg, opts = self.cfg, self.opts
        generation = self._generation()
        gen_uri = storage.join(cfg.paths.data, generation)
        markers = self._process(gen_uri)

        reasons: dict[str, int] = {}
        kept = {s: [0] * len(self.units) for s in SPLITS}
        for m in markers:
            for r, n in m["skipped"].items():
                reasons[r] = reasons.get(r, 0) + n
            for s, n in m["kept"].items():
                kept[s][m["unit"]] = n
        parts = {s: {u: _part_uri(gen_uri, u, s) for u, n in enumerate(kept[s]) if n} for s in SPLITS}

        # Later passes are cheap next to decoding; a resumed run redoes them from the parts.
        for folder in ("drops", "shuffle", *SPLITS):
            storage.remove_tree(storage.join(gen_uri, folder), opts)
        drops_uri = storage.join(gen_uri, "drops")
        columns: list[tuple[str, str, int | None]] = [("key", "duplicate_key", None)]
        if cfg.data.near_duplicates == "dhash":
            columns.append(("dhash", "near_duplicate", cfg.data.near_duplicate_bits))
        dropped = {s: [0] * len(self.units) for s in SPLITS}
        drop_files: dict[int, list[str]] = {}
        for column, reason, max_bits in columns:
            counts = self._dedup(parts, rows=sum(map(sum, kept.values())), column=column, reason=reason,
                                 drops_uri=drops_uri, shuffle_uri=storage.join(gen_uri, "shuffle", reason),
                                 exclude=drop_files, max_bits=max_bits)
            reasons[reason] = sum(n for _, _, n in counts)
            for unit, split, n in counts:
                dropped[split][unit] += n
            drop_files = self._drop_files(drops_uri)
        publishable = {s: [k - d for k, d in zip(kept[s], dropped[s], strict=True)] for s in SPLITS}

        splits = self._write(gen_uri, generation, publishable, parts, drop_files)

        # The tokenizer learns from a bounded sample of training captions, read from the parts'
        # caption columns (no image is read again), in a task so the driver stays small.
        train_parts = [parts["train"][u] for u in sorted(parts["train"])]
        tok_cfg = cfg.tokenizer
        tok_task = ray.remote(num_cpus=1, max_retries=cfg.data.task_retries)(tokenizer_from_parts)
        tok_json = ray.get(tok_task.remote(train_parts, limit=tok_cfg.max_training_captions,
                                           vocab_size=tok_cfg.vocab_size, min_frequency=tok_cfg.min_frequency,
                                           lowercase=tok_cfg.lowercase, opts=opts))
        # Inside the generation, like the shards: a re-prepare that fails before its manifest
        # leaves the published dataset's tokenizer as its manifest's sha256 says.
        storage.write_text(storage.join(gen_uri, TOKENIZER), tok_json, opts)

        manifest = self._manifest(generation, splits, reasons, tok_json, time.time() - started)
        published.publish(cfg.paths.data, manifest, opts, self.old)
        for folder in ("parts", "drops", "shuffle"):  # the shards' raw material, not in the manifest
            storage.remove_tree(storage.join(gen_uri, folder), opts)
        return manifest

    def _generation(self) -> str:
        """The unfinished generation to resume (same inputs and data settings), else a new one;
        every other unpublished generation is garbage from a crashed or superseded run."""
        cfg, opts = self.cfg, self.opts
        fingerprint = _fingerprint(cfg, self.units)
        published_gen = self.old["generation"] if self.old else None
        # The published generation and the one it replaced (jobs may still read it) are never
        # resumed, which would rewrite them, nor cleared.
        alive = published.retained(self.old)
        resume = None
        for name in reversed(published.generation_names(cfg.paths.data, opts)):
            if name in alive or resume is not None:
                continue
            spec_uri = storage.join(cfg.paths.data, name, RUN_SPEC)
            try:
                spec = storage.read_json(spec_uri, opts) if storage.exists(spec_uri, opts) else {}
            except storage.StorageError:
                spec = {}
            if spec.get("fingerprint") == fingerprint:
                resume = name
        published.clear_unpublished_generations(cfg.paths.data, opts, keep=[*alive, resume])
        if published_gen:  # raw material a run that died right after publishing left behind
            for folder in ("parts", "drops", "shuffle"):
                storage.remove_tree(storage.join(cfg.paths.data, published_gen, folder), opts)
        if resume is not None:
            log.info("resuming the unfinished generation %s", resume)
            return resume
        generation = published.new_generation()
        storage.write_json(storage.join(cfg.paths.data, generation, RUN_SPEC),
                           {"fingerprint": fingerprint, "inputs": len(self.units), "run": self.run_id,
                            "created": published.now_utc()}, opts)
        return generation

    def _finished(self, gen_uri: str) -> dict[int, dict]:
        """The markers of units finished earlier in this generation (read 16 at a time: a resume
        at web scale reads thousands)."""
        from concurrent.futures import ThreadPoolExecutor

        def read(uri: str) -> dict:
            try:
                return storage.read_json(uri, self.opts)
            except storage.StorageError:
                return {}

        uris = storage.list_files(storage.join(gen_uri, "parts"), self.opts, suffixes=(".json",))
        with ThreadPoolExecutor(16) as pool:
            markers = list(pool.map(read, uris))
        found = {}
        for m in markers:
            unit = m.get("unit")
            known = isinstance(unit, int) and 0 <= unit < len(self.units)
            if known and m.get("input") == self.units[unit]["input"]:
                found[unit] = m
        return found

    def _process(self, gen_uri: str) -> list[dict]:
        """Stage 1: every unit without a marker, a bounded number of tasks in flight."""
        import ray

        cfg = self.cfg
        finished = self._finished(gen_uri)
        todo = [u for u in self.units if u["unit"] not in finished]
        self.reused, self.processed = len(finished), len(todo)
        if finished:
            log.info("%d of %d inputs already prepared in this generation; processing the other %d",
                     len(finished), len(self.units), len(todo))
        task = ray.remote(num_cpus=1, max_retries=cfg.data.task_retries)(process_unit)
        kw = dict(kind=cfg.data.source.kind, src_cfg=cfg.data.source,
                  rules=preprocess.Rules.from_config(cfg.data), gen_uri=gen_uri,
                  near_dup=cfg.data.near_duplicates == "dhash", run_id=self.run_id,
                  opts=self.opts, fault=os.environ.get(FAULT_ENV, ""), heldout=self.heldout)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict = {}
        failure: tuple[dict, BaseException] | None = None
        started, done, samples = time.time(), 0, 0
        queue = iter(todo)
        while True:
            while failure is None and len(pending) < window and (unit := next(queue, None)) is not None:
                pending[task.remote(unit, **kw)] = unit
            if not pending:
                break
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ref)
            try:
                marker = ray.get(ref)
            except Exception as e:  # a worker died or the unit raised: finish what runs, then stop
                failure = failure or (unit, e)
                continue
            finished[marker["unit"]] = marker
            done += 1
            samples += sum(marker["kept"].values()) + sum(marker["skipped"].values())
            if done == len(todo) or done % max(1, len(todo) // 10) == 0:
                log.info("processed %d/%d inputs (%.0f samples/s)", done, len(todo),
                         samples / max(1e-9, time.time() - started))
        if failure is not None:
            unit, err = failure
            raise PrepareStopped(
                f"prepare stopped: input {unit['input']} failed ({type(err).__name__}: {str(err)[:300]}). "
                f"{len(finished)} of {len(self.units)} inputs are finished in this generation; run the "
                f"same prepare again to process only the rest.") from err
        return [finished[u["unit"]] for u in self.units]

    def _dedup(self, parts: dict[str, dict[int, str]], *, rows: int, column: str, reason: str,
               drops_uri: str, shuffle_uri: str, exclude: dict[int, list[str]],
               max_bits: int | None) -> list[tuple[int, str, int]]:
        """Stage 2: a hash-partitioned pass over `column` only; every later occurrence dropped
        (with max_bits: every row within max_bits bits of an earlier row's perceptual hash)."""
        import ray

        listed = sorted((u, s, uri) for s in SPLITS for u, uri in parts[s].items())
        if not listed:
            return []
        # Enough partitions to use the cluster and keep each under ~250 k keys.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        partitions = max(1, min(256, len(listed), max(cpus, -(-rows // 250_000))))
        mapper = ray.remote(num_cpus=1, max_retries=self.cfg.data.task_retries)(map_keys)
        reducer = ray.remote(num_cpus=1, max_retries=self.cfg.data.task_retries)(reduce_keys)
        outs = []
        for i in range(0, len(listed), PARTS_PER_KEY_TASK):
            chunk = listed[i:i + PARTS_PER_KEY_TASK]
            ex = {u: exclude[u] for u, _, _ in chunk if u in exclude}
            confirm = "dhash_rgb" if max_bits is not None else None
            outs.append(mapper.remote(chunk, column=column, partitions=partitions, out_uri=shuffle_uri,
                                      exclude=ex, opts=self.opts, confirm=confirm))
        files: dict[int, list[str]] = {p: [] for p in range(partitions)}
        for written in ray.get(outs):
            for p, uri in written:
                files[p].append(uri)
        counts = ray.get([reducer.remote(p, files[p], reason=reason, drops_uri=drops_uri, opts=self.opts,
                                         max_bits=max_bits) for p in range(partitions)])
        if max_bits is not None:  # one row can be found in several bands, so in several partitions
            files = {u: [f for f in found if f"/{reason}/" in f]
                     for u, found in self._drop_files(drops_uri).items()}
            units = sorted(u for u, found in files.items() if found)
            counter = ray.remote(num_cpus=1, max_retries=self.cfg.data.task_retries)(count_drops)
            counts = ray.get([counter.remote({u: files[u] for u in units[i:i + 64]}, opts=self.opts)
                              for i in range(0, len(units), 64)])
        return [c for part in counts for c in part]

    def _drop_files(self, drops_uri: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for uri in storage.list_files(drops_uri, self.opts, suffixes=(".parquet",)):
            out.setdefault(int(uri.rsplit("/", 1)[-1].split("-", 1)[0]), []).append(uri)
        return out

    def _write(self, gen_uri: str, generation: str, publishable: dict[str, list[int]],
               parts: dict[str, dict[int, str]], drops: dict[int, list[str]]) -> dict[str, dict]:
        """Stage 3: exact-size shards planned over the units' publishable counts; consecutive
        shards go to one task so that each part is read about once."""
        import ray

        cfg = self.cfg
        task = ray.remote(num_cpus=1, max_retries=cfg.data.task_retries)(write_shards)
        per_shard = cfg.data.samples_per_shard
        pending, splits = [], {}
        for split in SPLITS:
            counts = publishable[split]
            if split == "heldout" and not sum(counts):
                continue
            shards = plan.plan_shards(counts, per_shard)
            entries, jobs = [], []
            for i, slices in enumerate(shards):
                rel = f"{generation}/{split}/{plan.shard_name(i)}"
                entries.append({"path": rel, "num_samples": sum(s.stop - s.start for s in slices)})
                jobs.append((storage.join(cfg.paths.data, rel), [(s.block, s.start, s.stop) for s in slices]))
            splits[split] = {"num_samples": sum(counts), "shards": entries}
            rows_per_part = max(counts) if counts else 0
            group = max(1, -(-rows_per_part // per_shard))
            for i in range(0, len(jobs), group):
                batch = jobs[i:i + group]
                units = {u for _, slices in batch for u, _, _ in slices}
                pending.append(task.remote(batch, split=split, parts={u: parts[split][u] for u in units},
                                           drops={u: drops[u] for u in units if u in drops},
                                           image_ext=cfg.data.image_format, opts=self.opts))
        total, done = len(pending), 0
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            ray.get(finished)
            done += 1
            if done == total or done % max(1, total // 10) == 0:
                log.info("wrote %d/%d shard groups", done, total)
        return splits

    def _manifest(self, generation: str, splits: dict, reasons: dict[str, int], tok_json: str,
                  wall: float) -> dict:
        from tessera.data.tokenizer import CaptionTokenizer

        cfg = self.cfg
        kept_total = sum(s["num_samples"] for s in splits.values())
        skipped = {r: int(reasons.get(r, 0)) for r in preprocess.REASONS}
        # File-level damage rows stand for a file, not a sample.
        input_samples = kept_total + sum(n for r, n in skipped.items() if r not in FILE_LEVEL_REASONS)
        manifest = {
            **published.header(MANIFEST_KIND, generation=generation),
            "source": {"kind": cfg.data.source.kind, "uri": cfg.data.source.uri,
                       "num_files": len(self.files)},
            "resolution": cfg.data.resolution,
            "image_format": cfg.data.image_format,
            "samples_per_shard": cfg.data.samples_per_shard,
            "input_samples": int(input_samples),
            "kept_samples": int(kept_total),
            "splits": splits,
            "skipped": skipped,
            "skip_reasons": {r: preprocess.REASONS[r] for r in skipped},
            "tokenizer": {"path": f"{generation}/{TOKENIZER}",
                          "vocab_size": CaptionTokenizer.from_json(tok_json).vocab_size,
                          "sha256": hashlib.sha256(tok_json.encode()).hexdigest()},
            "work": {"units": len(self.units), "reused_units": self.reused, "processed_units": self.processed,
                     "near_duplicates": cfg.data.near_duplicates,
                     "near_duplicate_bits": cfg.data.near_duplicate_bits},
            "wall_time_s": round(wall, 2),
            "rows_per_s": round(input_samples / wall, 1) if wall > 0 else None,
            "config": cfg.model_dump(mode="json"),
        }
        if cfg.data.source.kind == "shapes":
            from tessera.data import shapes

            held = cfg.data.source.shapes.held_out
            pairs = shapes.validate_held_out(held) if held is not None else shapes.DEFAULT_HELD_OUT
            manifest["shapes"] = {"held_out": sorted(f"{c} {s}" for c, s in pairs)}
        if self.heldout is not None:
            manifest["heldout"] = self.heldout.describe(cfg.data.heldout)
            if "heldout" not in splits:
                log.warning("data.heldout named no sample of this dataset: no held-out split")
        return manifest


def summarize(manifest: dict) -> str:
    lines = [f"prepared dataset ({manifest['source']['kind']}) at {manifest['resolution']}px, "
             f"generation {manifest['generation']}"]
    for name, s in manifest["splits"].items():
        lines.append(f"  {name:8s} {s['num_samples']:>9,d} samples in {len(s['shards'])} shards")
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append(f"  input    {manifest['input_samples']:>9,d} samples; kept {manifest['kept_samples']:,d}; "
                 f"skipped {json.dumps(skipped) if skipped else 'none'}")
    if manifest.get("work", {}).get("reused_units"):
        w = manifest["work"]
        lines.append(f"  resumed: {w['reused_units']} of {w['units']} inputs were finished by an earlier run")
    lines.append(f"  tokenizer: {manifest['tokenizer']['vocab_size']} tokens")
    lines.append(f"  wall time {manifest['wall_time_s']:.1f} s ({manifest['rows_per_s']} rows/s)")
    return "\n".join(lines)
