"""The whole pipeline end to end (jobs/pipeline.py: the stages `make demo` runs, through the same
job entrypoints) on a much smaller config, in the session's Ray; then every artifact and manifest
it published is checked, and a rerun skips every stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tessera.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"

SMALL = [
    "data.source.shapes.num_samples=240", "data.source.shapes.num_heldout=24", "data.samples_per_shard=80",
    "data.val_fraction=0.1", "ray.data_cpu_limit=1", "loader.local_shuffle_buffer=32",
    "dvae.steps=6", "dvae.micro_batch=8", "dvae.report_every=3", "dvae.eval_every=6",
    "dvae.checkpoint_every=6",
    "dvae.beta_steps=6", "dvae.warmup_steps=1",
    "prior.steps=6", "prior.micro_batch=4", "prior.dim=32", "prior.depth=1", "prior.heads=2",
    "prior.report_every=3", "prior.eval_every=6", "prior.checkpoint_every=6", "prior.warmup_steps=1",
    "prior.val_samples=8", "prior.grid_captions=2", "prior.grid_samples=2",
    "reranker.steps=4", "reranker.micro_batch=8", "reranker.warmup_steps=1", "reranker.report_every=2",
    "reranker.eval_every=4", "reranker.checkpoint_every=4", "reranker.val_pairs=16",
    "scorer.steps=4", "scorer.micro_batch=8", "scorer.warmup_steps=1", "scorer.report_every=2",
    "scorer.eval_every=4", "scorer.checkpoint_every=4", "scorer.val_pairs=16",
    "evaluate.num_captions=6", "evaluate.num_heldout=4", "evaluate.sampling.candidates=2",
    "evaluate.actors.num_actors=1",
    "evaluate.recon_images=8", "evaluate.prior_val_rows=8", "evaluate.grid_captions=2",
    "evaluate.classifier.steps=3", "evaluate.classifier.train_samples=32",
    "evaluate.classifier.test_samples=16",
]


@pytest.fixture(scope="module")
def pipeline():
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    import pipeline as module

    return module


def test_pipeline_end_to_end_publishes_every_artifact_and_resumes(ray_cluster, tmp_path, pipeline, capsys):
    from tessera.bundle import load_bundle
    from tessera.stages import NAMES

    root = tmp_path / "run"
    cfg = load_config("debug", [f"run.root_uri={root}", *SMALL])
    assert pipeline.main(cfg) == 0
    times = json.loads((root / "pipeline.json").read_text())
    assert list(times) == list(NAMES) and all(t["status"] == "ran" for t in times.values()), times

    data = json.loads((root / "data" / "manifest.json").read_text())
    assert data["splits"]["train"]["num_samples"] + data["splits"]["val"]["num_samples"] == 240
    assert data["splits"]["heldout"]["num_samples"] == 24
    assert (root / "data" / data["tokenizer"]["path"]).is_file()
    tokens = json.loads((root / "tokens" / "manifest.json").read_text())
    assert tokens["splits"]["val"]["num_samples"] == data["splits"]["val"]["num_samples"]
    for stage, meta, steps in (("dvae", "dvae.json", 6), ("prior", "prior.json", 6),
                               ("reranker", "reranker.json", 4), ("scorer", "reranker.json", 4)):
        exported = json.loads((root / stage / "export" / meta).read_text())
        assert exported["step"] == steps, stage
        assert (root / stage / "export" / meta.replace(".json", ".safetensors")).stat().st_size > 0
        history = json.loads((root / stage / "history.json").read_text())
        assert history["stage"] == stage and history["rows"][-1]["step"] == steps
        assert [r["step"] for r in history["rows"]] == sorted({r["step"] for r in history["rows"]})

    bundle = load_bundle(str(root / "bundle"))  # checks every file's sha256 against the manifest
    assert {"dvae", "prior", "reranker"} <= set(bundle.manifest["parts"]) and bundle.reranker is not None

    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["bundle"]["uri"].rstrip("/").endswith("bundle")
    # R-precision is graded by the scorer, not by the bundle's reranker.
    assert report["scorer"]["step"] == 4 and not report["scorer"]["is_bundle_reranker"]
    assert all("with_reranking" in report["splits"][s]["r_precision"] for s in ("val", "heldout"))
    for png in (root / "eval").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "eval" / "report.md").is_file()

    # A rerun finds every stage published and does nothing.
    capsys.readouterr()
    assert pipeline.main(cfg) == 0
    out = capsys.readouterr().out
    times = json.loads((root / "pipeline.json").read_text())
    assert all(t["status"] == "skipped" for t in times.values()), times
    assert out.count("done, skipped") == len(NAMES)

    # A longer prior is not done any more: only that stage (and what depends on it) reruns.
    longer = load_config("debug", [f"run.root_uri={root}", *SMALL, "prior.steps=8",
                                   "prior.checkpoint_every=8", "prior.eval_every=8"])
    assert pipeline.main(longer) == 0
    times = json.loads((root / "pipeline.json").read_text())
    assert ([n for n, t in times.items() if t["status"] == "ran"]
            == ["train_prior", "export", "evaluate"]), times
    assert json.loads((root / "prior" / "export" / "prior.json").read_text())["step"] == 8


def test_unknown_stage_names_are_refused(pipeline):
    with pytest.raises(SystemExit, match="unknown stage"):
        pipeline._stage_list("prepare,train_everything", ("prepare", "train_dvae"))
