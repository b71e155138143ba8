"""Stage 1: train the dVAE on Ray Train + DeepSpeed from a prepared dataset.

    python jobs/train_dvae.py --config jobs/configs/debug.yaml [--set dvae.steps=2000 ...]
    ray job submit --working-dir . -- python jobs/train_dvae.py --config jobs/configs/cluster.yaml

Rerunning with the same run name resumes from the run's latest checkpoint.
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
    from tessera.training.dvae_job import fit_dvae

    result = fit_dvae(cfg)
    print(f"dVAE run at {result.path}: {result.metrics}")
    print(f"exported: {cfg.dvae_uri.rstrip('/')}/export/dvae.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
