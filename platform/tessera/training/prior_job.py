"""Builds and runs the stage-2 TorchTrainer from the config (used by jobs/train_prior.py and tests)."""

from __future__ import annotations

from tessera import storage
from tessera.config import TesseraConfig


def fit_prior(cfg: TesseraConfig):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tessera.data.encode import load_token_manifest
    from tessera.data.pipeline import train_data_config
    from tessera.data.token_pipeline import build_token_dataset
    from tessera.training.prior_loop import ray_train_loop

    p = cfg.prior
    opts = storage.StorageOptions.from_config(cfg.storage)
    manifest = load_token_manifest(cfg.prior_tokens_uri, opts)
    fs, path = storage.resolve(cfg.prior_uri, opts)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                     resources_per_worker={"CPU": p.cpus_per_worker}),
        datasets={"train": build_token_dataset(cfg, manifest)},
        dataset_config=train_data_config(cfg),
        # The same name and storage resume the run from its latest checkpoint.
        run_config=RunConfig(name=f"{cfg.run.name}-prior", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=p.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        from tessera.training.export import export_prior

        with result.checkpoint.as_directory() as ckpt_dir:
            export_prior(ckpt_dir, storage.join(cfg.prior_uri, "export"), options=opts)
    return result
