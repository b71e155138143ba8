"""Train the contrastive reranker (a small CLIP) on Ray Train + DeepSpeed from a prepared dataset.

    python jobs/train_reranker.py --config jobs/configs/debug.yaml [--set reranker.steps=800 ...]
    ray job submit --working-dir . -- python jobs/train_reranker.py --config jobs/configs/cluster.yaml

It reads the same image shards as the dVAE (not the dVAE's tokens), so it can run beside stage 1
or 2. Rerunning with the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera.cluster import init_ray
    from tessera.data.pipeline import load_manifest
    from tessera.storage import StorageOptions

    load_manifest(cfg.data_uri, StorageOptions.from_config(cfg.storage))  # fails before Ray if missing
    init_ray(cfg.ray)
    from tessera.training.reranker_job import fit_reranker
    from tessera.training.reranker_loop import retrieval_summary

    result = fit_reranker(cfg)
    print(f"reranker run at {result.path}: step {result.metrics.get('step')}, loss {result.metrics.get('loss', float('nan')):.4f}")
    if "val_pairs" in result.metrics:
        print(retrieval_summary(result.metrics))
    print(f"exported: {cfg.reranker_uri.rstrip('/')}/export/reranker.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
