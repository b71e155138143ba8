"""Run the whole pipeline in order — prepare → train_dvae → encode → train_prior → train_reranker →
export → train_scorer → evaluate — by calling each stage's job (the same `main` that
`python jobs/X.py` runs) in one process and one Ray. A stage whose output is already published is
skipped, so a rerun resumes where the last one stopped (a training stage that stopped part-way
resumes from its checkpoint).

    python jobs/pipeline.py --config debug --set run.root_uri=runs/demo
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/cluster.yaml

--only / --redo: comma-separated stage names to consider / to run even if done. Stage wall times
go to {run.root_uri}/pipeline.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from _common import job_main  # noqa: I001  (jobs/ is the script folder, on sys.path)

EXTRA = argparse.ArgumentParser(add_help=False, usage="pipeline.py [--config C] [--set K=V ...] "
                                "[--only STAGES] [--redo STAGES]")
EXTRA.add_argument("--only", default=None, help="comma-separated stages to consider (default: all)")
EXTRA.add_argument("--redo", default="", help="comma-separated stages to run even if done")


def _stage_list(text: str | None, names: tuple[str, ...]) -> list[str]:
    chosen = [s.strip() for s in (text or "").split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    return chosen


def main(cfg, args: argparse.Namespace | None = None) -> int:
    from tessera import storage
    from tessera.stages import NAMES, STAGES

    args = args or EXTRA.parse_args([])
    opts = storage.StorageOptions.from_config(cfg.storage)
    only, redo = _stage_list(args.only, NAMES) or list(NAMES), _stage_list(args.redo, NAMES)
    record_uri = storage.join(cfg.run.root_uri, "pipeline.json")
    times: dict[str, dict] = {}
    started = time.time()
    for n, stage in enumerate(STAGES, 1):
        if stage.name not in only:
            continue
        head = f"[{n}/{len(STAGES)}] {stage.name} ({stage.what})"
        done = stage.state(cfg, opts)
        stale = [n for n in stage.needs if times.get(n, {}).get("status") == "ran"]
        if done and stage.name not in redo and not stale:
            print(f"{head}: done, skipped — {done}", flush=True)
            times[stage.name] = {"status": "skipped", "seconds": 0.0}
            storage.write_bytes(record_uri, json.dumps(times, indent=1).encode(), opts)
            continue
        why = f" (after {', '.join(stale)})" if done and stale else ""
        print(f"\n{head}: running{why}", flush=True)
        t0 = time.time()
        rc = importlib.import_module(stage.name).main(cfg)
        seconds = time.time() - t0
        times[stage.name] = {"status": "ran" if rc == 0 else f"failed ({rc})", "seconds": round(seconds, 1)}
        storage.write_bytes(record_uri, json.dumps(times, indent=1).encode(), opts)
        if rc != 0:
            print(f"{head}: failed (exit {rc}) after {seconds:.0f} s; "
                  "fix it and rerun: finished stages are kept")
            return rc
        print(f"{head}: finished in {_clock(seconds)}", flush=True)
    total = time.time() - started
    print(f"\npipeline finished in {_clock(total)}:")
    for name, t in times.items():
        print(f"  {name:<15} {t['status']:<8} {_clock(t['seconds'])}")
    report = storage.join(cfg.paths.eval, "report.md")
    print(f"bundle:            {cfg.paths.bundle}")
    print(f"evaluation report: {report}")
    print(f"sample grid:       {storage.join(cfg.paths.eval, 'grid_val.png')}")
    print(f"serve it:          python -m serve serve.app:build_app bundle={cfg.paths.bundle}"
          "   (or `make demo`, which serves serve/config.yaml)")
    return 0


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


if __name__ == "__main__":
    known, rest = EXTRA.parse_known_args()
    sys.exit(job_main(lambda cfg: main(cfg, known), description=__doc__, argv=rest))
