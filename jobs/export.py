"""Bundle a run's trained parts for serving and generation: dVAE + prior (+ reranker) weights as
safetensors, their configs, the caption tokenizer, a manifest with each file's sha256, and a model
card (README.md: data, sizes, steps, evaluation figures once evaluated, intended use, license).

    python jobs/export.py --config jobs/configs/debug.yaml [--set export.output_uri=s3://bucket/models/x]
    ray job submit --working-dir . -- python jobs/export.py --config jobs/configs/cluster.yaml

Needs no Ray: it reads the exports each training job wrote and writes one folder at a URI.
"""

from __future__ import annotations

import sys

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera.bundle import BundleError, export_bundle
    from tessera.model_card import write_card
    from tessera.storage import StorageOptions

    try:
        manifest = export_bundle(cfg)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = write_card(cfg, manifest, StorageOptions.from_config(cfg.storage))
    parts = ", ".join(f"{p} (step {m['step']}, {m['num_parameters'] or 0:,} parameters)"
                      for p, m in manifest["parts"].items())
    print(f"bundle {manifest['name']!r} at {cfg.paths.bundle}: {parts}; {manifest['resolution']} px images")
    print(f"model card: {card}")
    print(f"serve it: python -m serve serve.app:build_app bundle={cfg.paths.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(job_main(main, description=__doc__))
