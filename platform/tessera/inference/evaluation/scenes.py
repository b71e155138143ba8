"""The canonical form of a shapes scene, shared by captions and images, and the scoring rules.

A scene is a layout plus up to three objects in canonical spatial order:

* layout: one of 8 classes — a single object's position (5), "vertical" (two objects, one above
  the other), "horizontal" (two side by side) or "row" (three in a row). It fixes the count.
* objects: two vertical -> top first; two horizontal -> left first ("A below B" = [B, A]);
  three -> left to right, as the caption names them.

As labels a scene is 10 ints: [layout, colour0, shape0, size0, colour1, shape1, size1, colour2,
shape2, size2], an absent object's slots holding the extra "none" class of each head. A caption
is right for an image when the layout and every named object's colour, shape and size match;
slots past the caption's count are not scored (the layout head decides the count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tessera.data import shapes

LAYOUTS: tuple[str, ...] = (*shapes.POSITIONS, "vertical", "horizontal", "row")
COLOURS: tuple[str, ...] = tuple(shapes.COLOURS)
SHAPES: tuple[str, ...] = shapes.SHAPES
SIZES: tuple[str, ...] = shapes.SIZES
MAX_OBJECTS = shapes.MAX_OBJECTS
# (name, classes) of each label column; the object heads have one class more, "none".
HEADS: tuple[tuple[str, int], ...] = (("layout", len(LAYOUTS)),) + tuple(
    (f"{attr}{slot}", n + 1) for slot in range(MAX_OBJECTS)
    for attr, n in (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("size", len(SIZES))))
NUM_LABELS = len(HEADS)
ATTRIBUTES = ("colour", "shape", "size")
_VOCAB = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


def layout_count(layout: int | np.ndarray) -> int | np.ndarray:
    """Objects a layout index implies: positions 1, vertical/horizontal 2, row 3."""
    n = len(shapes.POSITIONS)
    return np.where(np.asarray(layout) < n, 1, np.where(np.asarray(layout) < n + 2, 2, 3))


@dataclass(frozen=True)
class Scene:
    layout: str
    objects: tuple[tuple[str, str, str], ...]  # (colour, shape, size), canonical order

    def labels(self) -> np.ndarray:
        """(NUM_LABELS,) int64."""
        out = np.array([LAYOUTS.index(self.layout)] + [h[1] - 1 for h in HEADS[1:]], dtype=np.int64)
        for slot, obj in enumerate(self.objects):
            for a, (attr, value) in enumerate(zip(ATTRIBUTES, obj, strict=True)):
                out[1 + 3 * slot + a] = _VOCAB[attr].index(value)
        return out

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> Scene:
        """The scene the labels say (an object slot of the count holding "none" reads "none")."""
        layout = LAYOUTS[int(labels[0])]
        objects = []
        for slot in range(int(layout_count(int(labels[0])))):
            objects.append(tuple(_VOCAB[attr][v] if (v := int(labels[1 + 3 * slot + a])) < len(_VOCAB[attr])
                                 else "none"
                                 for a, attr in enumerate(ATTRIBUTES)))
        return cls(layout, tuple(objects))


def canonical_scene(attributes: dict) -> Scene:
    """The Scene of shapes attributes ({"objects": [...], "relation": ...}, as render_sample and
    the prepared data's per-sample JSON hold them). ValueError names what is wrong."""
    try:
        objs = [(o["colour"], o["shape"], o["size"]) for o in attributes["objects"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"attributes: expected {{'objects': [{{colour, shape, size}}, ...]}}, "
                         f"got {attributes!r}") from e
    for obj in objs:
        for attr, value in zip(ATTRIBUTES, obj, strict=True):
            if value not in _VOCAB[attr]:
                raise ValueError(f"attributes: unknown {attr} {value!r}")
    if len(objs) == 1:
        position = attributes["objects"][0].get("position")
        if position not in shapes.POSITIONS:
            raise ValueError(f"attributes: a single object needs a position in {shapes.POSITIONS}, "
                             f"got {position!r}")
        return Scene(position, tuple(objs))
    if len(objs) == 2:
        relation = attributes.get("relation")
        order = {"above": ("vertical", 0), "below": ("vertical", 1),
                 "to the left of": ("horizontal", 0), "to the right of": ("horizontal", 1)}.get(relation)
        if order is None:
            raise ValueError(f"attributes: two objects need a relation in {shapes.RELATIONS}, "
                             f"got {relation!r}")
        layout, flip = order
        return Scene(layout, tuple(objs[::-1] if flip else objs))
    if len(objs) == 3:
        return Scene("row", tuple(objs))
    raise ValueError(f"attributes: expected 1-{MAX_OBJECTS} objects, got {len(objs)}")


_NOUN = r"an? ({sizes}) ({colours}) ({shapes})".format(
    sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES))
_ONE = re.compile(rf"^{_NOUN} ({'|'.join(shapes.POSITIONS)})$")
_TWO = re.compile(rf"^{_NOUN} ({'|'.join(shapes.RELATIONS)}) {_NOUN}$")
_THREE = re.compile(rf"^{_NOUN}, {_NOUN},? and {_NOUN}$")


def caption_attributes(caption: str) -> dict:
    """Invert shapes.describe: the attributes a caption states (case, spacing and a trailing
    period are forgiven). ValueError naming the caption when it is not in the grammar."""
    text = " ".join(str(caption).lower().replace(" ,", ",").split()).rstrip(".").strip()

    def objects(groups: tuple[str, ...]) -> list[dict]:
        return [{"colour": groups[i + 1], "shape": groups[i + 2], "size": groups[i]}
                for i in range(0, len(groups), 3)]

    if m := _ONE.match(text):
        objs = objects(m.groups()[:3])
        objs[0]["position"] = m.group(4)
        return {"objects": objs, "relation": None, "num_objects": 1}
    if m := _TWO.match(text):
        g = m.groups()
        return {"objects": objects(g[:3] + g[4:]), "relation": g[3], "num_objects": 2}
    if m := _THREE.match(text):
        return {"objects": objects(m.groups()), "relation": None, "num_objects": 3}
    raise ValueError(f"caption {caption!r} is not in the shapes grammar "
                     "(e.g. 'a small red circle on the left', "
                     "'a large blue square above a small green triangle', "
                     "'a small red circle, a large blue square "
                     "and a small green triangle')")


def parse_caption(caption: str) -> Scene:
    """The canonical Scene of a shapes caption; ValueError naming the caption if it is not one."""
    return canonical_scene(caption_attributes(caption))


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def score_labels(predicted: np.ndarray, target: np.ndarray) -> dict:
    """Accuracies of predicted labels (N, NUM_LABELS) against the captions' (N, NUM_LABELS).

    caption_accuracy: layout and every named object's attributes right. colour / shape / size:
    over the objects the captions name (N·count of them); layout; count (the layout's implied
    object count); by_objects: caption accuracy per caption object count."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape or predicted.ndim != 2 or predicted.shape[1] != NUM_LABELS:
        raise ValueError(f"expected two (N, {NUM_LABELS}) label arrays, "
                         f"got {predicted.shape} and {target.shape}")
    count = layout_count(target[:, 0])  # (N,)
    named = np.arange(MAX_OBJECTS)[None, :] < count[:, None]  # (N, 3) slots the caption names
    right = (predicted == target)[:, 1:].reshape(-1, MAX_OBJECTS, 3)  # (N, slot, attribute)
    layout_ok = predicted[:, 0] == target[:, 0]
    caption_ok = caption_correct(predicted, target)
    out = {"n": int(len(target)), "caption_accuracy": _mean(caption_ok)}
    for a, attr in enumerate(ATTRIBUTES):
        out[attr] = _mean(right[:, :, a][named])
    out["layout"] = _mean(layout_ok)
    out["count"] = _mean(layout_count(predicted[:, 0]) == count)
    out["by_objects"] = {str(k): {"n": int((count == k).sum()),
                                  "caption_accuracy": _mean(caption_ok[count == k])}
                         for k in range(1, MAX_OBJECTS + 1) if (count == k).any()}
    return out


def caption_correct(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) bool: the caption-level verdict of score_labels, per row."""
    count = layout_count(target[:, 0])
    named = np.arange(MAX_OBJECTS)[None, :] < count[:, None]
    right = (predicted == target)[:, 1:].reshape(-1, MAX_OBJECTS, 3).all(axis=2)
    return (predicted[:, 0] == target[:, 0]) & np.where(named, right, True).all(axis=1)


def pair_accuracy(predicted: np.ndarray, target: np.ndarray, pairs: set[tuple[str, str]]) -> dict:
    """Over the named objects whose (colour, shape) is in `pairs` (the held-out combinations):
    the fraction drawn with both right, and with colour, shape and size right."""
    hits, full, n = 0, 0, 0
    for p, t in zip(np.asarray(predicted), np.asarray(target), strict=True):
        for slot in range(int(layout_count(int(t[0])))):
            c, s, z = t[1 + 3 * slot: 4 + 3 * slot]
            if (COLOURS[c], SHAPES[s]) not in pairs:
                continue
            n += 1
            ok = p[1 + 3 * slot] == c and p[2 + 3 * slot] == s
            hits += int(ok)
            full += int(ok and p[3 + 3 * slot] == z)
    return {"n": n, "colour_and_shape": hits / n if n else None, "all_attributes": full / n if n else None}
