"""`python -m serve` = Ray Serve's `serve run`, on a local Ray that listens on 127.0.0.1 only and
requires Ray's auth token (tessera.cluster.local_ray_env): what `make demo` serves with. Run it from
the repository root, with `serve run`'s options and arguments:

    python -m serve serve/config.yaml                       # then http://127.0.0.1:8000/
    python -m serve serve.app:build_app bundle=runs/demo/bundle max_replicas=2

It always starts a Ray of its own (`serve run` alone would join one it finds in /tmp/ray). With
--address or RAY_ADDRESS it joins that cluster as `serve run` does, RAY_AUTH_* taken from your
environment.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    joining = bool(os.environ.get("RAY_ADDRESS")) or any(
        a in ("-a", "--address") or a.startswith("--address=") for a in argv)
    if not joining:
        from tessera.cluster import local_ray_env

        local_ray_env()  # before Ray is imported: it reads the loopback switch once, at import
        argv = ["--address", "local", *argv]
    from ray.serve.scripts import cli

    return cli.main(args=["run", *argv], prog_name="python -m serve", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
