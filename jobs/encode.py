"""Encode: prepared image shards + the exported dVAE -> token shards (Parquet) the prior trains on.

    python jobs/encode.py --config jobs/configs/debug.yaml [--set encode.actors.num_actors=4 ...]
    ray job submit --working-dir . -- python jobs/encode.py --config jobs/configs/cluster.yaml

Inputs come from the prepared dataset's manifest and the dVAE export (default {dvae}/export);
outputs are {run.root_uri}/tokens/{generation}/{split}/shard-NNNNNN.parquet + manifest.json.
"""

from __future__ import annotations

import sys

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera import artifacts, storage
    from tessera.cluster import init_ray
    from tessera.data.loader import load_manifest

    opts = storage.StorageOptions.from_config(cfg.storage)
    # Everything a user can get wrong fails here, before Ray starts.
    load_manifest(cfg.paths.data, opts)
    if not storage.exists(storage.join(cfg.paths.encode_dvae, artifacts.PARTS["dvae"].meta), opts):
        raise storage.StorageError(f"{cfg.paths.encode_dvae}: no dVAE export here "
                                   "(run jobs/train_dvae.py first)")
    storage.require_writable(cfg.paths.tokens, opts)
    init_ray(cfg.ray)
    from tessera.inference.encode import run_encode, summarize

    print(summarize(run_encode(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
