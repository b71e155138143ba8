"""Experiment tracking: a training stage's reports and sample grids, sent from rank 0 to
TensorBoard, MLflow or W&B (config section `tracking`).

    Stage.run(): io = track(io, cfg, section)      rank 0 with tracking.kind set: a TrackedIO, else io
      io.report(metrics)          also logs every number in metrics at metrics["step"]
      io.save_artifact(name, png) also logs the PNG, at the step of the report that follows it (a
                                  sample grid is written during an evaluation, and a report follows)
      finish(io)                  at the end: the tracked run is closed

A stage is one tracked run, {run.name}-{stage}, keyed by the stage's folder, so a resumed stage
(the same folder) continues it: TensorBoard's log folder {tracking}/{run.name}-{stage}, MLflow's
run tagged with the key, W&B's run id made from it. A backend's package is imported only here,
when chosen. A tracker that fails to open stops the stage; one that fails while logging warns and
training goes on: checkpoints and history.json are the record, tracking a view of it.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from tessera import storage
from tessera.parallel import dist

log = logging.getLogger("tessera.tracking")


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float], images: list[tuple[str, bytes]]) -> None: ...

    def close(self) -> None: ...


def numeric(metrics: dict) -> dict[str, float]:
    """What a tracker plots of a report: its numbers (not bools), the step aside."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def image_tag(name: str) -> str:
    """One image series per artifact folder: 'samples/step-0000100.png' -> 'samples'."""
    folder, _, file = name.rpartition("/")
    return folder or file.removesuffix(".png")


def flat_config(cfg) -> dict[str, str]:
    """{'dvae.lr': '0.001', ...}: the whole config as a tracker's parameters."""
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list | None) else str(v)

    walk(cfg.model_dump(mode="json"), "")
    return out


def _require(kind: str):
    import importlib

    from tessera.config import TrackingConfig

    module, package = TrackingConfig.PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"tracking.kind {kind} needs the {package} package where the stage trains "
                          f"(pip install {package}): {e}") from None


def _is_local(uri: str) -> bool:
    return storage.scheme_of(uri) in ("", "file")


def _local_path(uri: str) -> str:
    return storage.resolve(uri)[1] if storage.scheme_of(uri) == "file" else uri


class TensorBoardTracker:
    """Event files in {tracking}/{run.name}-{stage}; for an object-store URI they are written in a
    local folder and copied there (whole, through tessera.storage) after each report."""

    def __init__(self, cfg, run_name: str):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.uri = storage.join(cfg.paths.tracking, run_name)
        self.options = storage.StorageOptions.from_config(cfg.storage)
        self._tmp = None if _is_local(self.uri) else tempfile.TemporaryDirectory(prefix="tessera-tb-")
        self.folder = self._tmp.name if self._tmp else _local_path(self.uri)
        self.writer = SummaryWriter(log_dir=self.folder)
        text = "\n".join(f"    {k}: {v}" for k, v in flat_config(cfg).items())  # markdown code block
        self.writer.add_text("config", text, 0)

    def log(self, step, metrics, images):
        import numpy as np
        from PIL import Image

        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        for name, data in images:
            pixels = np.asarray(Image.open(_io.BytesIO(data)).convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image(image_tag(name), pixels, step, dataformats="HWC")
        self.writer.flush()
        if self._tmp:
            for f in sorted(Path(self.folder).iterdir()):
                storage.write_bytes(storage.join(self.uri, f.name), f.read_bytes(), self.options)

    def close(self):
        self.writer.close()
        if self._tmp:
            self._tmp.cleanup()


class MLflowTracker:
    """A run in experiment tracking.experiment at the tracking URI (a local file store by
    default); the config as its parameters, reports as metrics, PNGs as artifacts at their names."""

    def __init__(self, cfg, run_name: str, key: str, stage_uri: str):
        uri = cfg.paths.tracking
        if _is_local(uri):
            # MLflow 3 refuses its file store (in maintenance mode) unless opted in; it is what a run
            # without a tracking server has (the sqlite store needs the full mlflow's SQLAlchemy).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = _local_path(uri)
        mlflow = _require("mlflow")
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`tessera.key` = '{key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"tessera.key": key, "tessera.run": cfg.run.name, "tessera.stage_uri": stage_uri}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step, metrics, images):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        for name, data in images:
            folder, _, file = name.rpartition("/")
            with tempfile.TemporaryDirectory(prefix="tessera-mlflow-") as tmp:
                (Path(tmp) / file).write_bytes(data)
                self.client.log_artifact(self.run_id, str(Path(tmp) / file), artifact_path=folder or None)

    def close(self):
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbTracker:
    """A W&B run in project tracking.experiment, grouped by run.name, its id made from the key
    (resume="allow": a resumed stage logs on into the same run)."""

    def __init__(self, cfg, run_name: str, key: str):
        self.wandb = _require("wandb")
        folder = _local_path(cfg.paths.tracking)
        os.makedirs(folder, exist_ok=True)
        self.run = self.wandb.init(project=cfg.tracking.experiment, name=run_name, group=cfg.run.name,
                                   id=f"{run_name}-{key[:8]}", resume="allow", dir=folder,
                                   config=cfg.model_dump(mode="json"))

    def log(self, step, metrics, images):
        from PIL import Image

        data: dict = dict(metrics)
        for name, png in images:
            image = Image.open(_io.BytesIO(png)).convert("RGB")
            data[image_tag(name)] = self.wandb.Image(image, caption=name)
        self.run.log(data, step=step)

    def close(self):
        self.run.finish()


def open_tracker(cfg, section: str) -> Tracker:
    kind, run_name, stage_uri = cfg.tracking.kind, f"{cfg.run.name}-{section}", cfg.paths.stage(section)
    key = hashlib.sha1(stage_uri.encode()).hexdigest()[:16]  # one tracked run per stage folder
    try:
        if kind == "tensorboard":
            return TensorBoardTracker(cfg, run_name)
        if kind == "mlflow":
            return MLflowTracker(cfg, run_name, key, stage_uri)
        if kind == "wandb":
            return WandbTracker(cfg, run_name, key)
    except ImportError:
        raise
    except Exception as e:  # each backend raises its own types
        raise RuntimeError(f"tracking.kind {kind}: cannot start tracking run {run_name} at "
                           f"{cfg.paths.tracking}: {e}") from e
    raise ValueError(f"tracking.kind {kind!r}: no such tracker (none, tensorboard, mlflow, wandb)")


class TrackedIO:
    """A stage's io whose reports and PNG artifacts also go to a tracker (rank 0 only)."""

    def __init__(self, io, tracker: Tracker, *, kind: str, images: bool = True):
        self._io, self.tracker, self.kind, self.images = io, tracker, kind, images
        self._pending: list[tuple[str, bytes]] = []
        self._step: int | None = None

    def __getattr__(self, name):
        # Everything else is the stage's own io (validation data, manifests, the image decoder).
        return getattr(self._io, name)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self._io.report(metrics, checkpoint_dir)
        self._step = metrics.get("step", self._step)
        self._send(numeric(metrics))

    def save_artifact(self, name: str, data: bytes) -> None:
        self._io.save_artifact(name, data)
        if self.images and name.endswith(".png"):
            self._pending.append((name, data))

    def _send(self, metrics: dict[str, float]) -> None:
        images, self._pending = self._pending, []
        if self._step is None:
            return
        try:
            self.tracker.log(int(self._step), metrics, images)
        except Exception as e:  # noqa: BLE001  (tracking is a view: training goes on)
            log.warning("tracking (%s) failed at step %s, training goes on: %s", self.kind, self._step, e)

    def finish(self) -> None:
        if self._pending:
            self._send({})
        try:
            self.tracker.close()
        except Exception as e:  # noqa: BLE001
            log.warning("tracking (%s) did not close cleanly: %s", self.kind, e)


def track(io, cfg, section: str):
    """`io`, reporting to cfg.tracking too on rank 0; `io` itself on other ranks or with kind none."""
    if cfg.tracking.kind == "none" or not dist.is_main():
        return io
    return TrackedIO(io, open_tracker(cfg, section), kind=cfg.tracking.kind, images=cfg.tracking.images)


def finish(io) -> None:
    """Close the tracked run of an io from track() (nothing for a plain io)."""
    if isinstance(io, TrackedIO):
        io.finish()
