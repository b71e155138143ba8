"""Evaluate a model bundle on its run's prepared data: images for the first N validation and
held-out captions, scored without and with the reranker by R-precision (under the scorer that
jobs/train_scorer.py trains apart from the reranker) and FID/KID against the real val images (with
evaluate.inception_weights_uri); dVAE reconstruction PSNR and SSIM, the prior's bits per image token
with and without captions, sample grids, training curves. On the shapes data also caption accuracy:
an attribute classifier reads the images back.

    python jobs/evaluate.py --config debug --set run.root_uri=runs/demo [--bundle URI] [--scorer URI]
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/cluster.yaml

--bundle: the bundle to evaluate (default: evaluate.bundle_uri, else {run.root_uri}/bundle).
--scorer: R-precision's model (default: evaluate.scorer_uri, else {run.root_uri}/scorer/export);
without one the report says R-precision was not computed.
Writes report.json (last), report.md, grid_*.png and curves_*.png to evaluate.output_uri
(default {run.root_uri}/eval); the classifier is kept under {run.root_uri}/eval/classifier; the
figures go into the run's own bundle's model card (README.md).
"""

from __future__ import annotations

import sys

from _common import bundle_job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera import storage
    from tessera.bundle import BundleError, read_manifest
    from tessera.cluster import init_ray
    from tessera.data.loader import load_manifest
    from tessera.inference.evaluation.run import run_evaluate, summarize

    opts = storage.StorageOptions.from_config(cfg.storage)
    # Everything a user can get wrong fails here, before Ray starts.
    try:
        read_manifest(cfg.paths.eval_bundle, opts)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_manifest(cfg.paths.data, opts)
    storage.require_writable(cfg.paths.eval, opts)
    init_ray(cfg.ray)
    report = run_evaluate(cfg)
    print(summarize(report))
    print(f"report: {storage.join(cfg.paths.eval, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(bundle_job_main(main, section="evaluate", description=__doc__,
                             uri_flags={"scorer": "scorer_uri"}))
