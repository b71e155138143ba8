"""What both training stages' worker loops share: joining the process group, checkpoint folders,
reporting through Ray Train, and the console's progress line."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from tessera import storage
from tessera.parallel import dist

CHECKPOINT_TAG = "ds"
HISTORY_FILE = "history.json"  # {"stage": ..., "rows": [{"step": ..., <metric>: ...}, ...]}: loss curves
STATE_FILE = "tessera_state.json"
EMA_FILE = "ema.safetensors"
DATA_MANIFEST_FILE = "data_manifest.json"


def join_process_group(use_gpu: bool) -> None:
    """Join the workers' process group: NCCL on GPUs, else gloo with DeepSpeed's CPU accelerator."""
    use_cuda = use_gpu and torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    init_distributed("nccl" if use_cuda else "gloo")


def init_distributed(backend: str) -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        # One process without a launcher: a group of one on loopback.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(backend, verbose=False)  # reuses Ray Train's group when there is one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def announce(line: str) -> None:
    """A progress line on the console. Written to stdout, not logged or print()ed: Ray Train sends
    its workers' logging to per-worker files and re-logs print() (which shows it twice), while the
    worker's stdout itself reaches the driver's console once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def eta_minutes(step: int, total: int, started: float, first_step: int) -> float:
    return (time.time() - started) / max(step - first_step, 1) * (total - step) / 60


def save_checkpoint(engine, hooks, metrics: dict, *, state: dict, config: dict, data_manifest: dict | None,
                    ema=None, extra_files: dict[str, bytes] | None = None,
                    rank_files: dict[str, bytes] | None = None) -> None:
    """Every rank writes its DeepSpeed shard (and its `rank_files`, named per rank) into one
    folder; rank 0 adds tessera's own files; then the folder is reported (Ray Train uploads it to
    the run's storage)."""
    with tempfile.TemporaryDirectory(prefix="tessera-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        for name, data in (rank_files or {}).items():
            Path(tmp, name).write_bytes(data)
        if dist.is_main():
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            Path(tmp, "config.json").write_text(json.dumps(config))
            if data_manifest is not None:
                Path(tmp, DATA_MANIFEST_FILE).write_text(json.dumps(data_manifest))
            if ema is not None:
                from safetensors.torch import save_file

                save_file(ema.state_dict(), str(Path(tmp, EMA_FILE)))
            for name, data in (extra_files or {}).items():
                Path(tmp, name).write_bytes(data)
        hooks.report(metrics, tmp)


def load_state(checkpoint_dir: str) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def load_ema(ema, checkpoint_dir: str) -> None:
    if ema is not None and (Path(checkpoint_dir) / EMA_FILE).exists():
        from safetensors.torch import load_file

        ema.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)))


class RayTrainIO:
    """Batches from the worker's Ray Data shard; reports, checkpoints and artifacts through Ray
    Train and the run's storage."""

    def __init__(self, cfg, *, artifacts_uri: str, micro_batch: int):
        import ray.train

        self._train = ray.train
        self.cfg = cfg
        self.options = storage.StorageOptions.from_config(cfg.storage)
        self._artifacts_uri = artifacts_uri
        self._restored: tempfile.TemporaryDirectory | None = None
        self._history: list[dict] | None = None
        self.shard = ray.train.get_dataset_shard("train")
        self.loader = cfg.loader.model_copy(update={"batch_size": micro_batch})

    def batches(self, epoch: int):
        from tessera.data.pipeline import iter_training_batches

        return iter(iter_training_batches(self.shard, self.loader, epoch=epoch))

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if dist.is_main():
            self._record(metrics)
        self._train.report(metrics, checkpoint=ckpt)

    def _record(self, metrics: dict) -> None:
        """Rewrite {stage uri}/history.json with every report so far (Ray Train V2 keeps metrics
        only with checkpoints). A resumed run drops the rows at or after its first new step."""
        uri = storage.join(self._artifacts_uri, HISTORY_FILE)
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


def quiet_report_log() -> None:
    """Ray Train 2.60 logs every report() of every rank with all its metrics at INFO, which buries
    the one progress line per report; keep its warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a later Ray moved it: its log stays as it is
        return
    getattr(context, "logger", logging.getLogger("ray.train")).setLevel(logging.WARNING)


def worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_report_log()


def fit_stage(loop, cfg, stage, *, output_uri: str, suffix: str, dataset, export):
    """Run one training stage's TorchTrainer: `stage` is its config section (workers, CPUs, GPU,
    max_failures); the run lives at {output_uri}/{run.name}-{suffix}, so the same name and storage
    resume it; `export(checkpoint_dir, export_uri, options=...)` consolidates the last checkpoint
    into {output_uri}/export."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tessera.data.pipeline import train_data_config

    opts = storage.StorageOptions.from_config(cfg.storage)
    fs, path = storage.resolve(output_uri, opts)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=stage.num_workers, use_gpu=stage.use_gpu,
                                     resources_per_worker={"CPU": stage.cpus_per_worker},
                                     placement_strategy=stage.placement_strategy),
        datasets={"train": dataset},
        dataset_config=train_data_config(cfg),
        run_config=RunConfig(name=f"{cfg.run.name}-{suffix}", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=stage.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as ckpt_dir:
            export(ckpt_dir, storage.join(output_uri, "export"), options=opts)
    return result
