"""Prepare a dataset: decode, validate, resize and shard image-text pairs; train the caption
tokenizer; write manifest.json.

    python jobs/prepare.py --config jobs/configs/debug.yaml [--set data.resolution=64 ...]
    ray job submit --working-dir . -- python jobs/prepare.py --config jobs/configs/cluster.yaml
"""

from __future__ import annotations

import sys

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera.cluster import init_ray
    from tessera.data.prepare import PrepareStopped, preflight, run_prepare, summarize

    preflight(cfg)  # bad inputs/outputs fail here, before a Ray cluster is started
    init_ray(cfg.ray)
    try:
        manifest = run_prepare(cfg)
    except PrepareStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summarize(manifest))
    print(f"manifest: {cfg.paths.data.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
