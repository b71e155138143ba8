"""Training stages under Ray Train: the io every stage's loop talks to, the worker entry point,
and the TorchTrainer that runs a stage and exports its last checkpoint.

    fit(cfg, "dvae"|"prior"|"reranker"|"scorer") ─▶ TorchTrainer(train_loop_per_worker) ─▶ in each
      worker: STAGES[name](cfg, RayTrainIO(cfg, name)).run() ─▶ the last checkpoint ─▶
      {stage uri}/export (the scorer's as a reranker export: paths.EXPORTED_PART)
"""

from __future__ import annotations

import json
import logging
import tempfile

import torch

from tessera import artifacts, storage
from tessera.parallel import dist
from tessera.paths import EXPORTED_PART, HISTORY  # history: {"stage", "rows": [{"step", <metric>...}]}

VALIDATION_IMAGES = 64  # the dVAE's fixed reconstruction batch
log = logging.getLogger("tessera.training")


def stage_class(name: str):
    from tessera.training.dvae_loop import DVAEStage
    from tessera.training.prior_loop import PriorStage
    from tessera.training.reranker_loop import RerankerStage, ScorerStage

    return {"dvae": DVAEStage, "prior": PriorStage, "reranker": RerankerStage, "scorer": ScorerStage}[name]


class RayTrainIO:
    """Batches from the worker's Ray Data shard; reports, checkpoints and artifacts through Ray
    Train and the run's storage; the validation data and manifests each stage asks for."""

    def __init__(self, cfg, stage: str):
        import ray.train

        self._train = ray.train
        self.cfg, self.stage = cfg, stage
        self.options = storage.StorageOptions.from_config(cfg.storage)
        self._artifacts_uri = cfg.paths.stage(stage)
        self._restored: tempfile.TemporaryDirectory | None = None
        self._history: list[dict] | None = None
        self._manifests: dict[str, dict] = {}
        self._decoder = None
        self.shard = ray.train.get_dataset_shard("train")
        self.loader = cfg.loader.model_copy(update={"batch_size": getattr(cfg, stage).micro_batch})
        self._cache = None
        # Only where an epoch is the same rows in a new order: not the dVAE's per-epoch crops, nor
        # BPE-dropout's per-epoch segmentations (tessera.data.loader.EpochCache).
        if cfg.loader.cache_mb > 0 and stage != "dvae" and not (stage == "prior" and cfg.loader.bpe_dropout > 0):
            from tessera.data.loader import EpochCache

            self._cache = EpochCache(cfg.loader.cache_mb << 20, self.loader.batch_size, cfg.loader.shuffle_seed)

    # ── what every stage uses ────────────────────────────────────────────────────────────────
    def batches(self, epoch: int):
        from tessera.data.loader import iter_training_batches

        if self._cache is not None and self._cache.full:
            return self._cache.epoch(epoch)
        batches = iter_training_batches(self.shard, self.loader, epoch=epoch)
        return self._cache.fill(batches) if self._cache is not None else iter(batches)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if dist.is_main():
            self._record(metrics)
        self._train.report(metrics, checkpoint=ckpt)

    def _record(self, metrics: dict) -> None:
        """Rewrite {stage uri}/history.json with every report so far (Ray Train V2 keeps metrics
        only with checkpoints). A resumed run drops the rows at or after its first new step."""
        uri = storage.join(self._artifacts_uri, HISTORY)
        if self._history is None:
            try:
                self._history = list(storage.read_json(uri, self.options)["rows"])
            except (storage.StorageError, KeyError, TypeError):
                self._history = []
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = row.get("step")
        if step is None:
            return
        self._history = [r for r in self._history if r.get("step", -1) < step] + [row]
        stage = self._artifacts_uri.rstrip("/").rsplit("/", 1)[-1]
        storage.write_bytes(uri, json.dumps({"stage": stage, "rows": self._history}).encode(), self.options)

    def latest_checkpoint(self) -> str | None:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="tessera-restore-")
        return ckpt.to_directory(self._restored.name)

    def save_artifact(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self._artifacts_uri, name), data, self.options)

    # ── the dVAE and the reranker: the prepared image shards ─────────────────────────────────
    def data_manifest(self) -> dict:
        from tessera.data.loader import load_manifest

        if "data" not in self._manifests:
            self._manifests["data"] = load_manifest(self.cfg.paths.data, self.options)
        return self._manifests["data"]

    def validation_samples(self, limit: int) -> dict[str, torch.Tensor] | None:
        """The first `limit` val samples (image uint8 (N, H, W, 3), text_ids, text_mask), the same
        on every rank; None without a val split."""
        from tessera.data.loader import read_validation_samples

        rows = read_validation_samples(self.cfg.paths.data, self.data_manifest(), limit=limit,
                                       text_len=self.cfg.loader.text_len, options=self.options)
        if rows is None:
            log.warning("%s has no validation split: no validation figures will be reported",
                        self.cfg.paths.data)
            return None
        return {k: torch.from_numpy(v) for k, v in rows.items()}

    def validation_images(self) -> torch.Tensor | None:
        rows = self.validation_samples(VALIDATION_IMAGES)
        return None if rows is None else rows["image"]

    def validation_pairs(self) -> dict[str, torch.Tensor] | None:
        rows = self.validation_samples(getattr(self.cfg, self.stage).val_pairs)  # reranker or scorer
        return rows if rows is not None and len(rows["image"]) >= 2 else None

    # ── the prior: the token shards, and the dVAE that decodes its samples ───────────────────
    def token_manifest(self) -> dict:
        from tessera.data.token_loader import load_token_manifest

        if "tokens" not in self._manifests:
            self._manifests["tokens"] = load_token_manifest(self.cfg.paths.prior_tokens, self.options)
        return self._manifests["tokens"]

    def validation_rows(self) -> dict | None:
        from tessera.data.token_loader import read_token_rows

        return read_token_rows(self.cfg.paths.prior_tokens, self.token_manifest(), "val",
                               text_len=self.cfg.loader.text_len, limit=self.cfg.prior.val_samples,
                               options=self.options)

    def image_decoder(self):
        """tokens (B, G, G) -> images (B, 3, S, S), by the dVAE the tokens were encoded with; None
        when it cannot be loaded (the sample grid is a convenience: training goes on)."""
        if self._decoder is None:
            uri = self.token_manifest().get("dvae", {}).get("uri")
            self._decoder = False
            if uri:
                try:
                    self._decoder = artifacts.load("dvae", uri, options=self.options).decode
                except Exception as e:  # noqa: BLE001
                    log.warning("no sample grid: cannot load the dVAE at %s (%s)", uri, e)
        return self._decoder or None


def train_loop(config: dict) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer: {"cfg": TesseraConfig, "stage": name}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_report_log()
    cfg, name = config["cfg"], config["stage"]
    stage_class(name)(cfg, RayTrainIO(cfg, name)).run()


def quiet_report_log() -> None:
    """Ray Train 2.60 logs every report() of every rank with all its metrics at INFO, which buries
    the one progress line per report; keep its warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a later Ray moved it: its log stays as it is
        return
    getattr(context, "logger", logging.getLogger("ray.train")).setLevel(logging.WARNING)


def input_manifest(cfg, name: str) -> dict:
    """The manifest of what stage `name` trains on (no Ray needed): the token dataset for the
    prior, the prepared image shards for the others. A missing input fails here, naming it."""
    opts = storage.StorageOptions.from_config(cfg.storage)
    if name == "prior":
        from tessera.data.token_loader import load_token_manifest

        return load_token_manifest(cfg.paths.prior_tokens, opts)
    from tessera.data.loader import load_manifest

    return load_manifest(cfg.paths.data, opts)


def dvae_crops(cfg):
    """The dVAE's training crops (the paper's Listing 1) under cfg.dvae.augment, or None when off
    (None: on for the paper size only)."""
    from tessera.data.loader import Crops
    from tessera.models.dvae import NAMED_SHAPES

    d = cfg.dvae
    if not (d.augment if d.augment is not None else d.size == "paper"):
        return None
    return Crops(size=NAMED_SHAPES[d.size].image_size, scale=d.augment_scale, flip=True,
                 seed=cfg.loader.shuffle_seed)


def training_dataset(cfg, name: str):
    """The Ray Data dataset stage `name` reads: token shards for the prior, else image shards."""
    if name == "prior":
        from tessera.data.token_loader import build_token_dataset

        return build_token_dataset(cfg, input_manifest(cfg, name))
    from tessera.data.loader import build_training_dataset

    # Only the dVAE crops (the paper's Listing 1): the reranker's captions say where things are,
    # which a flip would falsify.
    return build_training_dataset(cfg, crops=dvae_crops(cfg) if name == "dvae" else None)


def run_config(cfg, name: str):
    """Ray Train's RunConfig of stage `name`: the run lives at {stage uri}/{run.name}-{name}, so
    the same name and storage resume it; it keeps the section's keep_checkpoints latest checkpoints
    and restarts after max_failures worker failures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    section = getattr(cfg, name)
    fs, path = storage.resolve(cfg.paths.stage(name), storage.StorageOptions.from_config(cfg.storage))
    return RunConfig(name=f"{cfg.run.name}-{name}", storage_path=path, storage_filesystem=fs,
                     checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
                     failure_config=FailureConfig(max_failures=section.max_failures))


def fit(cfg, name: str):
    """Run stage `name`'s TorchTrainer: its config section sets workers, CPUs, GPU, checkpoints
    kept and max_failures (run_config); the last checkpoint is exported to {stage uri}/export
    (tessera.artifacts)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from tessera.cluster import torch_config
    from tessera.data.loader import train_data_config
    from tessera.training.checkpoint import export_checkpoint

    section = getattr(cfg, name)
    opts = storage.StorageOptions.from_config(cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "stage": name},
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                     resources_per_worker={"CPU": section.cpus_per_worker},
                                     placement_strategy=section.placement_strategy),
        datasets={"train": training_dataset(cfg, name)},
        dataset_config=train_data_config(cfg),
        run_config=run_config(cfg, name),
        torch_config=torch_config(),  # a local Ray's process-group store on 127.0.0.1 too
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as ckpt_dir:
            export_checkpoint(EXPORTED_PART[name], ckpt_dir, cfg.paths.export(name), options=opts)
    return result
