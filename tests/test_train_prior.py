"""Stage 2 under real Ray Train workers and a real DeepSpeed engine (ZeRO-3 on CPU with gloo):
checkpoint + resume continue the same trajectory (with EMA and per-resblock gradient scaling on),
a worker killed mid-run is replaced and the run finishes from its last checkpoint; the token
pipeline feeds Ray Train from Parquet shards; the per-resblock scaler skips an update under
ZeRO-3 when a block's gradient overflows.

Batches come from a deterministic stream keyed by step: the image tokens are a function of the
caption's first id, so a model that reads its caption can learn them."""

from pathlib import Path

import numpy as np
import pytest
from train_harness import StepKeyedHooksBase, losses, reports
from train_harness import fit as harness_fit

from tessera.config import load_config

pytestmark = pytest.mark.integration

MANIFEST = {"kind": "synthetic", "text_vocab_size": 40, "num_image_tokens": 16, "grid_size": 3}


def synthetic_rows(first: int, n: int, *, text_len: int = 6) -> dict:
    g = np.random.default_rng(first)
    ids = g.integers(1, MANIFEST["text_vocab_size"], size=(n, text_len)).astype(np.int32)
    lengths = g.integers(1, text_len + 1, size=n)
    mask = np.arange(text_len)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    grid_tokens = MANIFEST["grid_size"] ** 2
    image = (ids[:, :1] + np.arange(grid_tokens)[None, :]) % MANIFEST["num_image_tokens"]
    return {"text_ids": ids, "text_mask": mask, "image_tokens": image.astype(np.int16),
            "caption": np.array([f"caption {i}" for i in range(first, first + n)], dtype=object)}


class StepKeyedHooks(StepKeyedHooksBase):
    """Batch for step i: synthetic token rows keyed by (step, rank)."""

    def batches(self, epoch: int):
        from tessera.parallel import dist

        step = epoch
        while True:
            self.maybe_interrupt(step)
            mb = self.cfg.prior.micro_batch
            rows = synthetic_rows((step * 2 + dist.rank()) * 1000, mb, text_len=self.cfg.loader.text_len)
            yield {k: rows[k] for k in ("text_ids", "text_mask", "image_tokens")}
            step += 1

    def token_manifest(self):
        return MANIFEST

    def validation_rows(self):
        return synthetic_rows(10_000_000, 8, text_len=self.cfg.loader.text_len)

    def image_decoder(self):
        # This synthetic data has no dVAE: each token is drawn as a grey level.
        return lambda tokens: (tokens.float() / MANIFEST["num_image_tokens"])[:, None].expand(-1, 3, -1, -1)


def step_keyed_loop(config: dict) -> None:
    from tessera.training.prior_loop import train_prior

    train_prior(config["cfg"], StepKeyedHooks(config))


def fit(cfg, tmp_path, name: str, log: Path, **kwargs):
    return harness_fit(step_keyed_loop, cfg, tmp_path, name, log, **kwargs)


TINY = ["prior.dim=32", "prior.depth=2", "prior.heads=4", "loader.text_len=6", "prior.micro_batch=4",
        "prior.steps=6", "prior.report_every=1", "prior.checkpoint_every=3", "prior.eval_every=3",
        "prior.warmup_steps=1", "prior.lr=3e-3", "prior.val_samples=8", "prior.grid_captions=2",
        "prior.grid_samples=2", "prior.zero_stage=3", "prior.caption_dropout=0.25"]


def test_zero3_checkpoint_and_resume_continue_the_same_run(ray_cluster, tmp_path):
    import ray.train

    cfg = load_config("debug", [*TINY, "prior.ema_decay=0.5", "prior.resblock_grad_scaling=true",
                                "prior.precision=fp32"])
    straight = tmp_path / "straight.jsonl"
    fit(cfg, tmp_path, "straight", straight)
    a = losses(straight)
    assert sorted(a) == [1, 2, 3, 4, 5, 6]

    resumed = tmp_path / "resumed.jsonl"
    interrupt = {"at": 3, "how": "raise", "flag": str(tmp_path / "interrupted")}
    with pytest.raises(ray.train.TrainingFailedError):
        fit(cfg, tmp_path, "resumed", resumed, interrupt=interrupt)
    assert sorted(losses(resumed)) == [1, 2, 3]  # died after the step-3 checkpoint
    fit(cfg, tmp_path, "resumed", resumed, interrupt=interrupt)  # same name: resumes
    b = losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    last_a, last_b = reports(straight)[-1], reports(resumed)[-1]
    # Validation runs on the EMA weights: equal after the resume means the EMA was restored; equal
    # grad scales mean the scaler's state was.
    for key in ("val_image_loss", "val_image_loss_uncond", "grad_scale_max", "grad_scale_min"):
        assert last_b[key] == pytest.approx(last_a[key], rel=1e-5), key
    assert last_a["skipped_updates"] == 0
    assert last_a["tokens_per_s"] > 0 and last_a["image_bits"] > 0
    assert a[6] < a[1]  # and it learns
    grids = sorted(p.name for p in (tmp_path / "artifacts" / "samples").glob("*.png"))
    assert "step-0000006.png" in grids


def test_killed_worker_is_replaced_and_run_finishes_from_checkpoint(ray_cluster, tmp_path):
    cfg = load_config("debug", [*TINY, "prior.precision=fp32",
                                "prior.grad_accum=2"])  # 2 micro-batches per step
    log = tmp_path / "killed.jsonl"
    interrupt = {"at": 8, "how": "exit", "flag": str(tmp_path / "killed")}  # batch 8: the first of step 5
    result = fit(cfg, tmp_path, "killed", log, interrupt=interrupt, max_failures=1)
    assert Path(interrupt["flag"]).exists()  # the worker did die
    steps = [m["step"] for m in reports(log)]
    # Steps 1-4 ran before the death, then the replacement group resumed from the step-3 checkpoint.
    assert steps == [1, 2, 3, 4, 4, 5, 6]
    assert result.checkpoint is not None

    from tessera import artifacts
    from tessera.training.checkpoint import export_checkpoint

    with result.checkpoint.as_directory() as ckpt:
        meta = export_checkpoint("prior", ckpt, str(tmp_path / "export"))
    assert meta["step"] == 6 and meta["weights"] == "trained" and meta["tokens"] == MANIFEST
    model = artifacts.load("prior", str(tmp_path / "export"))
    assert model.shape.grid == MANIFEST["grid_size"] and model.shape.text_vocab == MANIFEST["text_vocab_size"]


def _write_token_dataset(uri: str, dvae_uri: str, *, grid: int, vocab: int, text_vocab: int) -> dict:
    """A small token dataset in encode's format and layout, published by its manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tessera import storage
    from tessera.data.token_loader import MANIFEST_KIND, token_schema

    splits = {}
    for split, shards in (("train", 2), ("val", 1)):
        entries = []
        for s in range(shards):
            rng = np.random.default_rng(hash((split, s)) % 2**32)
            n = 24
            captions = [list(rng.integers(1, text_vocab, size=rng.integers(1, 9))) for _ in range(n)]
            image = np.array([(c[0] + np.arange(grid * grid)) % vocab for c in captions], np.int16)
            table = pa.table({
                "key": [f"{split}-{s}-{i}" for i in range(n)], "split": [split] * n,
                "caption": [f"caption {split} {s} {i}" for i in range(n)],
                "text_ids": pa.array(captions, pa.list_(pa.int32())),
                "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), grid * grid),
            }, schema=token_schema(grid))
            path = f"gen-test/{split}/shard-{s:06d}.parquet"
            fs, p = storage.resolve(storage.join(uri, path))
            with fs.open_output_stream(p) as f:
                pq.write_table(table, f)
            entries.append({"path": path, "num_samples": n})
        splits[split] = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}
    manifest = {"kind": MANIFEST_KIND, "format_version": 1, "generation": "gen-test", "grid_size": grid,
                "num_image_tokens": vocab, "text_vocab_size": text_vocab, "dvae": {"uri": dvae_uri},
                "splits": splits}
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    return manifest


def test_train_prior_job_streams_token_shards_from_s3_and_exports(ray_cluster, s3_client, tmp_path):
    import uuid

    import torch

    from tessera import artifacts
    from tessera.models.dvae import DVAE, NAMED_SHAPES
    from tessera.training.ray_io import fit

    bucket = f"tessera-prior-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    torch.manual_seed(0)
    dvae = DVAE(NAMED_SHAPES["debug"])  # 8×8 grid of 128 codes: the sample grid decodes with it
    dvae_uri = f"s3://{bucket}/dvae/export"
    artifacts.export("dvae", dvae.state_dict(), dvae.shape, dvae_uri, step=0)
    tokens_uri = f"s3://{bucket}/tokens"
    _write_token_dataset(tokens_uri, dvae_uri, grid=8, vocab=128, text_vocab=30)
    cfg = load_config("debug", [*TINY, f"run.root_uri={tmp_path}", f"prior.tokens_uri={tokens_uri}",
                                "prior.steps=4", "prior.checkpoint_every=2", "prior.eval_every=4",
                                "prior.report_every=2", "prior.keep_checkpoints=1", "ray.data_cpu_limit=1",
                                "loader.local_shuffle_buffer=16"])
    result = fit(cfg, "prior")
    assert result.metrics["step"] == 4
    # Checkpoints at steps 2 and 4; only the latest is kept in the run's storage.
    import json

    run_dir = Path(cfg.paths.stage("prior")) / f"{cfg.run.name}-prior"
    kept = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(kept) == 1 and json.loads((kept[0] / "tessera_state.json").read_text())["step"] == 4
    assert (kept[0] / "weights.safetensors").is_file()
    assert result.metrics["val_image_loss"] > 0 and result.metrics["val_image_loss_uncond"] > 0
    model = artifacts.load("prior", cfg.paths.export("prior"))
    assert (model.shape.grid, model.shape.image_vocab, model.shape.text_vocab,
            model.shape.text_len) == (8, 128, 30, 6)
    grid = Path(cfg.paths.prior) / "samples" / "step-0000004.png"
    from PIL import Image

    with Image.open(grid) as im:
        # 2 rows (a caption strip of 12 px above each): the reference and 2 samples of 32 px, 4×
        # upscaled, 2 px apart, with 2 px more after the reference column (tessera.viz.grid_png).
        assert im.size == (3 * (128 + 2) + 2 + 2, 2 + 2 * (12 + 128 + 2))
