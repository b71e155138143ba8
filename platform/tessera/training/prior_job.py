"""Builds and runs the stage-2 TorchTrainer from the config (used by jobs/train_prior.py and tests)."""

from __future__ import annotations

from tessera import storage
from tessera.config import TesseraConfig


def fit_prior(cfg: TesseraConfig):
    from tessera.data.encode import load_token_manifest
    from tessera.data.token_pipeline import build_token_dataset
    from tessera.training.common import fit_stage
    from tessera.training.export import export_prior
    from tessera.training.prior_loop import ray_train_loop

    manifest = load_token_manifest(cfg.prior_tokens_uri, storage.StorageOptions.from_config(cfg.storage))
    return fit_stage(ray_train_loop, cfg, cfg.prior, output_uri=cfg.prior_uri, suffix="prior",
                     dataset=build_token_dataset(cfg, manifest), export=export_prior)
