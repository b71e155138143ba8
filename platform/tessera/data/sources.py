"""Readers for the sources, each turning one input file (a WebDataset tar, a Parquet file), a run of
loose files or a range of procedural indices into Arrow tables of RAW_SCHEMA rows. No Ray here:
prepare.py maps these over the cluster, and tests call them directly. (The emoji source is
written as WebDataset tars first, by tessera.data.emoji, then read as one.)

File-level damage becomes a row too (reason set, no image), so it is counted like any other skip
instead of failing the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from tessera import storage
from tessera.config import ConfigError
from tessera.data.preprocess import IMAGE_EXTS, RAW_SCHEMA
from tessera.data.tar import TarReadResult, iter_tar_samples

ROWS_PER_TABLE = 256
# Files a sample might carry as its "image" that we recognise in order to report them as
# unsupported rather than as missing.
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "ico", "ppm", "pgm", "avif", "heic", "jp2")
# A loose-files source (kind files) lists these names; nothing else in its folders is read.
LOOSE_SUFFIXES = tuple(f".{e}" for e in (*IMAGE_EXTS, *OTHER_IMAGE_EXTS, "txt", "json"))
LOOSE_PER_UNIT = 1_000  # samples per prepare task
LOOSE_READERS = 16  # files read at once: an object store answers each GET in tens of ms


class _Rows:
    """Accumulates RAW_SCHEMA rows and emits Arrow tables of bounded size."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {n: [] for n in RAW_SCHEMA.names}

    def add(self, **row) -> None:
        for n in RAW_SCHEMA.names:
            self.cols[n].append(row.get(n))

    def __len__(self) -> int:
        return len(self.cols["key"])

    def flush(self) -> pa.Table:
        table = pa.table(self.cols, schema=RAW_SCHEMA)
        self.cols = {n: [] for n in RAW_SCHEMA.names}
        return table


def _order(file_index: int, position: int) -> int:
    return (file_index << 32) | position


def _shard_name(uri: str) -> str:
    return PurePosixPath(uri.split("://", 1)[-1]).name


def read_tar_shard(uri: str, file_index: int, options: storage.StorageOptions) -> Iterator[pa.Table]:
    """img2dataset layout: {key}.jpg|png|webp + {key}.txt (+ {key}.json)."""
    rows = _Rows()
    result = TarReadResult()
    try:
        fs, path = storage.resolve(uri, options)
        stream = fs.open_input_stream(path)
    except OSError as e:
        rows.add(key=_shard_name(uri), order=_order(file_index, 0), reason="unreadable_file",
                 meta=json.dumps({"file": uri, "error": str(e)[:200]}))
        yield rows.flush()
        return
    with stream:
        for sample in iter_tar_samples(stream, result):
            files = sample.files
            image_ext = next((e for e in IMAGE_EXTS if e in files), None)
            image_ext = image_ext or next((e for e in OTHER_IMAGE_EXTS if e in files), None)
            meta: dict = {"source": f"{_shard_name(uri)}/{sample.key}"}
            if "json" in files:
                try:
                    extra = json.loads(files["json"])
                    if isinstance(extra, dict):
                        meta["source_meta"] = extra
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass  # img2dataset metadata is optional; a broken one is not worth a sample
            rows.add(
                key=sample.key,
                order=_order(file_index, sample.position),
                image=files.get(image_ext) if image_ext else None,
                caption=files.get("txt"),
                meta=json.dumps(meta),
            )
            if len(rows) >= ROWS_PER_TABLE:
                yield rows.flush()
    if result.truncated:
        rows.add(key=_shard_name(uri), order=_order(file_index, (1 << 32) - 1), reason="truncated_shard",
                 meta=json.dumps({"file": uri, "error": result.error}))
    if len(rows):
        yield rows.flush()


def group_loose_files(uri: str, files: list[str], options: storage.StorageOptions) -> list[list]:
    """[key, {ext: file URI}] of each sample of a loose-files source, in listing order. A key is the
    file's path below its root (a comma-separated part of `uri`) up to the last dot of its name:
    unlike a tar member's, a loose file's name can hold dots ("photo.v2.jpg" + "photo.v2.txt").
    Names with neither an image nor a caption (img2dataset's {shard}_stats.json) are not samples."""
    roots = []
    for part in (p.strip() for p in uri.split(",") if p.strip()):
        roots.append(storage.to_uri(part, storage.resolve(part, options)[1]).rstrip("/") + "/")
    samples: dict[tuple[int, str], dict[str, str]] = {}
    for f in files:
        at = next((i for i, r in enumerate(roots) if f.startswith(r)), -1)
        rel = f[len(roots[at]):] if at >= 0 else _shard_name(f)
        folder, _, name = rel.rpartition("/")
        stem, _, ext = name.rpartition(".")
        samples.setdefault((at, f"{folder}/{stem}" if folder else stem), {})[ext.lower()] = f
    return [[key, found] for (_, key), found in samples.items()
            if "txt" in found or any(e in found for e in (*IMAGE_EXTS, *OTHER_IMAGE_EXTS))]


def read_loose_files(samples: list[list], file_index: int,
                     options: storage.StorageOptions) -> Iterator[pa.Table]:
    """img2dataset's `files` layout: {key}.jpg|png|webp + {key}.txt (+ {key}.json), one file each;
    `samples` from group_loose_files. A sample whose image or caption file cannot be read (gone
    since it was listed, no permission) is counted as unreadable_file; the rest are judged as
    a tar's samples are."""

    def read(uri: str) -> tuple[bytes | None, str]:
        try:
            return storage.read_bytes(uri, options), ""
        except storage.StorageError as e:
            return None, str(e)[:200]

    with ThreadPoolExecutor(LOOSE_READERS) as pool:
        for start in range(0, len(samples), ROWS_PER_TABLE):
            chunk = samples[start:start + ROWS_PER_TABLE]
            wanted = []  # (index in chunk, extension) of each file to read
            for i, (_, files) in enumerate(chunk):
                image_ext = next((e for e in (*IMAGE_EXTS, *OTHER_IMAGE_EXTS) if e in files), None)
                wanted += [(i, e) for e in (image_ext, "txt", "json") if e in files]
            got: list[dict[str, tuple[bytes | None, str]]] = [{} for _ in chunk]  # per sample: ext -> read
            results = pool.map(read, [chunk[i][1][e] for i, e in wanted])
            for (i, e), result in zip(wanted, results, strict=True):
                got[i][e] = result
            rows = _Rows()
            for i, ((key, files), mine) in enumerate(zip(chunk, got, strict=True)):
                order = _order(file_index, start + i)
                failed = [(files[e], err) for e, (data, err) in mine.items() if data is None and e != "json"]
                if failed:
                    rows.add(key=key, order=order, reason="unreadable_file",
                             meta=json.dumps({"file": failed[0][0], "error": failed[0][1]}))
                    continue
                image_ext = next((e for e in mine if e not in ("txt", "json")), None)
                meta: dict = {"source": f"{key}.{image_ext or 'txt'}"}
                extra = _json_object(mine.get("json", (None, ""))[0])
                if extra is not None:
                    meta["source_meta"] = extra
                rows.add(key=key, order=order, image=mine[image_ext][0] if image_ext else None,
                         caption=mine.get("txt", (None, ""))[0], meta=json.dumps(meta))
            yield rows.flush()


def _json_object(data: bytes | None) -> dict | None:
    """img2dataset metadata is optional; a broken one is not worth a sample."""
    if data is None:
        return None
    try:
        extra = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return extra if isinstance(extra, dict) else None


def check_parquet_columns(uri: str, options: storage.StorageOptions, *, columns: list[str]) -> None:
    """Fail before work starts when a configured column is missing, naming file and column."""
    fs, path = storage.resolve(uri, options)
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid) as e:
        raise storage.StorageError(f"{uri}: cannot read Parquet schema ({e})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ConfigError(
            f"{uri}: column(s) {missing} not found; it has {schema.names}. "
            "Set data.source.image_column / caption_column / key_column."
        )


def read_parquet_file(
    uri: str,
    file_index: int,
    options: storage.StorageOptions,
    *,
    image_column: str,
    caption_column: str,
    key_column: str | None,
) -> Iterator[pa.Table]:
    """LAION / img2dataset Parquet: one row per sample with image bytes and a caption."""
    rows = _Rows()
    stem = PurePosixPath(_shard_name(uri)).stem
    seen = 0
    try:
        fs, path = storage.resolve(uri, options)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=ROWS_PER_TABLE):
                cols = batch.to_pydict()
                extra = [
                    n for n in batch.schema.names
                    if n not in (image_column, caption_column)
                    and not pa.types.is_binary(batch.schema.field(n).type)
                    and not pa.types.is_large_binary(batch.schema.field(n).type)
                    and not pa.types.is_nested(batch.schema.field(n).type)
                ]
                for i in range(batch.num_rows):
                    caption = cols[caption_column][i]
                    if isinstance(caption, str):
                        caption = caption.encode("utf-8")
                    key = cols[key_column][i] if key_column else None
                    key = str(key) if key is not None else f"{stem}-{seen:09d}"
                    meta = {"source": f"{_shard_name(uri)}#{seen}",
                            "source_meta": {n: cols[n][i] for n in extra}}
                    rows.add(key=key, order=_order(file_index, seen), image=cols[image_column][i],
                             caption=caption, meta=json.dumps(meta, default=str))
                    seen += 1
                if len(rows) >= ROWS_PER_TABLE:
                    yield rows.flush()
    except (OSError, pa.ArrowException, KeyError) as e:
        rows.add(key=stem, order=_order(file_index, (1 << 32) - 1), reason="unreadable_file",
                 meta=json.dumps({"file": uri, "after_rows": seen, "error": str(e)[:200]}))
    if len(rows):
        yield rows.flush()


def render_shapes(indices: list[int], *, shapes_cfg, image_size: int) -> pa.Table:
    """Procedural samples: indices < num_samples are training-eligible draws (no held-out
    combination), the next num_heldout indices are the held-out split."""
    from tessera.data import shapes

    held_out = (shapes.validate_held_out(shapes_cfg.held_out) if shapes_cfg.held_out is not None
                else shapes.DEFAULT_HELD_OUT)
    rows = _Rows()
    for idx in indices:
        heldout = idx >= shapes_cfg.num_samples
        local = idx - shapes_cfg.num_samples if heldout else idx
        s = shapes.render_sample(local, seed=shapes_cfg.seed, image_size=image_size,
                                 split="heldout" if heldout else "train", held_out=held_out,
                                 max_objects=shapes_cfg.max_objects)
        rows.add(key=s.key, order=_order(1 if heldout else 0, local), image=s.image_png,
                 caption=s.caption.encode(), meta=json.dumps({"attributes": s.attributes}),
                 split="heldout" if heldout else None)
    return rows.flush()
