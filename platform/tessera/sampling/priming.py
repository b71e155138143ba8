"""Image-to-image by priming, the DALL·E paper's way (arXiv 2102.12092, §3, Figure 14): the prior is
given the caption and the top rows of an image's tokens, and samples the rest.

    upload bytes ─load_image─▶ (S, S, 3) uint8: decoded, RGB (transparency on white), resized and
                              centre-cropped to the model's resolution exactly as training images were
                 ─prime_tokens─▶ dVAE tokens (B, G, G), their first keep_rows rows flattened: (B, keep_rows·G)
                 ─sample_image_tokens(prime=...)─▶ the prefix goes through the KV cache once; the
                              remaining (G − keep_rows)·G positions are drawn

load_image needs PIL only, so the HTTP ingress (which stays free of torch) can check an upload
before it queues; prime_tokens imports torch where it runs.
"""

from __future__ import annotations

import io

import numpy as np

from tessera.data.preprocess import Rules, process_image

MAX_PIXELS = 4096 * 4096  # an upload may declare at most this many pixels (decompression bombs)

# process_image's skip reasons, worded for someone who sent one image.
_REFUSALS = {
    "missing_image": "no image was sent",
    "empty_file": "the file is empty",
    "corrupt_image": "not an image PIL can decode (corrupt, truncated, or not an image file)",
    "unsupported_format": "must be a PNG, JPEG or WebP file",
    "decompression_bomb": f"declares more than {MAX_PIXELS:,} pixels",
    "unsupported_mode": "has a pixel format with no faithful RGB conversion (e.g. 16-bit or float)",
}


def default_keep_rows(grid: int) -> int:
    """The paper primes with the upper half of the image."""
    return grid // 2


def check_keep_rows(keep_rows: int, grid: int) -> None:
    """ValueError naming keep_rows unless at least one row is kept and at least one is drawn."""
    if not 1 <= keep_rows <= grid - 1:
        raise ValueError(f"keep_rows: must be between 1 and {grid - 1} (this model's token grid has {grid} "
                         f"rows; the rows after the kept ones are drawn), got {keep_rows}")


def load_image(data: bytes, resolution: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes (PNG, JPEG, WebP) -> (resolution, resolution, 3) uint8, prepared as
    `prepare` prepares training images. ValueError "image: ..." for anything that is not one."""
    from PIL import Image

    rules = Rules(resolution=resolution, max_aspect_ratio=float("inf"), max_image_pixels=max_pixels)
    png, size, reason = process_image(data, rules)
    if reason:
        got = f" (it declares {size[0]}x{size[1]})" if reason == "decompression_bomb" else ""
        raise ValueError(f"image: {_REFUSALS.get(reason, reason)}{got}")
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def prime_tokens(dvae, images: np.ndarray, keep_rows: int):
    """uint8 images (B, S, S, 3) at the dVAE's resolution -> the first keep_rows rows of their
    tokens, row-major: int64 (B, keep_rows·G), on the dVAE's device."""
    import torch

    from tessera.models.dvae import to_model_input

    G, S = dvae.shape.grid_size, dvae.shape.image_size
    check_keep_rows(keep_rows, G)
    if images.ndim != 4 or images.shape[1:] != (S, S, 3) or images.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (B, {S}, {S}, 3) at the model's resolution, "
                         f"got {images.dtype} {images.shape}")
    device = next(dvae.parameters()).device
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)), S).to(device)  # (B, 3, S, S)
    tokens = dvae.encode(x.to(next(dvae.parameters()).dtype))  # (B, G, G)
    return tokens[:, :keep_rows].reshape(len(images), keep_rows * G)
