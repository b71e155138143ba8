"""Bundle a run's trained parts for serving and generation: dVAE + prior (+ reranker) weights as
safetensors, their configs, the caption tokenizer, and a manifest with each file's sha256.

    python jobs/export.py --config jobs/configs/debug.yaml [--set export.output_uri=s3://bucket/models/x]
    ray job submit --working-dir . -- python jobs/export.py --config jobs/configs/cluster.yaml

Needs no Ray: it reads the exports each training job wrote and writes one folder at a URI.
"""

from __future__ import annotations

import sys

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera.bundle import BundleError, export_bundle

    try:
        manifest = export_bundle(cfg)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{p} (step {m['step']}, {m['num_parameters'] or 0:,} parameters)"
                      for p, m in manifest["parts"].items())
    print(f"bundle {manifest['name']!r} at {cfg.paths.bundle}: {parts}; {manifest['resolution']} px images")
    print(f"serve it: serve run serve.app:build_app bundle={cfg.paths.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
