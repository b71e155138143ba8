"""Builds and runs the stage-1 TorchTrainer from the config (used by jobs/train_dvae.py and tests)."""

from __future__ import annotations

from tessera import storage
from tessera.config import TesseraConfig


def fit_dvae(cfg: TesseraConfig):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tessera.data.pipeline import build_training_dataset, train_data_config
    from tessera.training.dvae_loop import ray_train_loop

    t = cfg.dvae
    fs, path = storage.resolve(cfg.dvae_uri, storage.StorageOptions.from_config(cfg.storage))
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        datasets={"train": build_training_dataset(cfg)},
        dataset_config=train_data_config(cfg),
        # The same name and storage resume the run from its latest checkpoint.
        run_config=RunConfig(name=f"{cfg.run.name}-dvae", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        from tessera.training.export import export_dvae

        with result.checkpoint.as_directory() as ckpt_dir:
            export_dvae(ckpt_dir, storage.join(cfg.dvae_uri, "export"),
                        options=storage.StorageOptions.from_config(cfg.storage))
    return result
