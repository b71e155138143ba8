"""Built-in procedural "shapes" dataset: 1-3 flat-coloured objects on a plain background.

Every sample is a pure function of (index, seed, split, held_out, max_objects): the attribute
draw uses ``numpy.random.default_rng([seed, index, split_code])`` and never depends on
``image_size``, so the same index renders the same scene (caption, layout) at 32 and 64 px.

Caption grammar (lowercase, no trailing period):

* 1 object:  ``"a {size} {colour} {shape} {position}"``
  e.g. ``"a large green triangle on the left"``
* 2 objects: ``"a {size} {colour} {shape} {relation} a {size} {colour} {shape}"``
  e.g. ``"a small red circle above a large blue square"``
* 3 objects: ``"a {size} {colour} {shape}, a {size} {colour} {shape} and a {size} {colour} {shape}"``
  -- the three objects stand in a horizontal row, named **left to right**, e.g.
  ``"a small red circle, a large blue square and a small green triangle"``.

Held-out composition: ``DEFAULT_HELD_OUT`` (colour, shape) pairs never appear in ``split="train"``;
``split="heldout"`` samples contain exactly one object with a held-out pair (the others are
train pairs), so a model can be probed zero-shot on novel colour/shape combinations while every
colour and every shape on its own is still seen in training.

Unambiguity at 32 px: objects have two absolute side lengths (0.28 and 0.16 of the image, ratio
1.75), centre ranges of different single-object positions are >= 0.16 of the image apart, and
objects keep >= 0.04 of the image (1.28 px at 32 px) from each other and >= 0.02 from the frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tessera.viz import png_bytes

# Hues >= 30 degrees apart plus white; min pairwise RGB distance ~105 (red/orange, orange/yellow).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 128, 0),
    "yellow": (250, 235, 30),
    "green": (30, 200, 50),
    "cyan": (30, 220, 230),
    "blue": (40, 70, 245),
    "purple": (160, 50, 220),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")

# One pair per colour/shape row+column of a Latin-square corner, so each colour and each shape
# loses exactly one partner and is still seen in training with all the others.
DEFAULT_HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")}
)

SUPERSAMPLE = 4  # draw at 4x then LANCZOS-downsample for anti-aliased edges
MIN_IMAGE_SIZE = 16  # below 32 px the layout is still valid but edges blur into each other
MAX_OBJECTS = 3
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # split -> RNG stream code

# Side length as a fraction of the image side; large/small = 1.75.
_SIDE: dict[str, float] = {"small": 0.16, "large": 0.28}
# Ranges (lo, hi) of the object centre, fractions of the image side, for single objects. Centre
# boxes of different classes are >= 0.16 apart along the axis that distinguishes them.
_POSITION_CENTRE: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # position: ((cx_lo, cx_hi), (cy_lo, cy_hi))
    "on the left": ((0.16, 0.24), (0.40, 0.60)),
    "on the right": ((0.76, 0.84), (0.40, 0.60)),
    "at the top": ((0.40, 0.60), (0.16, 0.24)),
    "at the bottom": ((0.40, 0.60), (0.76, 0.84)),
    "in the center": ((0.42, 0.58), (0.42, 0.58)),
}
_PAIR_AXIS_JITTER = 0.03  # two related objects share a row/column up to this offset
_ROW_GAP = 0.04  # min gap between neighbours (and to the frame) in a 3-object row


@dataclass(frozen=True)
class ShapesSample:
    key: str  # "shapes-%08d" (train) or "heldout-%08d"
    image_png: bytes  # PNG, RGB, image_size x image_size
    caption: str
    attributes: dict  # {"objects": [...], "relation": str | None, "num_objects": int}


def _parse_pair(entry: object) -> tuple[str, str]:
    if isinstance(entry, str):
        parts = entry.strip().lower().split()
    elif isinstance(entry, (list, tuple)) and all(isinstance(p, str) for p in entry):
        parts = [p.strip().lower() for p in entry]
    else:
        raise ValueError(f"held_out entry {entry!r}: expected 'colour shape' or [colour, shape]")
    if len(parts) != 2:
        raise ValueError(f"held_out entry {entry!r}: expected exactly a colour and a shape")
    colour, shape = parts
    if colour not in COLOURS:
        raise ValueError(f"held_out entry {entry!r}: unknown colour {colour!r}; known: {sorted(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"held_out entry {entry!r}: unknown shape {shape!r}; known: {list(SHAPES)}")
    return colour, shape


def validate_held_out(pairs: Iterable[object] | str | None) -> frozenset[tuple[str, str]]:
    """Normalise held-out (colour, shape) pairs and check that training keeps every attribute.

    Accepts ("red", "circle") tuples, ["red", "circle"] lists (YAML/JSON) and "red circle"
    strings (case-insensitive); a single string may hold several pairs separated by commas.
    None means no held-out pairs. Raises ValueError naming the offending entry.
    """
    if pairs is None:
        return frozenset()
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p.strip()]
    out = frozenset(_parse_pair(entry) for entry in pairs)
    for colour in COLOURS:
        if all((colour, shape) in out for shape in SHAPES):
            raise ValueError(
                f"held_out removes colour {colour!r} from training entirely (all its shapes held out)"
            )
    for shape in SHAPES:
        if all((colour, shape) in out for colour in COLOURS):
            raise ValueError(
                f"held_out removes shape {shape!r} from training entirely (all its colours held out)"
            )
    return out


def _noun(obj: dict) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def describe(attributes: dict) -> str:
    """Caption for ``attributes`` (see module docstring for the grammar)."""
    try:
        objects = attributes["objects"]
        nouns = [_noun(o) for o in objects]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"attributes: expected {{'objects': [{{colour, shape, size}}, ...]}}, got {attributes!r}"
        ) from e
    if len(objects) == 1:
        position = objects[0].get("position")
        if position not in POSITIONS:
            raise ValueError(f"attributes: single object needs a position in {POSITIONS}, got {position!r}")
        return f"{nouns[0]} {position}"
    if len(objects) == 2:
        relation = attributes.get("relation")
        if relation not in RELATIONS:
            raise ValueError(f"attributes: two objects need a relation in {RELATIONS}, got {relation!r}")
        return f"{nouns[0]} {relation} {nouns[1]}"
    if len(objects) == 3:
        return f"{nouns[0]}, {nouns[1]} and {nouns[2]}"
    raise ValueError(f"attributes: expected 1-{MAX_OBJECTS} objects, got {len(objects)}")


def _centres(rng: np.random.Generator, sizes: list[str], layout: str | None) -> list[tuple[float, float]]:
    """Object centres as fractions of the image side, one per entry of ``sizes``.

    ``layout`` is the position (1 object), the relation (2 objects) or None (3-object row).
    """
    if len(sizes) == 1:
        (x_lo, x_hi), (y_lo, y_hi) = _POSITION_CENTRE[layout]
        return [(rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi))]
    if len(sizes) == 2:
        # Near/far slots along the relation axis; centres 0.44-0.60 apart, the shared axis
        # coordinate drifts by <= _PAIR_AXIS_JITTER so the relation reads cleanly.
        near, far = rng.uniform(0.20, 0.28), rng.uniform(0.72, 0.80)
        shared = rng.uniform(0.25, 0.75)
        offsets = rng.uniform(-_PAIR_AXIS_JITTER, _PAIR_AXIS_JITTER, size=2)
        first, second = {
            "above": (near, far),
            "below": (far, near),
            "to the left of": (near, far),
            "to the right of": (far, near),
        }[layout]
        if layout in ("above", "below"):
            return [(shared + offsets[0], first), (shared + offsets[1], second)]
        return [(first, shared + offsets[0]), (second, shared + offsets[1])]
    # Three columns of width 1/3; each object slides within its column keeping _ROW_GAP / 2 to
    # the column edge, so neighbours stay >= _ROW_GAP apart and >= _ROW_GAP / 2 from the frame.
    row_y = rng.uniform(0.38, 0.62)
    centres = []
    for col, size in enumerate(sizes):
        slack = max(0.0, (1 / 3 - _SIDE[size] - _ROW_GAP) / 2)
        cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
        centres.append((cx, row_y + rng.uniform(-0.04, 0.04)))
    return centres


def _draw_attributes(
    rng: np.random.Generator, split: str, held_out: frozenset[tuple[str, str]], max_objects: int
) -> tuple[dict, list[tuple[float, float]]]:
    """Scene attributes (without bboxes) and object centres, independent of image size."""
    train_pairs = [p for p in itertools.product(COLOURS, SHAPES) if p not in held_out]
    n = int(rng.integers(1, max_objects + 1))
    pair_idx = [int(i) for i in rng.integers(0, len(train_pairs), size=n)]
    pairs = [train_pairs[i] for i in pair_idx]
    if split == "heldout":
        novel = sorted(held_out)
        slot = int(rng.integers(0, n))
        pairs[slot] = novel[int(rng.integers(0, len(novel)))]
    sizes = [SIZES[int(i)] for i in rng.integers(0, len(SIZES), size=n)]
    if n == 1:
        layout = POSITIONS[int(rng.integers(0, len(POSITIONS)))]
    elif n == 2:
        layout = RELATIONS[int(rng.integers(0, len(RELATIONS)))]
    else:
        layout = None
    objects = [{"colour": c, "shape": s, "size": z} for (c, s), z in zip(pairs, sizes, strict=True)]
    if n == 1:
        objects[0]["position"] = layout
    attributes = {"objects": objects, "relation": layout if n == 2 else None, "num_objects": n}
    return attributes, _centres(rng, sizes, layout)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    # box is half-open [x0, x1) x [y0, y1) in canvas pixels; PIL's rectangle/ellipse include x1.
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":  # upward, base = height = side
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_sample(
    index: int,
    *,
    seed: int,
    image_size: int = 64,
    split: str = "train",
    held_out: Iterable[object] | frozenset[tuple[str, str]] = DEFAULT_HELD_OUT,
    max_objects: int = 3,
) -> ShapesSample:
    """Render sample ``index`` of the shapes dataset.

    split="train": no object's (colour, shape) is in ``held_out``.
    split="heldout": exactly one object's (colour, shape) is in ``held_out`` (the rest are train
    pairs). The same arguments always give a byte-identical sample; the scene (caption, layout in
    fractions of the image) does not depend on ``image_size``. ``attributes["objects"][i]["bbox"]``
    is [x0, y0, x1, y1] in output pixels (multiples of 1/4, half-open).
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be an int in 1..{MAX_OBJECTS}, got {max_objects!r}")
    held = validate_held_out(held_out)
    if split == "heldout" and not held:
        raise ValueError("split='heldout' needs a non-empty held_out set")

    rng = np.random.default_rng([int(seed), int(index), SPLITS[split]])
    attributes, centres = _draw_attributes(rng, split, held, int(max_objects))

    canvas_size = int(image_size) * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy) in zip(attributes["objects"], centres, strict=True):
        # Round the side first so every object of a size class has the same pixel extent.
        side = round(_SIDE[obj["size"]] * canvas_size)
        x0 = round(cx * canvas_size - side / 2)
        y0 = round(cy * canvas_size - side / 2)
        box = (x0, y0, x0 + side, y0 + side)
        _draw_shape(draw, obj["shape"], box, COLOURS[obj["colour"]])
        obj["bbox"] = [v / SUPERSAMPLE for v in box]
    image = canvas.resize((int(image_size), int(image_size)), Image.Resampling.LANCZOS)

    prefix = "shapes" if split == "train" else "heldout"
    return ShapesSample(
        key=f"{prefix}-{int(index):08d}",
        image_png=png_bytes(image),
        caption=describe(attributes),
        attributes=attributes,
    )
