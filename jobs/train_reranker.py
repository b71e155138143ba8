"""Train the contrastive reranker (a small CLIP) on Ray Train + DeepSpeed from a prepared dataset.

    python jobs/train_reranker.py --config jobs/configs/debug.yaml [--set reranker.steps=800 ...]
    ray job submit --working-dir . -- python jobs/train_reranker.py --config jobs/configs/cluster.yaml

It reads the same image shards as the dVAE (not the dVAE's tokens), so it can run beside stage 1
or 2. Rerunning with the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from _common import job_main, train_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    return train_main(cfg, "reranker")


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
