"""Builds and runs the reranker's TorchTrainer from the config (used by jobs/train_reranker.py and tests)."""

from __future__ import annotations

from tessera.config import TesseraConfig


def fit_reranker(cfg: TesseraConfig):
    """Train on the prepared image shards; the last checkpoint is exported to {reranker_uri}/export."""
    from tessera.data.pipeline import build_training_dataset
    from tessera.training.common import fit_stage
    from tessera.training.export import export_reranker
    from tessera.training.reranker_loop import ray_train_loop

    return fit_stage(ray_train_loop, cfg, cfg.reranker, output_uri=cfg.reranker_uri, suffix="reranker",
                     dataset=build_training_dataset(cfg), export=export_reranker)
