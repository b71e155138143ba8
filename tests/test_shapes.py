"""Tests for the procedural shapes dataset (tessera.data.shapes)."""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tessera.data.shapes import (
    BACKGROUND,
    COLOURS,
    DEFAULT_HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapesSample,
    describe,
    render_sample,
    validate_held_out,
)

N_TRAIN = 2000
N_HELDOUT = 300


def _decode(sample: ShapesSample) -> np.ndarray:
    img = Image.open(io.BytesIO(sample.image_png))
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)  # (H, W, 3)


def _centre(bbox: list[float]) -> tuple[float, float]:
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _pairs(sample: ShapesSample) -> list[tuple[str, str]]:
    return [(o["colour"], o["shape"]) for o in sample.attributes["objects"]]


@pytest.fixture(scope="module")
def train32() -> list[ShapesSample]:
    return [render_sample(i, seed=7, image_size=32) for i in range(N_TRAIN)]


@pytest.fixture(scope="module")
def heldout64() -> list[ShapesSample]:
    return [render_sample(i, seed=7, image_size=64, split="heldout") for i in range(N_HELDOUT)]


def test_vocabulary() -> None:
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4 and SIZES == ("small", "large")
    assert len(POSITIONS) >= 5 and len(RELATIONS) >= 4
    # Words must not collide, or captions could not be parsed back into attributes.
    words = [*COLOURS, *SHAPES, *SIZES]
    assert len(set(words)) == len(words)
    palette = [*COLOURS.values(), BACKGROUND]
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(palette, 2)) >= 90


def test_default_held_out_keeps_every_attribute_in_training() -> None:
    assert 3 <= len(DEFAULT_HELD_OUT) <= 6
    assert validate_held_out(DEFAULT_HELD_OUT) == DEFAULT_HELD_OUT
    train_pairs = set(itertools.product(COLOURS, SHAPES)) - DEFAULT_HELD_OUT
    assert {c for c, _ in train_pairs} == set(COLOURS)
    assert {s for _, s in train_pairs} == set(SHAPES)


def test_deterministic_and_byte_identical() -> None:
    for split in ("train", "heldout"):
        a = render_sample(42, seed=3, split=split)
        b = render_sample(42, seed=3, split=split)
        assert a.image_png == b.image_png and a == b
    assert render_sample(42, seed=3).key == "shapes-00000042"
    assert render_sample(42, seed=3, split="heldout").key == "heldout-00000042"
    # Seed and split both change the draw.
    assert render_sample(42, seed=4).image_png != render_sample(42, seed=3).image_png
    assert render_sample(42, seed=3, split="heldout").caption != render_sample(42, seed=3).caption


def test_different_indices_differ() -> None:
    samples = [render_sample(i, seed=0) for i in range(60)]
    assert len({s.image_png for s in samples}) == len(samples)
    assert len({s.caption for s in samples}) >= 55


def test_scene_does_not_depend_on_image_size() -> None:
    for i in range(20):
        s32, s64 = render_sample(i, seed=5, image_size=32), render_sample(i, seed=5, image_size=64)
        assert s32.caption == s64.caption
        for o32, o64 in zip(s32.attributes["objects"], s64.attributes["objects"], strict=True):
            assert np.allclose(np.multiply(o32["bbox"], 2), o64["bbox"], atol=0.5)


@pytest.mark.parametrize("size", [32, 64])
def test_png_is_rgb_of_image_size(size: int) -> None:
    for i in range(5):
        arr = _decode(render_sample(i, seed=1, image_size=size))
        assert arr.shape == (size, size, 3)
        # Corners are background: objects keep away from the frame.
        assert np.abs(arr[0, 0] - BACKGROUND).max() <= 2


def test_train_never_contains_held_out_and_covers_vocabulary(train32: list[ShapesSample]) -> None:
    seen: dict[str, Counter] = {
        k: Counter() for k in ("colour", "shape", "size", "position", "relation", "n")
    }
    pairs: set[tuple[str, str]] = set()
    for s in train32:
        assert s.key.startswith("shapes-")
        assert not set(_pairs(s)) & DEFAULT_HELD_OUT, s.caption
        pairs.update(_pairs(s))
        for o in s.attributes["objects"]:
            for k in ("colour", "shape", "size"):
                seen[k][o[k]] += 1
            if "position" in o:
                seen["position"][o["position"]] += 1
        if s.attributes["relation"] is not None:
            seen["relation"][s.attributes["relation"]] += 1
        seen["n"][s.attributes["num_objects"]] += 1
    assert set(seen["colour"]) == set(COLOURS) and set(seen["shape"]) == set(SHAPES)
    assert set(seen["size"]) == set(SIZES)
    assert set(seen["position"]) == set(POSITIONS) and set(seen["relation"]) == set(RELATIONS)
    assert pairs == set(itertools.product(COLOURS, SHAPES)) - DEFAULT_HELD_OUT
    # Object count uniform over 1..3: each ~667 of 2000.
    assert set(seen["n"]) == {1, 2, 3} and min(seen["n"].values()) > 550


def test_heldout_split_has_a_held_out_pair(heldout64: list[ShapesSample]) -> None:
    used = set()
    for s in heldout64:
        assert s.key.startswith("heldout-")
        novel = [p for p in _pairs(s) if p in DEFAULT_HELD_OUT]
        assert len(novel) == 1, s.caption
        used.update(novel)
    assert used == DEFAULT_HELD_OUT


def test_custom_held_out_strings() -> None:
    held = ["Red Circle", "blue square"]
    for i in range(200):
        s = render_sample(i, seed=2, image_size=32, held_out=held)
        assert not {("red", "circle"), ("blue", "square")} & set(_pairs(s))
        h = render_sample(i, seed=2, image_size=32, held_out=held, split="heldout")
        assert {("red", "circle"), ("blue", "square")} & set(_pairs(h))


_NOUN = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_GRAMMAR = {
    1: re.compile(rf"^{_NOUN} ({'|'.join(POSITIONS)})$"),
    2: re.compile(rf"^{_NOUN} ({'|'.join(RELATIONS)}) {_NOUN}$"),
    3: re.compile(rf"^{_NOUN}, {_NOUN} and {_NOUN}$"),
}


def test_caption_matches_attributes(train32: list[ShapesSample], heldout64: list[ShapesSample]) -> None:
    for s in [*train32[:500], *heldout64]:
        assert s.caption == describe(s.attributes)
        assert json.loads(json.dumps(s.attributes)) == s.attributes
        objs = s.attributes["objects"]
        assert s.attributes["num_objects"] == len(objs)
        m = _GRAMMAR[len(objs)].match(s.caption)
        assert m, s.caption
        groups = [g for g in m.groups() if g not in POSITIONS and g not in RELATIONS]
        assert groups == [o[k] for o in objs for k in ("size", "colour", "shape")]
        if len(objs) == 1:
            assert s.caption.endswith(objs[0]["position"])
        if len(objs) == 2:
            assert f" {s.attributes['relation']} a " in s.caption


def test_describe_rejects_bad_attributes() -> None:
    obj = {"colour": "red", "shape": "circle", "size": "small"}
    with pytest.raises(ValueError, match="position"):
        describe({"objects": [obj], "relation": None})
    with pytest.raises(ValueError, match="relation"):
        describe({"objects": [obj, obj], "relation": "beside"})
    with pytest.raises(ValueError, match="objects"):
        describe({"objects": [obj] * 4, "relation": None})


@pytest.mark.parametrize("size", [32, 64])
def test_bboxes_inside_and_apart(size: int, train32: list[ShapesSample]) -> None:
    samples = train32[:600] if size == 32 else [render_sample(i, seed=7, image_size=64) for i in range(300)]
    sides: dict[str, set[float]] = {"small": set(), "large": set()}
    for s in samples:
        boxes = [o["bbox"] for o in s.attributes["objects"]]
        for o, (x0, y0, x1, y1) in zip(s.attributes["objects"], boxes, strict=True):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, s.caption
            assert x1 - x0 == y1 - y0
            sides[o["size"]].add(x1 - x0)
        for a, b in itertools.combinations(boxes, 2):
            # >= 1 px gap along at least one axis, so anti-aliased edges never touch.
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap >= 1.0, (s.caption, boxes)
    assert len(sides["small"]) == 1 and len(sides["large"]) == 1  # one extent per size class
    assert min(sides["large"]) / max(sides["small"]) >= 1.7


def test_positions_and_relations_are_geometrically_true(train32: list[ShapesSample]) -> None:
    size = 32
    for s in train32:
        objs = s.attributes["objects"]
        centres = [_centre(o["bbox"]) for o in objs]
        if len(objs) == 1:
            (cx, cy), pos = centres[0], objs[0]["position"]
            horiz = {"on the left": cx < 0.3 * size, "on the right": cx > 0.7 * size}.get(
                pos, 0.35 * size < cx < 0.65 * size
            )
            vert = {"at the top": cy < 0.3 * size, "at the bottom": cy > 0.7 * size}.get(
                pos, 0.35 * size < cy < 0.65 * size
            )
            assert horiz and vert, (s.caption, centres)
        elif len(objs) == 2:
            (ax, ay), (bx, by) = centres
            rel = s.attributes["relation"]
            along, across = {
                "above": (by - ay, ax - bx),
                "below": (ay - by, ax - bx),
                "to the left of": (bx - ax, ay - by),
                "to the right of": (ax - bx, ay - by),
            }[rel]
            assert along > 0.4 * size and abs(across) < 0.1 * size, (s.caption, centres)
        else:
            xs = [c[0] for c in centres]
            assert xs[0] < xs[1] < xs[2] and xs[1] - xs[0] > 0.2 * size and xs[2] - xs[1] > 0.2 * size
            assert max(c[1] for c in centres) - min(c[1] for c in centres) < 0.3 * size  # a row


def test_pixel_at_centre_has_object_colour() -> None:
    checked = 0
    for i in range(200):
        s = render_sample(i, seed=11, image_size=64)
        arr = _decode(s)
        for o in s.attributes["objects"]:
            if o["shape"] == "triangle":
                continue
            cx, cy = _centre(o["bbox"])
            assert np.abs(arr[int(cy), int(cx)] - COLOURS[o["colour"]]).max() <= 12, s.caption
            checked += 1
    assert checked > 200


def test_attributes_recoverable_from_pixels_at_32(train32: list[ShapesSample]) -> None:
    """Colour (nearest palette entry) and silhouette (fill ratio, vertical mass balance) of every
    object separate cleanly at 32 px -- the premise of a >= 99% attribute classifier."""
    names, palette = [*COLOURS, "background"], np.array([*COLOURS.values(), BACKGROUND])
    bg = np.array(BACKGROUND)
    for s in train32[:500]:
        arr = _decode(s)
        for o in s.attributes["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            cx, cy = _centre(o["bbox"])
            cy = y0 + 0.7 * (y1 - y0) if o["shape"] == "triangle" else cy  # inside the wide base
            px = arr[int(cy), int(cx)]
            assert names[int(np.argmin(((palette - px) ** 2).sum(1)))] == o["colour"], s.caption
            # Soft coverage alpha in [0, 1] of the object's colour over a crop 1 px wider than the bbox.
            col = np.array(COLOURS[o["colour"]])
            r0, c0 = max(int(np.floor(y0)) - 1, 0), max(int(np.floor(x0)) - 1, 0)
            crop = arr[r0 : int(np.ceil(y1)) + 1, c0 : int(np.ceil(x1)) + 1]
            alpha = np.clip((crop - bg) @ (col - bg) / ((col - bg) @ (col - bg)), 0, 1)
            fill = alpha.sum() / (x1 - x0) ** 2
            rows = np.arange(crop.shape[0]) + r0 + 0.5
            drop = ((alpha.sum(1) * rows).sum() / alpha.sum() - (y0 + y1) / 2) / (y1 - y0)
            shape = (
                "square"
                if fill > 0.9
                else "circle"
                if fill > 0.65
                else "triangle"
                if drop > 0.08
                else "diamond"
            )
            assert shape == o["shape"], (s.caption, o, fill, drop)


def test_validate_held_out() -> None:
    assert validate_held_out(["red circle", ("Blue", "SQUARE"), ["green", "triangle"]]) == {
        ("red", "circle"),
        ("blue", "square"),
        ("green", "triangle"),
    }
    assert validate_held_out("red circle, blue square") == {("red", "circle"), ("blue", "square")}
    assert validate_held_out(None) == frozenset() and validate_held_out([]) == frozenset()
    with pytest.raises(ValueError, match="magenta"):
        validate_held_out(["red circle", "magenta square"])
    with pytest.raises(ValueError, match="hexagon"):
        validate_held_out([("red", "hexagon")])
    with pytest.raises(ValueError, match="big red circle"):
        validate_held_out(["big red circle"])
    with pytest.raises(ValueError, match="colour 'red'"):
        validate_held_out([("red", s) for s in SHAPES])
    with pytest.raises(ValueError, match="shape 'circle'"):
        validate_held_out([(c, "circle") for c in COLOURS])


def test_render_sample_argument_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        render_sample(0, seed=0, split="test")
    with pytest.raises(ValueError, match="held_out"):
        render_sample(0, seed=0, split="heldout", held_out=[])
    with pytest.raises(ValueError, match="max_objects"):
        render_sample(0, seed=0, max_objects=4)
    with pytest.raises(ValueError, match="seed"):
        render_sample(0, seed=-1)
    with pytest.raises(ValueError, match="index"):
        render_sample(-1, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        render_sample(0, seed=0, image_size=8)
    with pytest.raises(ValueError, match="unknown colour"):
        render_sample(0, seed=0, held_out=["teal circle"])
    assert {
        render_sample(i, seed=0, image_size=32, max_objects=1).attributes["num_objects"] for i in range(30)
    } == {1}
