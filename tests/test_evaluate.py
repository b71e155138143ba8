"""Evaluation: the canonical scene form (captions and attributes agree on it), the scoring rules
on hand-built predictions, and the classifier's save/reuse plumbing."""


import numpy as np
import pytest

from tessera.data import shapes
from tessera.evaluation.scenes import (
    HEADS,
    LAYOUTS,
    NUM_LABELS,
    Scene,
    canonical_scene,
    caption_attributes,
    caption_correct,
    pair_accuracy,
    parse_caption,
    score_labels,
)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_and_attributes_give_the_same_canonical_scene(split):
    for i in range(1500):
        s = shapes.render_sample(i, seed=11, image_size=16, split=split)
        scene = parse_caption(s.caption)
        assert scene == canonical_scene(s.attributes), s.caption
        assert shapes.describe(caption_attributes(s.caption)) == s.caption
        assert Scene.from_labels(scene.labels()) == scene
        assert len(scene.objects) == s.attributes["num_objects"]


def test_canonical_order_is_spatial():
    below = parse_caption("a small red circle below a large blue square")
    above = parse_caption("a large blue square above a small red circle")
    assert below == above == Scene("vertical", (("blue", "square", "large"), ("red", "circle", "small")))
    right = parse_caption("a small red circle to the right of a large blue square")
    assert right.layout == "horizontal" and right.objects[0] == ("blue", "square", "large")
    row = parse_caption("a small red circle, a large blue square and a small green triangle")
    assert row.layout == "row" and [o[0] for o in row.objects] == ["red", "blue", "green"]
    # Case, spacing and a trailing period are forgiven; anything outside the grammar is named.
    assert parse_caption("  A Small RED circle   on the left.") == parse_caption("a small red circle on the left")
    for bad in ("a purple elephant on the left", "a small red circle", "two red circles", ""):
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_scoring_rules_on_hand_built_predictions():
    captions = ["a small red circle on the left", "a large blue square above a small green triangle",
                "a small red circle, a large blue square and a small green triangle"]
    target = np.stack([parse_caption(c).labels() for c in captions])
    assert target.shape == (3, NUM_LABELS) and [h[0] for h in HEADS][:4] == ["layout", "colour0", "shape0", "size0"]
    perfect = score_labels(target.copy(), target)
    assert perfect["caption_accuracy"] == 1 and perfect["by_objects"]["3"] == {"n": 1, "caption_accuracy": 1.0}

    pred = target.copy()
    pred[0, 4] = 0  # slot 1 of a one-object caption: not scored, the layout says one object
    pred[1, 4] = target[1, 1]  # caption 2: second object's colour wrong
    out = score_labels(pred, target)
    assert caption_correct(pred, target).tolist() == [True, False, True]
    assert out["caption_accuracy"] == pytest.approx(2 / 3)
    assert out["colour"] == pytest.approx(5 / 6) and out["shape"] == 1 and out["size"] == 1  # 6 named objects
    assert out["layout"] == 1 and out["count"] == 1

    pred = target.copy()
    pred[1, 0] = LAYOUTS.index("horizontal")  # "horizontal" for a vertical pair: layout wrong, count right
    pred[2, 0] = 0  # a row read as one object on the left: count wrong too
    out = score_labels(pred, target)
    assert out["caption_accuracy"] == pytest.approx(1 / 3) and out["layout"] == pytest.approx(1 / 3)
    assert out["count"] == pytest.approx(2 / 3) and out["colour"] == 1
    with pytest.raises(ValueError, match="label arrays"):
        score_labels(target[:, :3], target[:, :3])

    held = {("red", "triangle")}
    t = np.stack([parse_caption("a small red triangle above a large blue square").labels()])
    p = t.copy()
    p[0, 2] = 0  # the red triangle (slot 0: the upper object) drawn as a circle
    assert pair_accuracy(p, t, held) == {"n": 1, "colour_and_shape": 0.0, "all_attributes": 0.0}
    assert pair_accuracy(t, t, held)["colour_and_shape"] == 1.0


def test_classifier_is_saved_reused_and_retrained_when_its_spec_changes(tmp_path):
    from tessera.evaluation.classifier import (
        ClassifierSpec,
        ensure_classifier,
        load_classifier,
        render_scenes,
    )

    spec = ClassifierSpec(width=4, hidden=16, train_samples=32, steps=2, batch_size=8, test_samples=16)
    uri = str(tmp_path / "clf")
    model, meta, trained = ensure_classifier(spec, uri)
    assert trained and set(meta["accuracy"]) == {"real", "real_2x"} and meta["spec"]["width"] == 4
    assert {p.name for p in tmp_path.joinpath("clf").iterdir()} == {"classifier.safetensors", "classifier.json"}
    images, labels = render_scenes(8, seed=5, image_size=32, double_fraction=0.5)
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8, NUM_LABELS)
    predicted = model.predict(images)
    assert predicted.shape == (8, NUM_LABELS)
    assert all((0 <= predicted[:, i]).all() and (predicted[:, i] < n).all() for i, (_, n) in enumerate(HEADS))
    # 64 px images are area-resized to the classifier's 32.
    assert model.predict(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)).shape == (8, NUM_LABELS)

    again, meta2, trained2 = ensure_classifier(spec, uri)
    assert not trained2 and meta2["created"] == meta["created"]
    assert np.array_equal(again.predict(images), predicted)
    assert load_classifier(uri, spec=ClassifierSpec(**{**spec.__dict__, "steps": 3})) is None
    (tmp_path / "clf" / "classifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="classifier.safetensors"):
        load_classifier(uri, spec=spec)
