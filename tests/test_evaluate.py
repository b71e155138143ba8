"""Evaluation: the canonical scene form (captions and attributes agree on it), the scoring rules
on hand-built predictions, the classifier's save/reuse plumbing, R-precision and FID/KID of
generated images without and with reranking (on models whose answers are known), which scorers
evaluate accepts, and jobs/evaluate.py end to end on a tiny untrained bundle and a tiny prepared
dataset, without and then with a scorer and feature weights."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import SHAPES_CAPTIONS, make_bundle
from test_metrics import RandomConvFeatures, export

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


def make_prepared_data(root: Path, *, val: int = 10, heldout: int = 6,
                       tokenizer_json: str | None = None) -> str:
    """A prepared dataset as jobs/prepare.py publishes one (manifest + tar shards with png, txt and
    json attributes, and the tokenizer when given), with one val sample whose caption contradicts
    its attributes."""
    import hashlib

    from tessera.data.tar import write_tar

    gen = "gen-test"
    tokenizer = {}
    if tokenizer_json is not None:
        (root / gen).mkdir(parents=True, exist_ok=True)
        (root / gen / "tokenizer.json").write_text(tokenizer_json)
        from tessera.data.tokenizer import CaptionTokenizer

        vocab = CaptionTokenizer.from_json(tokenizer_json).vocab_size
        tokenizer = {"tokenizer": {"path": f"{gen}/tokenizer.json", "vocab_size": vocab,
                                   "sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}}
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
                "shapes": {"held_out": sorted(f"{c} {s}" for c, s in shapes.DEFAULT_HELD_OUT)}, **tokenizer}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


class PaletteScorer(torch.nn.Module):
    """A contrastive model whose answers are known: caption k embeds as a random vector of its own,
    and an image whose first pixel's red value is k embeds exactly as caption k."""

    def __init__(self, tokenizer, captions: list[str], text_len: int = 16):
        super().__init__()
        from types import SimpleNamespace

        self.shape = SimpleNamespace(text_len=text_len)
        ids, mask = tokenizer.encode(captions, text_len=text_len)
        self.keys = [tuple(r[m].tolist()) for r, m in zip(ids, mask, strict=True)]
        self.table = torch.randn(len(captions), 64, generator=torch.Generator().manual_seed(0))

    def encode_text(self, ids, mask):
        return self.table[[self.keys.index(tuple(r[m].tolist())) for r, m in zip(ids, mask, strict=True)]]

    def encode_image(self, images):  # (B, 3, S, S) in [0, 1]
        return self.table[(images[:, 0, 0, 0] * 255).round().long()]


def palette_images(codes: np.ndarray) -> np.ndarray:
    """codes (N, M) -> uint8 images (N, M, 8, 8, 3) that PaletteScorer reads as those captions."""
    out = np.zeros((*codes.shape, 8, 8, 3), np.uint8)
    out[..., 0, 0, 0] = codes
    return out


def test_r_precision_without_and_with_reranking_on_a_scorer_with_known_answers():
    from tessera.data.tokenizer import CaptionTokenizer, train_tokenizer
    from tessera.inference.evaluation.any_data import Scorer, r_precision_figures

    captions = SHAPES_CAPTIONS[:12]
    tok = CaptionTokenizer.from_json(train_tokenizer(SHAPES_CAPTIONS, vocab_size=300,
                                                     min_frequency=1).to_str())
    scorer = Scorer(PaletteScorer(tok, captions), tok, "palette", 0)
    n = len(captions)
    # Candidate 0 draws the next caption, candidate 1 its own: the reranker's picks decide.
    images = palette_images(np.stack([(np.arange(n) + 1) % n, np.arange(n)], axis=1))
    r = r_precision_figures(scorer, captions, images, np.ones(n, int), distractors=99, seed=0)
    assert (r["without_reranking"], r["with_reranking"]) == (0.0, 1.0)
    assert (r["distractors"], r["chance"], r["images"]) == (11, round(1 / 12, 4), 12)  # every other caption
    half = r_precision_figures(scorer, captions, images, np.array([1] * 6 + [0] * 6), distractors=99, seed=0)
    assert (half["without_reranking"], half["with_reranking"]) == (0.0, 0.5)
    few = r_precision_figures(scorer, captions, images, np.ones(n, int), distractors=3, seed=1)
    assert few["distractors"] == 3 and few["chance"] == 0.25 and few["with_reranking"] == 1.0
    same = r_precision_figures(scorer, [captions[0]] * 3, images[:3], np.zeros(3, int), distractors=9, seed=0)
    assert same == {"status": "not computed: fewer than 2 distinct captions", "images": 3}


def test_fid_and_kid_without_and_with_reranking_against_the_real_images():
    from tessera.inference.evaluation.any_data import fidelity_figures, real_features
    from tessera.inference.evaluation.metrics import InceptionFeatures

    extractor = InceptionFeatures(RandomConvFeatures().eval(), source="random-conv")
    g = np.random.default_rng(0)
    real = (g.random((24, 1, 1, 3)) * 255 * np.ones((24, 32, 32, 3))).astype(np.uint8)  # flat colours
    noise = g.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    images = np.stack([real, noise], axis=1)  # candidate 0: the real images themselves
    feats = real_features(extractor, real)
    figures = fidelity_figures(extractor, feats, images, np.ones(24, int))
    wo, w = figures["without_reranking"], figures["with_reranking"]
    # KID is unbiased: against the very same images it comes out below zero.
    assert abs(wo["fid"]) < 1e-6 and w["fid"] > 1 and w["kid_mean"] > 0 > wo["kid_mean"]
    assert (wo["real"], wo["generated"], wo["kid_subset_size"]) == (24, 24, 24)
    assert real_features(extractor, real[:1]).startswith("FID not computed: 1 real val image")
    broken = InceptionFeatures(torch.nn.Conv2d(4, 4, 1), source="four-channels")  # expects 4 channels
    assert "four-channels: feature extraction failed" in real_features(extractor=broken, real=real)
    one = fidelity_figures(extractor, feats, images[:1], np.ones(1, int))
    assert one["status"].startswith("not computed: 1 generated image")


def export_scorer(uri: str, data_manifest: dict, *, seed: int, step: int = 3) -> None:
    """A tiny reranker export as train_scorer writes one, recording the data's tokenizer."""
    from tessera import artifacts
    from tessera.models.reranker import Reranker, RerankerShape

    torch.manual_seed(seed)
    shape = RerankerShape(text_vocab=300, text_len=16, image_size=32, embed_dim=32, text_dim=32, text_depth=1,
                          text_heads=4, image_width=8, image_stages=3, image_grid=4)
    artifacts.export("reranker", Reranker(shape).state_dict(), shape, uri, data_manifest=data_manifest,
                     step=step)


def test_evaluate_accepts_only_a_scorer_apart_from_the_bundles_reranker(tmp_path):
    from tessera.bundle import read_manifest
    from tessera.inference.evaluation.any_data import load_scorer

    bundle = make_bundle(tmp_path / "b")
    data = make_prepared_data(tmp_path / "data", tokenizer_json=(Path(bundle) / "tokenizer.json").read_text())
    manifest, bm = json.loads(Path(data, "manifest.json").read_text()), read_manifest(bundle)

    def load(uri):
        return load_scorer(uri, data_uri=data, data_manifest=manifest, bundle_manifest=bm)

    missing = str(tmp_path / "run" / "scorer" / "export")
    scorer, entry = load(missing)
    assert scorer is None and entry["status"] == (f"R-precision not computed: no scorer at {missing} "
                                                  "(run train_scorer or set evaluate.scorer_uri)")
    scorer, entry = load(str(tmp_path / "b" / "parts" / "reranker"))  # the export the bundle copied
    assert scorer is None and entry["is_bundle_reranker"] and "the bundle's own reranker" in entry["status"]

    own = str(tmp_path / "scorer")
    export_scorer(own, {"generation": "gen-test", "tokenizer": manifest["tokenizer"]}, seed=1, step=3)
    scorer, entry = load(own)
    assert scorer is not None and scorer.step == entry["step"] == 3 and not entry["is_bundle_reranker"]
    assert entry["status"].startswith(f"scorer {own} (step 3)")
    assert "trained apart from the bundle's reranker" in entry["status"]
    assert scorer.tokenizer.vocab_size == manifest["tokenizer"]["vocab_size"]

    other = str(tmp_path / "other")
    export_scorer(other, {"tokenizer": {**manifest["tokenizer"], "sha256": "0" * 64}}, seed=2)
    scorer, entry = load(other)
    assert scorer is None and "another tokenizer" in entry["status"] and entry["step"] == 3
    (Path(own) / "reranker.safetensors").write_bytes(b"garbage")
    scorer, entry = load(own)
    assert scorer is None and entry["status"].startswith(f"R-precision not computed: {own}")


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
    from tessera.inference.evaluation.metrics import FID_NOT_CONFIGURED

    bundle = make_bundle(tmp_path / "b")
    data = make_prepared_data(tmp_path / "data", tokenizer_json=(Path(bundle) / "tokenizer.json").read_text())
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
    # Held-out bits per image token too (all 6 held-out images), with and without captions.
    p = report["prior"]
    assert p["heldout_rows"] == 6 and p["heldout_image_bits_per_token"] > 0
    uncond = p["heldout_image_loss_uncond"] / math.log(2)
    assert p["heldout_image_bits_per_token_uncond"] == pytest.approx(uncond, rel=1e-3)
    assert 0 < report["dvae"]["ssim"] <= 1
    # No scorer and no Inception weights: said so, not a crash, and no such figures.
    assert report["scorer"]["status"] == (f"R-precision not computed: no scorer at {run}/scorer/export "
                                          "(run train_scorer or set evaluate.scorer_uri)")
    assert report["fidelity"] == {"status": FID_NOT_CONFIGURED, "real_images": 0, "real_split": "val"}
    assert all("r_precision" not in s and "fidelity" not in s for s in report["splits"].values())
    assert report["curves"]["dvae"]["reports"] == 3 and report["curves"]["prior"]["missing"]
    assert report["classifier"]["trained_now"] and report["generation"]["images"] == 10 * 3
    md = (out / "report.md").read_text()
    assert "| val | 6 |" in md and "No history.json for: prior, reranker, scorer" in md
    assert report["scorer"]["status"] in md and FID_NOT_CONFIGURED in md and "dVAE reconstruction SSIM" in md
    assert "prior heldout bits per image token, without captions" in md
    from PIL import Image

    with Image.open(out / "grid_val.png") as im:
        assert im.width >= 3 * 32 * 4 and im.height > 3 * 32 * 4  # 3 captions of 3 candidates, x4

    # A second run, with a scorer of its own and feature weights (a small random conv net exported
    # as Inception's would be), reuses the classifier and adds R-precision and FID/KID.
    export_scorer(str(tmp_path / "scorer"), {"tokenizer": json.loads(Path(data, "manifest.json").read_text())
                                             ["tokenizer"]}, seed=1, step=5)
    (tmp_path / "features.pt2").write_bytes(export(RandomConvFeatures()))
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "scorer_uri": str(tmp_path / "scorer"), "inception_weights_uri": str(tmp_path / "features.pt2")})})
    assert _job("evaluate").main(cfg) == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["classifier"]["trained_now"]
    assert report["scorer"]["step"] == 5 and report["scorer"]["uri"] == str(tmp_path / "scorer")
    assert report["fidelity"]["real_images"] == 8  # the val images read: max(captions, recon, prior rows)
    for name, n in (("val", 6), ("heldout", 4)):
        r, f = report["splits"][name]["r_precision"], report["splits"][name]["fidelity"]
        distinct = len({c for c in _captions(data, name)[:n]})
        assert r["images"] == n and r["distractors"] == distinct - 1 and r["chance"] == round(1 / distinct, 4)
        assert all(0 <= r[m] <= 1 for m in ("without_reranking", "with_reranking"))
        assert {m: f[m]["generated"] for m in f} == {"without_reranking": n, "with_reranking": n}
        assert all(math.isfinite(f[m]["fid"]) and f[m]["real"] == 8 for m in f)
    md = (out / "report.md").read_text()
    assert f"the scorer is `{tmp_path / 'scorer'}` at step 5" in md
    assert "FID/KID against 8 real val images" in md


def _captions(data: str, split: str) -> list[str]:
    """The usable captions of a split of make_prepared_data, in order (the mismatched one left out)."""
    from tessera.inference.evaluation.run import read_split

    manifest = json.loads(Path(data, "manifest.json").read_text())
    return read_split(data, manifest, split, 100).captions
