"""A small input corpus with one or more samples of every bad kind the prepare job must skip,
written as img2dataset-style WebDataset tars and as LAION-style Parquet. Each builder returns the
exact skip counts and the keys of the good samples, so tests compare counts exactly."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(fmt: str = "JPEG", size=(80, 64), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side: int = 3000) -> bytes:
    """Few bytes on disk, side*side pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7).save(buf, format="PNG")
    return buf.getvalue()


def bad_samples() -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, int]]:
    """(key, files) of every bad kind that lives inside a sample, and the expected counts."""
    jpg = image_bytes()
    samples = [
        ("bad-corrupt", {"jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10, "txt": b"a corrupt image"}),
        ("bad-truncated", {"jpg": image_bytes(size=(200, 160))[:900], "txt": b"a truncated image"}),
        ("bad-zero", {"jpg": b"", "txt": b"a zero byte file"}),
        ("bad-nocaption", {"jpg": jpg}),
        ("bad-emptycaption", {"jpg": jpg, "txt": b"  \n\t "}),
        ("bad-nonutf8", {"jpg": jpg, "txt": b"caf\xe9 \xff\xfe photo"}),
        ("bad-bomb", {"png": bomb_png(), "txt": b"a decompression bomb"}),
        ("bad-gif", {"gif": image_bytes("GIF"), "txt": b"a gif is not supported"}),
        ("bad-bmp", {"jpg": image_bytes("BMP"), "txt": b"a bmp named jpg"}),
        ("bad-16bit", {"png": sixteen_bit_png(), "txt": b"a sixteen bit png"}),
        ("bad-aspect", {"jpg": image_bytes(size=(300, 100)), "txt": b"a very wide image"}),
        ("bad-noimage", {"txt": b"a caption without an image"}),
    ]
    expected = {
        "corrupt_image": 2, "empty_file": 1, "missing_caption": 1, "empty_caption": 1,
        "non_utf8_caption": 1, "decompression_bomb": 1, "unsupported_format": 2, "unsupported_mode": 1,
        "bad_aspect_ratio": 1, "missing_image": 1,
    }
    return samples, expected


def good_samples(n: int, *, prefix: str = "good") -> list[tuple[str, dict[str, bytes]]]:
    fmts = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGBA"), ("webp", "WEBP", "RGB"), ("jpg", "JPEG", "L"),
            ("png", "PNG", "P"), ("jpg", "JPEG", "CMYK")]
    out = []
    for i in range(n):
        ext, fmt, mode = fmts[i % len(fmts)]
        files = {ext: image_bytes(fmt, size=(64 + 8 * (i % 5), 48 + 4 * (i % 7)), mode=mode, seed=i),
                 "txt": f"a photo of thing number {i}".encode(),
                 "json": b'{"url": "http://example.invalid/%d"}' % i}
        out.append((f"{prefix}-{i:05d}", files))
    return out


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_webdataset_corpus(folder: Path) -> tuple[set[str], dict[str, int]]:
    """Three shards: good + every bad kind; good + a repeated key; good then a truncation."""
    folder.mkdir(parents=True, exist_ok=True)
    good = good_samples(30)
    bad, expected = bad_samples()
    (folder / "00000.tar").write_bytes(tar_bytes(good[:10] + bad))
    # The same key twice in a row in one shard, and a key from the first shard again: only the
    # first of each is kept.
    (folder / "00001.tar").write_bytes(tar_bytes(good[10:20] + [good[19], good[0]]))
    # Ten complete samples, then the stream stops inside the next sample's image.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, files in good[20:30] + good_samples(1, prefix="cut"):
            for ext, data in files.items():
                if key.startswith("cut"):
                    cut_at = buf.tell() + 512 + len(data) // 2  # header, then half the data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                if key.startswith("cut"):
                    break
    (folder / "00002.tar").write_bytes(buf.getvalue()[:cut_at])
    (folder / "notes.md").write_text("not a shard; the reader must not try it")
    expected = dict(expected, duplicate_key=2, truncated_shard=1)
    return {k for k, _ in good}, expected


def write_parquet_corpus(folder: Path) -> tuple[set[str], dict[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    good = good_samples(24, prefix="pq")
    bad, expected = bad_samples()
    # Parquet has one image column: samples whose image sits under another extension keep it.
    expected = dict(expected, duplicate_key=1)

    def rows(samples):
        out = {"key": [], "jpg": [], "caption": [], "width": []}
        for key, files in samples:
            img = next((files[e] for e in ("jpg", "png", "webp", "gif") if e in files), None)
            out["key"].append(key)
            out["jpg"].append(img)
            out["caption"].append(files.get("txt"))
            out["width"].append(64)
        return pa.table({"key": pa.array(out["key"]), "jpg": pa.array(out["jpg"], pa.binary()),
                         "caption": pa.array(out["caption"], pa.binary()), "width": pa.array(out["width"])})

    pq.write_table(rows(good[:12] + bad), folder / "part-00000.parquet", row_group_size=7)
    pq.write_table(rows(good[12:] + [good[3]]), folder / "part-00001.parquet")
    return {k for k, _ in good}, expected
