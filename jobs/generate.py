"""Offline batch generation: a file of captions -> a folder (or bucket prefix) of PNGs, on Ray Data.

    python jobs/generate.py --config debug --set generate.captions_uri=captions.txt \
        [--bundle URI] [--set generate.output_uri=s3://bucket/images --set generate.sampling.candidates=8]
        [--image photo.png [--set generate.keep_rows=4]]
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/cluster.yaml ...

Captions: .txt (one per line), .jsonl ({"caption": ...} per line) or .parquet (a caption column).
Empty, over-long and unreadable lines are skipped and counted. Output: {generation}/images/
IIIIIIII-R.png (line I, rank R), {generation}/index.jsonl (file -> caption, seed, score) and
manifest.json, written last (it publishes the generation and retires the previous one).

--image URI (generate.image_uri): image-to-image, the DALL·E paper's priming. Every caption is drawn
from the image's top generate.keep_rows token rows (default: the upper half) on; the rest is sampled.
"""

from __future__ import annotations

import sys

from _common import bundle_job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)


def main(cfg) -> int:
    from tessera import storage
    from tessera.bundle import BundleError, read_manifest
    from tessera.cluster import init_ray
    from tessera.inference.batch_generate import load_edit_image, run_generate, summarize

    opts = storage.StorageOptions.from_config(cfg.storage)
    # Everything a user can get wrong fails here, before Ray starts.
    if not cfg.generate.captions_uri:
        print("error: generate.captions_uri: not set (--set generate.captions_uri=PATH_OR_URI)",
              file=sys.stderr)
        return 2
    try:
        load_edit_image(cfg, read_manifest(cfg.paths.generate_bundle, opts))
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage.require_inputs(cfg.generate.captions_uri, opts, suffixes=(".txt", ".jsonl", ".parquet"))
    storage.require_writable(cfg.paths.generated, opts)
    init_ray(cfg.ray)
    try:
        manifest = run_generate(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(manifest))
    print(f"images: {storage.join(cfg.paths.generated, manifest['generation'], 'images')}")
    return 0


if __name__ == "__main__":
    sys.exit(bundle_job_main(main, section="generate", description=__doc__, uri_flags={"image": "image_uri"}))
