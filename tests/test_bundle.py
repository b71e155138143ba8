"""The model bundle: written from exports, loaded without unpickling, refused when corrupt or
mismatched; and the generator on top of it (seeds, candidates, reranking order)."""

import json

import numpy as np
import pytest
import torch
from bundles import make_bundle

from tessera.bundle import BundleError, load_bundle, write_bundle
from tessera.sampling.generate import GenerationParams, ImageGenerator
from tessera.sampling.sampler import sample_image_tokens


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_bundle_round_trip_and_manifest(bundle_uri):
    b = load_bundle(bundle_uri)
    m = json.loads(open(f"{bundle_uri}/manifest.json").read())
    assert b.name == "tessera-test" and b.resolution == 32 and b.text_len == 16 and b.reranker is not None
    assert set(m["files"]) == {"dvae.safetensors", "dvae.json", "prior.safetensors", "prior.json",
                               "reranker.safetensors", "reranker.json", "tokenizer.json"}
    assert m["parts"]["prior"]["shape"]["grid"] == 8
    assert not any(p.name.endswith((".pt", ".pkl", ".bin"))
                   for p in __import__("pathlib").Path(bundle_uri).iterdir())


def test_corrupt_or_missing_bundles_are_refused_by_name(tmp_path):
    uri = make_bundle(tmp_path, reranker=False)
    assert load_bundle(uri).reranker is None
    weights = tmp_path / "bundle" / "prior.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="prior.safetensors.*sha256"):
        load_bundle(uri)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(str(tmp_path / "nowhere"))
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(uri, dvae_uri=str(tmp_path / "parts/dvae"), prior_uri=str(tmp_path / "parts/prior"),
                     tokenizer_uri=str(tmp_path / "parts/tokenizer/tokenizer.json"), name="x")


def test_parts_that_do_not_fit_together_are_refused(tmp_path):
    from tessera import artifacts
    from tessera.models.dvae import DVAE, DVAEShape

    make_bundle(tmp_path, reranker=False)
    other = DVAEShape(image_size=32, num_tokens=64, grid_size=8, hidden=32, blocks_per_group=1,
                      decoder_init=64)
    artifacts.export("dvae", DVAE(other).state_dict(), other, str(tmp_path / "dvae64"))
    with pytest.raises(BundleError, match="image_vocab 128 != dVAE codebook 64"):
        write_bundle(str(tmp_path / "b2"), dvae_uri=str(tmp_path / "dvae64"),
                     prior_uri=str(tmp_path / "parts/prior"),
                     tokenizer_uri=str(tmp_path / "parts/tokenizer/tokenizer.json"), name="x")
    assert not (tmp_path / "b2").exists()  # nothing half-written


def test_generator_seeds_candidates_and_reranking(bundle_uri):
    gen = ImageGenerator(load_bundle(bundle_uri))
    p = GenerationParams(n=2, seed=7, top_k=20)
    a, b, c = gen.generate([("a red circle on the left", p), ("a blue square", p),
                            ("a red circle on the left", GenerationParams(n=1, seed=8))])
    assert len(a) == 2 and a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    again = gen.generate([("a red circle on the left", p)])[0]
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))  # batch-independent
    assert not np.array_equal(a[0], c[0])
    # candidates: the kept images are the reranker's best of the M drawn, best first.
    best = gen.generate([("a green triangle", GenerationParams(n=2, seed=3, candidates=6))])[0]
    # The same six draws by hand: candidate j of seed 3 is seeded 3000 + j.
    ids, mask = gen.encode_prompts(["a green triangle"])
    tokens = sample_image_tokens(gen.prior, ids, mask, seed=[3000 + j for j in range(6)],
                                 samples_per_prompt=6)
    images = gen.dvae.decode(tokens)
    order = gen.score(["a green triangle"] * 6, images).argsort(descending=True)
    want = (images[order[:2]] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(x, y) for x, y in zip(best, want, strict=True))
    assert not np.array_equal(best[0],
                              (images[order[-1]] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="^n:"):
        gen.generate([("x", GenerationParams(n=11))])
    with pytest.raises(ValueError, match="^candidates:"):
        gen.generate([("x", GenerationParams(n=3, candidates=2))])
    # Past MAX_CANDIDATES candidate seeds (s·1000 + j) would run into the next seed's streams.
    with pytest.raises(ValueError, match="^candidates: must be between n=1 and 512"):
        gen.generate([("x", GenerationParams(n=1, candidates=513))])
    # A caller's own limit is the lower one.
    with pytest.raises(ValueError, match="and 16, got 17"):
        gen.check(GenerationParams(n=1, candidates=17), max_candidates=16)


def _export(tmp_path, *overrides):
    import subprocess
    import sys

    parts = tmp_path / "parts"
    args = [sys.executable, "jobs/export.py", "--config", "debug",
            "--set", f"run.root_uri={tmp_path / 'run'}",
            "--set", f"export.prior_uri={parts / 'prior'}",
            "--set", f"prior.tokens_uri={parts / 'tokenizer'}",
            "--set", f"encode.dvae_uri={parts / 'dvae'}", "--set", f"reranker.output_uri={parts / 'rr'}"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_the_readme_quick_start_draws_a_png(bundle_uri, tmp_path):
    """README's three lines: load a bundle by URI, draw, save; the image is the one generate()
    gives for the same prompt and seed."""
    generator = ImageGenerator.load(bundle_uri)
    generator.draw("a small red circle on the left", seed=3, candidates=2).save(tmp_path / "circle.png")
    from PIL import Image

    with Image.open(tmp_path / "circle.png") as im:
        saved = np.asarray(im.convert("RGB"))
    [[expected]] = generator.generate([("a small red circle on the left",
                                        GenerationParams(seed=3, candidates=2))])
    assert saved.shape == (generator.resolution, generator.resolution, 3) and np.array_equal(saved, expected)


def test_export_job_writes_a_bundle_to_s3_that_loads_back(tmp_path, s3_server, bucket):
    """jobs/export.py finds the parts from the config and the prior's export, and writes the
    bundle to an S3-compatible bucket over HTTP; a prior trained with another tokenizer is refused."""
    import shutil

    from tessera import artifacts, storage

    make_bundle(tmp_path)
    parts = tmp_path / "parts"
    shutil.copytree(parts / "reranker", parts / "rr" / "export")
    meta = json.loads((parts / "prior" / artifacts.PARTS["prior"].meta).read_text())
    tok_sha = __import__("hashlib").sha256((parts / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    meta["tokens"] = {"tokenizer": {"sha256": tok_sha}, "dvae": {"uri": str(parts / "dvae")}}
    (parts / "prior" / artifacts.PARTS["prior"].meta).write_text(json.dumps(meta))

    uri = f"s3://{bucket}/models/debug"
    done = _export(tmp_path, f"export.output_uri={uri}", "export.name=shapes-v1")
    assert done.returncode == 0, done.stderr
    assert "bundle 'shapes-v1'" in done.stdout and "reranker (step 0" in done.stdout
    b = load_bundle(uri)
    assert (b.name == "shapes-v1" and b.reranker is not None
            and b.manifest["sources"]["dvae"] == str(parts / "dvae"))
    assert storage.exists(f"{uri}/tokenizer.json")

    meta["tokens"]["tokenizer"]["sha256"] = "0" * 64
    (parts / "prior" / artifacts.PARTS["prior"].meta).write_text(json.dumps(meta))
    bad = _export(tmp_path, f"export.output_uri={tmp_path / 'b2'}")
    assert bad.returncode == 2 and "not the tokenizer the prior" in bad.stderr
    assert not (tmp_path / "b2").exists()


def test_export_reads_the_tokenizer_where_the_token_manifest_puts_it(tmp_path):
    """Token datasets keep their tokenizer inside their generation; a stale top-level one (the
    layout before that) is not what the bundle gets."""
    import hashlib
    import shutil

    from tessera import artifacts, storage
    from tessera.bundle import export_bundle
    from tessera.config import load_config

    make_bundle(tmp_path, reranker=False)
    parts, tokens = tmp_path / "parts", tmp_path / "tokens"
    (tokens / "gen-b").mkdir(parents=True)
    shutil.copy(parts / "tokenizer" / "tokenizer.json", tokens / "gen-b" / "tokenizer.json")
    (tokens / "tokenizer.json").write_text('{"stale": true}')
    tok_sha = hashlib.sha256((tokens / "gen-b" / "tokenizer.json").read_bytes()).hexdigest()
    (tokens / "manifest.json").write_text(json.dumps({
        "kind": "tessera.token_dataset", "format_version": 1, "generation": "gen-b",
        "tokenizer": {"path": "gen-b/tokenizer.json", "sha256": tok_sha}}))
    meta_path = parts / "prior" / artifacts.PARTS["prior"].meta
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokens": {"tokenizer": {"sha256": tok_sha}}}))
    cfg = load_config("debug", [f"run.root_uri={tmp_path / 'run'}", f"export.prior_uri={parts / 'prior'}",
                                f"prior.tokens_uri={tokens}", f"encode.dvae_uri={parts / 'dvae'}",
                                "export.include_reranker=false"])
    manifest = export_bundle(cfg)
    assert manifest["sources"]["tokenizer"] == str(tokens / "gen-b" / "tokenizer.json")
    assert manifest["files"]["tokenizer.json"]["sha256"] == tok_sha
    assert load_bundle(cfg.paths.bundle).tokenizer.vocab_size > 0
    assert storage.exists(storage.join(cfg.paths.bundle, "manifest.json"))
