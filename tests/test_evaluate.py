"""Evaluation: the canonical scene form (captions and attributes agree on it), the scoring rules
on hand-built predictions, the classifier's save/reuse plumbing, and jobs/evaluate.py end to end
on a tiny untrained bundle and a tiny prepared dataset."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from bundles import make_bundle

from tessera.data import shapes
from tessera.inference.evaluation.scenes import (
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

ROOT = Path(__file__).resolve().parents[1]


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
    assert (parse_caption("  A Small RED circle   on the left.")
            == parse_caption("a small red circle on the left"))
    for bad in ("a purple elephant on the left", "a small red circle", "two red circles", ""):
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_scoring_rules_on_hand_built_predictions():
    captions = ["a small red circle on the left", "a large blue square above a small green triangle",
                "a small red circle, a large blue square and a small green triangle"]
    target = np.stack([parse_caption(c).labels() for c in captions])
    assert (target.shape == (3, NUM_LABELS)
            and [h[0] for h in HEADS][:4] == ["layout", "colour0", "shape0", "size0"])
    perfect = score_labels(target.copy(), target)
    assert (perfect["caption_accuracy"] == 1
            and perfect["by_objects"]["3"] == {"n": 1, "caption_accuracy": 1.0})

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
    from tessera.config import ClassifierConfig
    from tessera.inference.evaluation.classifier import (
        ensure_classifier,
        load_classifier,
        render_scenes,
        spec_of,
    )

    spec = ClassifierConfig(width=4, hidden=16, train_samples=32, steps=2, batch_size=8, test_samples=16,
                            image_size=32, max_objects=3)
    uri = str(tmp_path / "clf")
    model, meta, trained = ensure_classifier(spec, uri)
    assert trained and set(meta["accuracy"]) == {"real", "real_2x"} and meta["spec"]["width"] == 4
    assert ({p.name for p in tmp_path.joinpath("clf").iterdir()}
            == {"classifier.safetensors", "classifier.json"})
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
    assert load_classifier(uri, spec=spec_of(spec.model_copy(update={"steps": 3}))) is None
    # Where it is saved, its threads and retrain are not part of what it learns.
    assert not ensure_classifier(spec.model_copy(update={"threads": 1, "uri": uri}), uri)[2]
    (tmp_path / "clf" / "classifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="classifier.safetensors"):
        load_classifier(uri, spec=spec_of(spec))


def make_prepared_data(root: Path, *, val: int = 10, heldout: int = 6) -> str:
    """A prepared dataset as jobs/prepare.py publishes one (manifest + tar shards with png, txt and
    json attributes), with one val sample whose caption contradicts its attributes."""
    from tessera.data.tar import write_tar

    gen = "gen-test"
    splits = {}
    for split, n, source_split in (("val", val, "train"), ("heldout", heldout, "heldout")):
        samples = []
        for i in range(n):
            s = shapes.render_sample(i, seed=3, image_size=32, split=source_split)
            caption = "a small red circle on the left" if (split == "val" and i == 1) else s.caption
            samples.append((s.key, {"png": s.image_png, "txt": caption.encode(),
                                    "json": json.dumps({"attributes": s.attributes}).encode()}))
        rel = f"{gen}/{split}/shard-000000.tar"
        (root / gen / split).mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(write_tar(samples))
        splits[split] = {"num_samples": n, "shards": [{"path": rel, "num_samples": n}]}
    manifest = {"kind": "tessera.prepared_dataset", "format_version": 1, "generation": gen,
                "source": {"kind": "shapes", "uri": None}, "resolution": 32, "image_format": "png",
                "splits": splits,
                "shapes": {"held_out": sorted(f"{c} {s}" for c, s in shapes.DEFAULT_HELD_OUT)}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def _job(name: str):
    """jobs/{name}.py as a module (its `from _common import ...` needs jobs/ on the path while it loads)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return module


@pytest.mark.integration
def test_evaluate_job_on_a_tiny_bundle_writes_the_report(tmp_path, ray_cluster):
    from tessera.config import load_config

    bundle = make_bundle(tmp_path / "b")
    data = make_prepared_data(tmp_path / "data")
    run = tmp_path / "run"
    (run / "dvae").mkdir(parents=True)
    (run / "dvae" / "history.json").write_text(json.dumps(
        {"stage": "dvae", "rows": [{"step": s, "loss": 1 / s, "val_psnr": 10 + s / 10}
                                   for s in (10, 20, 30)]}))
    cfg = load_config("debug", [f"run.root_uri={run}", f"data.output_uri={data}",
                                f"evaluate.bundle_uri={bundle}", "evaluate.num_captions=6",
                                "evaluate.num_heldout=4", "evaluate.sampling.candidates=3",
                                "evaluate.actors.num_actors=1", "evaluate.actors.batch_size=4",
                                "evaluate.grid_captions=3",
                                "evaluate.recon_images=8", "evaluate.prior_val_rows=8",
                                "evaluate.classifier.width=4", "evaluate.classifier.steps=2",
                                "evaluate.classifier.train_samples=32", "evaluate.classifier.test_samples=16",
                                "evaluate.classifier.batch_size=8"])
    assert _job("evaluate").main(cfg) == 0
    out = run / "eval"
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "grid_val.png", "grid_heldout.png",
                                               "curves_dvae.png", "classifier"}
    val, held = report["splits"]["val"], report["splits"]["heldout"]
    assert val["captions"] == 6 and held["captions"] == 4
    assert val["skipped"]["caption_mismatch"] == 1  # read past the bad sample, counted
    for split in (val, held):
        for mode in ("without_reranking", "with_reranking"):
            m = split[mode]
            assert set(m) >= {"caption_accuracy", "colour", "shape", "size", "layout", "count", "by_objects"}
            assert 0 <= m["caption_accuracy"] <= 1
        assert split["without_reranking"]["caption_accuracy"] <= split["any_candidate"]
    assert held["novel_pairs"]["n"] >= 4  # every held-out caption names one novel pair
    assert report["dvae"]["codebook_size"] == 128 and 0 < report["dvae"]["codebook_usage"] <= 1
    assert report["prior"]["rows"] == 8 and report["prior"]["val_image_loss"] > 0
    assert report["curves"]["dvae"]["reports"] == 3 and report["curves"]["prior"]["missing"]
    assert report["classifier"]["trained_now"] and report["generation"]["images"] == 10 * 3
    md = (out / "report.md").read_text()
    assert "| val | 6 |" in md and "No history.json for: prior, reranker" in md
    from PIL import Image

    with Image.open(out / "grid_val.png") as im:
        assert im.width >= 3 * 32 * 4 and im.height > 3 * 32 * 4  # 3 captions of 3 candidates, x4

    # A second run reuses the classifier and rewrites the report.
    assert _job("evaluate").main(cfg) == 0
    assert not json.loads((out / "report.json").read_text())["classifier"]["trained_now"]
