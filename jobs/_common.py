"""What every job entrypoint shares: argument parsing, config loading, error reporting.

User errors (bad config, missing input, unreachable bucket) print one clear line and exit 2
before any work starts; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Running `python jobs/X.py` from a checkout (or a `ray job submit --working-dir .` upload, where
# tessera may not be pip-installed) finds the library in platform/.
_PLATFORM = Path(__file__).resolve().parents[1] / "platform"
if _PLATFORM.is_dir() and str(_PLATFORM) not in sys.path:
    sys.path.insert(0, str(_PLATFORM))


def parse_args(description: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug",
                   help="YAML path, or a preset name: debug, single_gpu, cluster (default: debug)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config field, e.g. --set data.resolution=64 (repeatable)")
    return p.parse_args(argv)


def job_main(main, *, description: str | None = None, argv: list[str] | None = None) -> int:
    from tessera.config import ConfigError, load_config
    from tessera.storage import StorageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(description, argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return main(cfg)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def bundle_job_main(main, *, section: str, description: str | None = None,
                    uri_flags: dict[str, str] | None = None) -> int:
    """job_main for a job that also takes `--bundle URI`: it sets {section}.bundle_uri (passed as
    a YAML string, whatever characters the URI holds); each of uri_flags, {flag: field}, likewise."""
    flags = {"bundle": "bundle_uri", **(uri_flags or {})}
    extra = argparse.ArgumentParser(add_help=False)
    for flag in flags:
        extra.add_argument(f"--{flag}", default=None)
    known, rest = extra.parse_known_args()
    for flag, field in flags.items():
        if getattr(known, flag):
            rest += ["--set", f"{section}.{field}={json.dumps(getattr(known, flag))}"]
    return job_main(main, description=description, argv=rest)


def train_main(cfg, stage: str) -> int:
    """jobs/train_{stage}.py: the stage's input is checked before Ray starts (a missing dataset
    fails in one line), then its TorchTrainer runs and its last checkpoint is exported."""
    from tessera.cluster import init_ray
    from tessera.training import ray_io

    ray_io.input_manifest(cfg, stage)
    init_ray(cfg.ray)
    result = ray_io.fit(cfg, stage)
    m = result.metrics or {}
    print(f"{stage} run at {result.path}: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}")
    summary = ray_io.stage_class(stage).summary(m)
    if summary:
        print(summary)
    print(f"exported: {cfg.paths.export(stage)}")
    return 0
