"""What the stage tests share: hooks whose batch for step i is the same in every run, which can
kill or fail a worker on purpose, and write every report to a file (Ray Train V2 keeps metrics
only with checkpoints); and a TorchTrainer of 2 (or more) workers around a loop."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class StepKeyedHooksBase:
    def __init__(self, config: dict):
        import ray.train

        self._train = ray.train
        self.cfg = config["cfg"]
        self.log = Path(config["log"])
        self.interrupt = config.get("interrupt")  # {"at": batch index, "how": "raise" | "exit", "flag": path}

    def maybe_interrupt(self, index: int) -> None:
        """Rank 1 dies (exit) or fails (raise) at batch `index`, once per flag file."""
        from tessera.parallel import dist

        it = self.interrupt
        if it and index == it["at"] and not Path(it["flag"]).exists() and dist.rank() == 1:
            Path(it["flag"]).write_text("done")
            if it["how"] == "exit":
                os._exit(1)  # the process dies, as on a lost node
            raise RuntimeError("interrupted on purpose")

    def report(self, metrics, checkpoint_dir):
        from ray.train import Checkpoint

        from tessera.parallel import dist

        if dist.is_main():
            with self.log.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        self._train.report(metrics,
                           checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def save_artifact(self, name, data):
        target = self.log.parent / "artifacts" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def latest_checkpoint(self):
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        self._keep = tempfile.TemporaryDirectory()
        return ckpt.to_directory(self._keep.name)


def fit(loop, cfg, tmp_path, name: str, log: Path, *, interrupt=None, max_failures=0, num_workers=2):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The workers share one CPU: one torch thread each, whatever the preset's threads_per_worker.
    cfg = cfg.model_copy(update={s: getattr(cfg, s).model_copy(update={"threads_per_worker": 1})
                                 for s in ("dvae", "prior", "reranker", "scorer")})
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "log": str(log), "interrupt": interrupt},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": 1.0 / num_workers}),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "runs"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()


def reports(log: Path) -> list[dict]:
    """Every report rank 0 wrote, in order."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def losses(log: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in reports(log)}
