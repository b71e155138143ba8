"""Train evaluate's scorer: a second contrastive text–image model of the reranker's architecture,
on the same train split with another seed (scorer.seed), into its own folder ({run.root_uri}/scorer).
evaluate ranks each generated image's caption among distractors with it (R-precision); being apart
from the bundle's reranker, it does not grade the picks that reranker made.

    python jobs/train_scorer.py --config jobs/configs/debug.yaml [--set scorer.steps=400 ...]
    ray job submit --working-dir . -- python jobs/train_scorer.py --config jobs/configs/cluster.yaml

It reads the prepared image shards, so it can run beside any stage after prepare. Rerunning with
the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import sys

from _common import job_main, train_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    return train_main(cfg, "scorer")


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
