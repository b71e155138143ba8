"""Stage 1: train the dVAE on Ray Train + DeepSpeed from a prepared dataset.

    python jobs/train_dvae.py --config jobs/configs/debug.yaml [--set dvae.steps=2000 ...]
    ray job submit --working-dir . -- python jobs/train_dvae.py --config jobs/configs/cluster.yaml

Rerunning with the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from _common import job_main, train_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    return train_main(cfg, "dvae")


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
