"""Per-sample preparation: decode, validate, convert to RGB, resize + centre-crop, re-encode.

Pure functions over Arrow tables (no Ray), so the exact rules are unit-tested and the Ray job
only maps them over blocks. Every sample ends with exactly one outcome: kept, or skipped with the
first reason that applies, in the order of REASONS below.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from tessera.viz import png_bytes

# Skip reasons, in the order they are checked; the manifest counts samples under these names.
REASONS: dict[str, str] = {
    "truncated_shard": "a tar shard ended early or is not a tar; samples before the damage were kept",
    "unreadable_file": "an input file could not be opened or parsed (e.g. corrupt Parquet)",
    "missing_caption": "no caption file/column value",
    "non_utf8_caption": "caption bytes are not UTF-8",
    "empty_caption": "caption is empty or whitespace",
    "caption_too_short": "caption shorter than data.min_caption_chars",
    "caption_too_long": "caption longer than data.max_caption_chars",
    "missing_image": "no image file/column value",
    "empty_file": "the image file has 0 bytes",
    "corrupt_image": "image bytes cannot be decoded (corrupt or truncated)",
    "unsupported_format": "not JPEG, PNG or WebP",
    "decompression_bomb": "declares more pixels than data.max_image_pixels",
    "unsupported_mode": "pixel mode that has no faithful RGB conversion (e.g. 16-bit, float)",
    "too_small": "shorter side below data.min_side",
    "bad_aspect_ratio": "aspect ratio outside [1/max_aspect_ratio, max_aspect_ratio]",
    "duplicate_key": "a sample with the same key was seen earlier in the input",
    "near_duplicate": "its image has the same perceptual hash (dHash) as an earlier sample's "
                      "(only with data.near_duplicates: dhash)",
}

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "MPO"}  # MPO: multi-picture JPEG from phones
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("order", pa.int64()),  # (file index << 32) | position: the input's own order
        ("image", pa.binary()),
        ("caption", pa.binary()),  # raw bytes, so non-UTF-8 input can be recognised
        ("meta", pa.string()),  # JSON object carried into the output's {key}.json
        ("split", pa.string()),  # a source's own split ("heldout"), else null
        ("reason", pa.string()),  # set by a reader for file-level damage, else null
    ]
)

PROCESSED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("order", pa.int64()),
        ("split", pa.string()),
        ("reason", pa.string()),  # "" when kept
        ("image", pa.binary()),  # encoded at the target resolution; null when skipped
        ("caption", pa.string()),
        ("meta", pa.string()),
    ]
)


@dataclass(frozen=True)
class Rules:
    resolution: int
    min_side: int = 0
    max_aspect_ratio: float = 2.0
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    max_image_pixels: int = 50_000_000
    image_format: str = "png"
    jpeg_quality: int = 95
    val_fraction: float = 0.0
    split_seed: int = 0

    @classmethod
    def from_config(cls, data_cfg) -> Rules:
        return cls(**{k: getattr(data_cfg, k) for k in cls.__dataclass_fields__})


def sanitize_key(key: str) -> str:
    """WebDataset splits member names at the first dot and treats '/' as a folder, so output keys
    keep only [A-Za-z0-9_-]."""
    return _KEY_UNSAFE.sub("_", key) or "_"


def clean_caption(raw: bytes | None, rules: Rules) -> tuple[str, str]:
    """-> (caption, reason); reason is "" when the caption is usable."""
    if raw is None:
        return "", "missing_caption"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "non_utf8_caption"
    text = " ".join(text.split())
    if not text:
        return "", "empty_caption"
    if len(text) < rules.min_caption_chars:
        return "", "caption_too_short"
    if len(text) > rules.max_caption_chars:
        return "", "caption_too_long"
    return text, ""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white rather than whatever colour their RGB values hold.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def process_image(data: bytes | None, rules: Rules) -> tuple[bytes | None, tuple[int, int], str]:
    """-> (encoded image at rules.resolution, original (w, h), reason)."""
    if data is None:
        return None, (0, 0), "missing_image"
    if len(data) == 0:
        return None, (0, 0), "empty_file"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError:
            return None, (0, 0), "decompression_bomb"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None, (0, 0), "corrupt_image"
        size = im.size
        if im.format not in SUPPORTED_FORMATS:
            return None, size, "unsupported_format"
        w, h = size
        if w <= 0 or h <= 0:
            return None, size, "corrupt_image"
        if w * h > rules.max_image_pixels:
            return None, size, "decompression_bomb"
        if im.mode not in SUPPORTED_MODES:
            return None, size, "unsupported_mode"
        if min(w, h) < rules.min_side:
            return None, size, "too_small"
        if max(w, h) / min(w, h) > rules.max_aspect_ratio:
            return None, size, "bad_aspect_ratio"
        if im.format == "JPEG":
            # Let libjpeg decode at a reduced scale (still >= the target) when images are large.
            scale = rules.resolution / min(w, h)
            im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        try:
            im.load()
        except Image.DecompressionBombError:
            return None, size, "decompression_bomb"
        except (OSError, SyntaxError, ValueError, EOFError):
            return None, size, "corrupt_image"
    rgb = _to_rgb(im)
    out = ImageOps.fit(rgb, (rules.resolution, rules.resolution), method=Image.Resampling.BICUBIC)
    return encode_image(out, rules), size, ""


def encode_image(im: Image.Image, rules: Rules) -> bytes:
    if rules.image_format == "png":
        return png_bytes(im, compress_level=6)
    buf = io.BytesIO()
    if rules.image_format == "jpg":
        im.save(buf, format="JPEG", quality=rules.jpeg_quality, subsampling=0)
    else:
        im.save(buf, format="WEBP", quality=rules.jpeg_quality, method=4)
    return buf.getvalue()


def dhash(image: bytes) -> tuple[int, bytes]:
    """Difference hashes of an encoded image: the brightness steps left to right of its thumbnail.
    (64-bit grey, as a signed int64; 192-bit colour, 24 bytes.) Re-encoding, recompressing or
    rescaling an image changes few bits (prepare hashes the image after resizing it to the
    dataset's resolution). The grey hash finds candidates cheaply (see prepare.hash_bands); the
    colour hash decides, since unrelated images with similar brightness layouts, common in
    smooth or synthetic pictures, can share most grey bits. (`imagehash` computes the grey one
    with SciPy and PyWavelets as dependencies; numpy needs neither.)"""
    with Image.open(io.BytesIO(image)) as im:
        rgb = np.asarray(im.convert("RGB").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    grey = np.asarray(Image.fromarray(rgb.astype(np.uint8), "RGB").convert("L"), dtype=np.int16)
    bits = np.packbits(grey[:, :-1] < grey[:, 1:]).view(">i8")[0]
    return int(bits), np.packbits(rgb[:, :-1, :] < rgb[:, 1:, :]).tobytes()


def assign_split(key: str, *, val_fraction: float, seed: int) -> str:
    """A stable hash of the key decides, so a sample stays in its split across reruns and
    across changes to the rest of the dataset."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "big") / 2.0**64 < val_fraction else "train"


def process_table(batch: pa.Table, rules: Rules) -> pa.Table:
    """RAW_SCHEMA rows -> PROCESSED_SCHEMA rows, one out per one in."""
    cols = {name: batch.column(name).to_pylist() for name in RAW_SCHEMA.names}
    out: dict[str, list] = {name: [] for name in PROCESSED_SCHEMA.names}
    for i in range(batch.num_rows):
        key = sanitize_key(cols["key"][i] or "")
        reason = cols["reason"][i] or ""
        caption, image, size = "", None, (0, 0)
        if not reason:
            caption, reason = clean_caption(cols["caption"][i], rules)
        if not reason:
            image, size, reason = process_image(cols["image"][i], rules)
        meta = json.loads(cols["meta"][i]) if cols["meta"][i] else {}
        if not reason:
            meta.update(key=key, original_size=list(size))
        split = cols["split"][i] or assign_split(key, val_fraction=rules.val_fraction, seed=rules.split_seed)
        out["key"].append(key)
        out["order"].append(cols["order"][i])
        out["split"].append(split)
        out["reason"].append(reason)
        out["image"].append(image)
        out["caption"].append(caption if not reason else None)
        out["meta"].append(json.dumps(meta, sort_keys=True) if not reason else None)
    return pa.table(out, schema=PROCESSED_SCHEMA)
