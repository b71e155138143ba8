"""Builds and runs the stage-1 TorchTrainer from the config (used by jobs/train_dvae.py and tests)."""

from __future__ import annotations

from tessera.config import TesseraConfig


def fit_dvae(cfg: TesseraConfig):
    from tessera.data.pipeline import build_training_dataset
    from tessera.training.common import fit_stage
    from tessera.training.dvae_loop import ray_train_loop
    from tessera.training.export import export_dvae

    return fit_stage(ray_train_loop, cfg, cfg.dvae, output_uri=cfg.dvae_uri, suffix="dvae",
                     dataset=build_training_dataset(cfg), export=export_dvae)
