"""Stage 2: train the transformer prior on Ray Train + DeepSpeed (ZeRO-3) from token shards.

    python jobs/train_prior.py --config jobs/configs/debug.yaml [--set prior.steps=3000 ...]
    ray job submit --working-dir . -- python jobs/train_prior.py --config jobs/configs/cluster.yaml

Reads the token dataset jobs/encode.py wrote ({run.root_uri}/tokens unless prior.tokens_uri says
otherwise). Rerunning with the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from _common import job_main, train_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    return train_main(cfg, "prior")


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
