"""The model card (tessera.model_card): README.md in a real tiny bundle, written from its manifest,
its safetensors and the config; evaluation figures joining it only when they are of this bundle;
and the summary GET /v1/models/{id} returns."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from bundles import make_bundle

from tessera import model_card
from tessera.bundle import load_bundle, read_manifest
from tessera.config import ConfigError, load_config

CARD = ["export.card.license=cc-by-nc-4.0", "export.card.license_link=https://example.org/license",
        "export.card.intended_use=Unit tests only.", "export.card.limitations=['It has never seen a face.']"]


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.removeprefix("---\n").split("\n---\n", 1)[0])


def _report(uri: str, created: str, *, accuracy: bool = False) -> dict:
    splits = {"val": {"captions": 4}}
    if accuracy:
        splits["val"] |= {"without_reranking": {"caption_accuracy": 0.25},
                          "with_reranking": {"caption_accuracy": 0.5}}
    return {"created": created, "bundle": {"uri": uri}, "data": {"source": "webdataset"}, "splits": splits,
            "dvae": {"images": 8, "psnr_db": 21.5, "codebook_usage": 0.4},
            "prior": {"val_image_loss": 2.0, "val_image_bits_per_token": 2.885}}


@pytest.fixture
def bundle(tmp_path):
    uri = make_bundle(tmp_path / "b")  # {run.root_uri}/bundle for run.root_uri = tmp_path/b
    cfg = load_config("debug", [f"run.root_uri={tmp_path / 'b'}", *CARD])
    assert cfg.paths.bundle == uri
    return uri, cfg


def test_card_states_sizes_steps_license_and_limitations(bundle):
    uri, cfg = bundle
    card_uri = model_card.write_card(cfg, read_manifest(uri))
    text = open(card_uri).read()
    front = _front(text)
    facts = front["tessera"]
    assert front["license"] == "cc-by-nc-4.0" and front["license_link"] == "https://example.org/license"
    assert front["pipeline_tag"] == "text-to-image"

    loaded = load_bundle(uri)  # the card is not in the manifest: the digests still hold
    truth = {p: sum(t.numel() for t in getattr(loaded, p).state_dict().values())
             for p in ("dvae", "prior", "reranker")}
    # The test bundle's prior and reranker JSON give no count: read from the safetensors headers.
    assert {p: m["parameters"] for p, m in facts["parts"].items()} == truth
    assert facts["parameters"] == sum(truth.values()) and f"{sum(truth.values()):,} parameters in all" in text
    assert facts["parts"]["prior"]["steps"] == 0
    assert facts["tokenizer"]["vocab_size"] == loaded.tokenizer.vocab_size
    assert facts["resolution"] == 32 and facts["text_len"] == 16 and facts["evaluation"] is None
    assert "records no dataset" in facts["data"]["unavailable"]  # hand-made: no tokens manifest behind it
    assert "Unit tests only." in text and "- It has never seen a face." in text
    assert "Untrained weights (dvae, prior)" in text and "Not evaluated yet" in text
    assert "https://example.org/license" in text.split("## License", 1)[1]


def test_evaluation_joins_the_card_only_when_it_is_of_this_bundle(bundle):
    uri, cfg = bundle
    manifest = read_manifest(uri)
    report_path = f"{cfg.paths.eval}/report.json"
    os.makedirs(cfg.paths.eval)
    for where, created in ((uri, "2000-01-01T00:00:00+00:00"),  # older than the bundle: a previous one
                           (uri + "-elsewhere", "2999-01-01T00:00:00+00:00")):
        with open(report_path, "w") as f:
            json.dump(_report(where, created), f)
        model_card.write_card(cfg, manifest)
        assert _front(open(f"{uri}/README.md").read())["tessera"]["evaluation"] is None
    with open(report_path, "w") as f:
        json.dump(_report(uri, "2999-01-01T00:00:00+00:00"), f)
    model_card.write_card(cfg, manifest)
    evaluation = _front(open(f"{uri}/README.md").read())["tessera"]["evaluation"]
    assert evaluation["dvae_psnr_db"] == 21.5 and evaluation["prior_val_image_bits_per_token"] == 2.885

    # What the evaluate job does afterwards: its figures replace the card's, the rest stays.
    later = _report(uri, "2999-02-01T00:00:00+00:00", accuracy=True)
    assert model_card.add_evaluation(uri, later, report_path)
    text = open(f"{uri}/README.md").read()
    facts = _front(text)["tessera"]
    assert facts["evaluation"]["caption_accuracy"]["val"] == {"captions": 4, "without_reranking": 0.25,
                                                              "with_reranking": 0.5}
    assert facts["license"]["license"] == "cc-by-nc-4.0" and "Not evaluated yet" not in text
    assert "| dVAE reconstruction PSNR | 21.50 dB |" in text and "25.0% → 50.0% reranked" in text

    other = make_bundle(uri.rsplit("/", 2)[0] + "/other")  # no card: nothing to add to, nothing written
    assert not model_card.add_evaluation(other, _report(other, "2999-01-01T00:00:00+00:00"), report_path)
    assert not os.path.exists(f"{other}/README.md")


def test_summary_is_the_card_without_uris(bundle, tmp_path):
    uri, cfg = bundle
    model_card.write_card(cfg, read_manifest(uri))
    model_card.add_evaluation(uri, _report(uri, "2999-01-01T00:00:00+00:00"), "s3://private/report.json")
    s = model_card.summary(uri)
    assert s == model_card.summary(load_bundle(uri))
    assert s["name"] == "tessera-test" and s["card"] and s["license"]["license"] == "cc-by-nc-4.0"
    assert s["parameters"] == sum(p["parameters"] for p in s["parts"].values()) > 0
    assert s["evaluation"]["dvae_psnr_db"] == 21.5 and "report" not in s["evaluation"]
    assert s["intended_use"] == "Unit tests only." and "It has never seen a face." in s["limitations"]
    dumped = json.dumps(s)
    assert str(tmp_path) not in dumped and "s3://" not in dumped and "shape" not in s["parts"]["prior"]

    shutil.move(f"{uri}/README.md", tmp_path / "card.md")  # a bundle exported before cards: its manifest
    bare = model_card.summary(uri)
    assert not bare["card"] and bare["name"] == "tessera-test"
    assert set(bare["parts"]) == {"dvae", "prior", "reranker"}


def test_a_bad_license_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"export\.card\.license"):
        load_config("debug", ["export.card.license=not a license!"])
