"""jobs/pipeline.py as a user runs it on their own data: a small WebDataset (not the shapes source)
on an S3-compatible server, every stage through `evaluate` in its own process and its own local
Ray — tiny models, a few steps, a fifth of the captions held out. The run must not end FAILED at
evaluate; the report holds what can be measured on any data (R-precision under the scorer that
train_scorer trained, FID/KID with feature weights read from S3, dVAE PSNR/SSIM, bits per image
token for val and held-out), the bundle's model card says what it was trained on, and every socket
the job's Ray opened was on 127.0.0.1 with callers refused without the token."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import yaml
from corpus import bad_samples, good_samples, tar_bytes
from local_ray import LOOPBACK, ROOT, Watcher, stop_tree, subprocess_env
from test_metrics import RandomConvFeatures, export

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STAGES = "prepare,train_dvae,encode,train_prior,export,train_scorer,evaluate"
SMALL = [
    "data.samples_per_shard=40", "data.val_fraction=0.2", "ray.data_cpu_limit=1", "ray.num_cpus=4",
    "loader.local_shuffle_buffer=16", "tokenizer.min_frequency=1",
    "dvae.steps=4", "dvae.micro_batch=8", "dvae.report_every=2", "dvae.eval_every=4",
    "dvae.checkpoint_every=4", "dvae.beta_steps=4", "dvae.warmup_steps=1",
    "prior.steps=4", "prior.micro_batch=4", "prior.dim=32", "prior.depth=1", "prior.heads=2",
    "prior.report_every=2", "prior.eval_every=4", "prior.checkpoint_every=4", "prior.warmup_steps=1",
    "prior.val_samples=4", "prior.grid_captions=1", "prior.grid_samples=1",
    "scorer.steps=4", "scorer.micro_batch=8", "scorer.warmup_steps=1", "scorer.report_every=2",
    "scorer.eval_every=4", "scorer.checkpoint_every=4", "scorer.val_pairs=8",
    "data.heldout.fraction=0.2", "evaluate.num_heldout=4",
    "evaluate.num_captions=4", "evaluate.sampling.candidates=2", "evaluate.actors.num_actors=1",
    "evaluate.recon_images=8", "evaluate.prior_val_rows=8", "evaluate.grid_captions=2",
    "export.card.license=cc-by-nc-4.0", "export.card.limitations=['Trained on random noise.']",
]


def _read_json(s3_client, bucket: str, key: str):
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_pipeline_on_webdataset_from_s3_runs_through_evaluate(s3_server, s3_client, bucket, tmp_path):
    good = good_samples(60, prefix="pair")
    corrupt = [s for s in bad_samples()[0] if s[0] == "bad-corrupt"]
    for i, part in enumerate((good[:30] + corrupt, good[30:])):
        s3_client.upload_fileobj(io.BytesIO(tar_bytes(part)), bucket, f"shards/{i:06d}.tar")
    # A small random conv net exported as Inception's features would be: the FID/KID plumbing from S3.
    s3_client.put_object(Bucket=bucket, Key="weights/features.pt2", Body=export(RandomConvFeatures()))
    run = f"s3://{bucket}/run"
    sets = ["data.source.kind=webdataset", f"data.source.uri=s3://{bucket}/shards/", f"run.root_uri={run}",
            f"evaluate.inception_weights_uri=s3://{bucket}/weights/features.pt2", *SMALL]
    command = [sys.executable, "jobs/pipeline.py", "--config", "debug", "--only", STAGES,
               *[a for s in sets for a in ("--set", s)]]
    log = open(tmp_path / "pipeline.log", "w")
    proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(tmp_path), stdout=log,
                            stderr=subprocess.STDOUT)
    watcher = Watcher(proc.pid)
    watcher.start()
    try:
        rc = proc.wait(timeout=540)
    finally:
        watcher.stop.set()
        watcher.join()
        stop_tree(proc)
        log.close()
    out = (tmp_path / "pipeline.log").read_text()
    assert rc == 0, out[-6000:]
    times = _read_json(s3_client, bucket, "run/pipeline.json")
    assert list(times) == STAGES.split(",") and all(t["status"] == "ran" for t in times.values()), times

    # The job's own Ray: loopback only, and no way in without the token.
    names = {name for _, _, name in watcher.sockets}
    assert {"gcs_server", "raylet"} <= names, watcher.sockets
    assert [s for s in watcher.sockets if s[0] not in LOOPBACK] == []
    anonymous = watcher.anonymous
    assert {v for (kind, _), v in anonymous.items() if kind == "gcs"} == {"UNAUTHENTICATED"}, anonymous
    assert 401 in {v for (kind, _), v in anonymous.items() if kind == "dashboard"}, anonymous

    # The scorer: a reranker export of its own, trained on the train split, apart from any bundle.
    scorer = _read_json(s3_client, bucket, "run/scorer/export/reranker.json")
    assert scorer["kind"] == "tessera.reranker" and scorer["step"] == 4
    assert scorer["config"]["scorer"]["seed"] == 1 != scorer["config"]["reranker"]["seed"]
    assert _read_json(s3_client, bucket, "run/scorer/history.json")["stage"] == "scorer"

    # Evaluate reports what it can on any data, for val and held-out captions, and no caption accuracy.
    report = _read_json(s3_client, bucket, "run/eval/report.json")
    assert report["data"]["source"] == "webdataset" and report["classifier"] is None
    sc = report["scorer"]
    assert (sc["uri"], sc["step"], sc["is_bundle_reranker"]) == (f"{run}/scorer/export", 4, False)
    assert "apart from the bundle's reranker" in sc["status"]
    fid = report["fidelity"]
    assert fid["real_images"] == 8 and f"s3://{bucket}/weights/features.pt2" in fid["status"]
    for name in ("val", "heldout"):
        s = report["splits"][name]
        assert s["captions"] == 4 and "with_reranking" not in s
        r = s["r_precision"]  # four distinct captions: each image's own among the 3 others
        assert (r["images"], r["distractors"], r["chance"]) == (4, 3, 0.25)
        # No reranker in this bundle: its "pick" is candidate 0.
        assert r["with_reranking"] == r["without_reranking"] and 0 <= r["without_reranking"] <= 1
        f = s["fidelity"]
        assert all(math.isfinite(f[m]["fid"]) and (f[m]["real"], f[m]["generated"]) == (8, 4)
                   for m in ("without_reranking", "with_reranking"))
    assert report["dvae"]["images"] == 8 and report["dvae"]["psnr_db"] > 0 and 0 < report["dvae"]["ssim"] <= 1
    p = report["prior"]
    assert p["rows"] == 8 and math.isclose(p["val_image_bits_per_token"], p["val_image_loss"] / math.log(2),
                                           rel_tol=1e-3)
    assert p["heldout_rows"] >= 4 and all(p[f"{s}_image_bits_per_token{u}"] > 0
                                          for s in ("val", "heldout") for u in ("", "_uncond"))
    assert report["files"]["grids"] == ["grid_val.png", "grid_heldout.png"]
    assert report["generation"]["images"] == (4 + 4) * 2
    grid = s3_client.get_object(Bucket=bucket, Key="run/eval/grid_heldout.png")["Body"].read()
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    md = s3_client.get_object(Bucket=bucket, Key="run/eval/report.md")["Body"].read().decode()
    assert "bits per image token" in md and "Caption accuracy" not in md
    assert f"the scorer is `{run}/scorer/export` at step 4" in md
    assert "FID/KID against 8 real val images" in md
    assert "| heldout | 4 | no (candidate 0) |" in md and "dVAE reconstruction SSIM" in md

    # The bundle's model card: its data and counts, sizes, steps, the evaluation, license.
    card = s3_client.get_object(Bucket=bucket, Key="run/bundle/README.md")["Body"].read().decode()
    facts = yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))
    f = facts["tessera"]
    assert facts["license"] == "cc-by-nc-4.0" and facts["pipeline_tag"] == "text-to-image"
    assert f["data"]["source"] == "webdataset" and f["data"]["source_uri"] == f"s3://{bucket}/shards/"
    assert f["data"]["kept_samples"] == 60 and f["data"]["input_samples"] == 61
    assert f["data"]["skipped"] == {"corrupt_image": 1} and sum(f["data"]["splits"].values()) == 60
    assert f["data"]["splits"]["heldout"] > 0
    assert f["parts"]["dvae"]["steps"] == 4 and f["parts"]["prior"]["steps"] == 4
    assert "reranker" not in f["parts"] and all(m["parameters"] > 0 for m in f["parts"].values())
    assert f["parameters"] == sum(m["parameters"] for m in f["parts"].values())
    assert f["evaluation"]["dvae_psnr_db"] == report["dvae"]["psnr_db"]
    assert f["evaluation"]["prior_val_image_bits_per_token"] == p["val_image_bits_per_token"]
    assert "caption_accuracy" not in f["evaluation"]
    assert "Source: webdataset" in card and "- Trained on random noise." in card
    assert "procedural shapes" not in card and "Not evaluated yet" not in card
