"""PNG encoding and the one image-grid renderer every stage and report draws with (PIL + numpy).

Callers hand over uint8 (H, W, 3) arrays (tessera.models.dvae.to_pixels turns a model's
(B, 3, S, S) float images into them); nothing here knows about models or torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
GOOD, BAD = (30, 160, 60), (210, 40, 40)
CHAR_W = 6  # PIL's default bitmap font: pixels per character, for cutting captions to the width


def png_bytes(image: np.ndarray | Image.Image, **save_options) -> bytes:
    """An (H, W, 3) uint8 array or a PIL image as PNG bytes (`save_options` go to PIL, e.g.
    compress_level)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_options)
    return buf.getvalue()


@dataclass
class GridRow:
    """One row of a grid: an optional caption line above it, then its images left to right."""

    images: list[np.ndarray]  # uint8 (S, S, 3) each
    caption: str | None = None
    tags: list[str] | None = None  # a label above each image
    frames: list[tuple[int, int, int] | None] | None = None  # a coloured frame around each image
    gap_after: set[int] = field(default_factory=set)  # extra space after these columns


def grid_png(rows: list[GridRow], *, scale: int = 1, title: str = "", subtitle: str = "",
             min_width: int = 0) -> bytes:
    """Rows of images, each upscaled ×scale (nearest), under an optional title line."""
    if not rows or not any(r.images for r in rows):
        return png_bytes(Image.new("RGB", (1, 1), WHITE))
    size = next(r.images[0] for r in rows if r.images).shape[0] * scale
    framed = any(r.frames for r in rows)
    frame, gap, text = (3 if framed else 0), (6 if framed else 2), 12
    tile = size + 2 * frame
    tagged = any(r.tags for r in rows)

    def row_width(r: GridRow) -> int:
        return len(r.images) * (tile + gap) + gap * (1 + len(r.gap_after))

    width = max(max(row_width(r) for r in rows), min_width)
    head = (text + 2) * (bool(title) + bool(subtitle))
    row_h = [(text if r.caption is not None else 0) + (text if tagged else 0) + tile + gap for r in rows]
    canvas = Image.new("RGB", (width, head + sum(row_h) + gap), WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 2), title, fill=BLACK)
    if subtitle:
        draw.text((gap, 2 + (text + 2) * bool(title)), subtitle, fill=GREY)
    y = head + gap
    for r, h in zip(rows, row_h, strict=True):
        top = y
        if r.caption is not None:
            draw.text((gap, top), r.caption[: max(1, (width - 2 * gap) // CHAR_W)], fill=BLACK)
            top += text
        x = gap
        for k, img in enumerate(r.images):
            if r.tags:
                draw.text((x, top), r.tags[k], fill=BLACK)
            y0 = top + (text if tagged else 0)
            colour = r.frames[k] if r.frames else None
            if colour is not None:
                draw.rectangle((x, y0, x + tile - 1, y0 + tile - 1), fill=colour)
            pixels = Image.fromarray(np.asarray(img, np.uint8))
            canvas.paste(pixels.resize((size, size), Image.NEAREST), (x + frame, y0 + frame))
            x += tile + gap + (gap if k in r.gap_after else 0)
        y += h
    return png_bytes(canvas)
