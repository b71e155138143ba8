"""Experiment tracking (tessera.training.tracking): a real dVAE stage on the shared loop, in one
process with a real DeepSpeed engine, logging to TensorBoard event files and to an MLflow file
store; both read back with the libraries' own readers and compared with what the stage reported
and the sample grids it wrote."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.config import ConfigError, load_config
from tessera.training import tracking
from tessera.training.dvae_loop import DVAEStage

ROOT = Path(__file__).resolve().parents[1]
MICRO, STEPS, EVERY = 3, 4, 2  # reports (each with an evaluation and a grid) at steps 2 and 4


@pytest.fixture
def one_process_group():
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for a local store
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a test


class RecordingIO:
    """Fixed batches and validation images; every report and artifact kept."""

    def __init__(self):
        self.reports, self.artifacts = [], {}

    def batches(self, epoch):
        g = np.random.default_rng(epoch)
        while True:
            yield {"image": torch.from_numpy(g.integers(0, 256, size=(MICRO, 32, 32, 3), dtype=np.uint8))}

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))

    def latest_checkpoint(self):
        return None

    def save_artifact(self, name, data):
        self.artifacts[name] = data

    def data_manifest(self):
        return {}

    def validation_images(self):
        g = np.random.default_rng(7)
        return torch.from_numpy(g.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))


def train_dvae(root: Path, kind: str) -> RecordingIO:
    cfg = load_config("debug", [
        f"run.root_uri={root}", f"tracking.kind={kind}", "dvae.num_tokens=64", f"dvae.micro_batch={MICRO}",
        f"dvae.steps={STEPS}", f"dvae.report_every={EVERY}", f"dvae.eval_every={EVERY}",
        "dvae.checkpoint_every=1000", "dvae.warmup_steps=1"])
    io_ = RecordingIO()
    DVAEStage(cfg, io_).run()
    assert [r["step"] for r in io_.reports] == [2, 4]
    assert sorted(io_.artifacts) == ["samples/step-0000002.png", "samples/step-0000004.png"]
    return io_


def plotted(report: dict) -> dict[str, float]:
    """What a tracker must show of a report: its numbers, the step aside."""
    return {k: v for k, v in report.items() if k != "step" and isinstance(v, int | float)}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_tensorboard_events_hold_the_reported_metrics_and_grids(one_process_group, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = train_dvae(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tracking" / "debug-dvae"),
                              size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    events.Reload()
    keys = set(plotted(rec.reports[0])) | set(plotted(rec.reports[1]))
    assert {"loss", "psnr", "lr", "samples_per_s", "val_psnr"} <= keys
    assert set(events.Tags()["scalars"]) == keys
    for k in keys:
        logged = {e.step: e.value for e in events.Scalars(k)}
        expected = {r["step"]: r[k] for r in rec.reports if k in r}
        assert logged.keys() == expected.keys(), k
        for step, value in expected.items():  # TensorBoard keeps scalars as float32
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (k, step)
    assert events.Tags()["images"] == ["samples"]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    for g in grids:
        written = rec.artifacts[f"samples/step-{g.step:07d}.png"]
        assert np.array_equal(pixels(g.encoded_image_string), pixels(written))


def test_mlflow_file_store_holds_the_reported_metrics_grids_and_config(one_process_group, mlflow_env,
                                                                        tmp_path):
    from mlflow import MlflowClient

    rec = train_dvae(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=str(tmp_path / "tracking"))
    experiment = client.get_experiment_by_name("tessera")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "debug-dvae" and run.info.status == "FINISHED"
    assert run.data.params["dvae.steps"] == str(STEPS) and run.data.params["tracking.kind"] == "mlflow"
    keys = set(plotted(rec.reports[0])) | set(plotted(rec.reports[1]))
    assert set(run.data.metrics) == keys
    for k in keys:
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        assert sorted(history) == [(r["step"], float(r[k])) for r in rec.reports if k in r], k
    names = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert names == ["samples/step-0000002.png", "samples/step-0000004.png"]
    for name in names:
        local = client.download_artifacts(run.info.run_id, name, str(tmp_path / "download"))
        assert Path(local).read_bytes() == rec.artifacts[name]  # the very bytes the stage wrote


def test_mlflow_run_is_continued_by_a_resumed_stage_and_not_by_another(mlflow_env, tmp_path):
    """One tracked run per stage folder: reopening the same stage (a resume, a Train restart)
    logs into the same MLflow run; the same stage writing elsewhere is a run of its own."""
    from mlflow import MlflowClient

    base = [f"run.root_uri={tmp_path}", "tracking.kind=mlflow"]
    first = tracking.open_tracker(load_config("debug", base), "prior")
    first.log(10, {"loss": 2.5}, [])
    first.close()
    again = tracking.open_tracker(load_config("debug", base), "prior")
    again.log(20, {"loss": 1.5}, [])
    again.close()
    elsewhere = load_config("debug", base + [f"prior.output_uri={tmp_path}/prior2"])
    other = tracking.open_tracker(elsewhere, "prior")
    other.close()
    assert again.run_id == first.run_id != other.run_id
    client = MlflowClient(tracking_uri=str(tmp_path / "tracking"))
    history = client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 1.5)]


def test_tensorboard_events_reach_an_object_store(s3_client, bucket, tmp_path):
    """An s3:// log folder: events are written locally and copied there after each log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("debug", [f"run.root_uri=s3://{bucket}/run", "tracking.kind=tensorboard"])
    tracker = tracking.open_tracker(cfg, "reranker")
    png = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 30)).save(png, format="PNG")
    tracker.log(3, {"loss": 0.25, "val_top1": 0.5}, [("samples/step-0000003.png", png.getvalue())])
    tracker.close()
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="run/tracking/")["Contents"]]
    assert keys and all(k.startswith("run/tracking/debug-reranker/events.out.tfevents.") for k in keys)
    local = tmp_path / "downloaded"  # the tracker's own local folder is gone after close
    local.mkdir()
    for k in keys:
        s3_client.download_file(bucket, k, str(local / k.rsplit("/", 1)[1]))
    events = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("val_top1")] == [(3, 0.5)]
    [image] = events.Images("samples")
    assert (image.step, image.width, image.height) == (3, 8, 4)


def test_a_tracker_whose_package_is_missing_is_refused_by_name():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: nothing is missing")
    with pytest.raises(ConfigError, match=
                       r"tracking: .*kind: wandb needs the wandb package.*pip install wandb"):
        load_config("debug", ["tracking.kind=wandb"])


@pytest.mark.parametrize("overrides, message", [
    (["run.root_uri=s3://bucket/run", "tracking.kind=mlflow"], "set tracking.uri"),
    (["tracking.kind=mlflow", "tracking.uri=s3://bucket/mlruns"], "mlflow cannot keep its store in object"),
    (["tracking.kind=neptune"], r"tracking.kind: Input should be 'none', 'tensorboard', 'mlflow' or 'wandb'"),
])
def test_tracking_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug", overrides)


def test_no_tracking_leaves_the_io_alone_and_imports_no_backend(tmp_path):
    cfg = load_config("debug", [f"run.root_uri={tmp_path}"])
    io_ = RecordingIO()
    assert tracking.track(io_, cfg, "dvae") is io_
    code = ("import sys, tessera.training.skeleton, tessera.training.tracking; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": "platform"}, check=True)
    assert out.stdout.strip() == "[]"
