"""The pipeline's stages in order, and how to tell that one is finished from what it published.

Each stage is one job in jobs/; it counts as done when the file its job writes last is there
(a manifest, or an export's json) and, for a training stage, that export is at the configured
step count. `jobs/pipeline.py` runs the stages that are not done; a training stage that stopped
part-way resumes from its run's latest checkpoint when its job runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tessera import artifacts, published, storage
from tessera.config import TesseraConfig
from tessera.paths import EXPORTED_PART, REPORT


@dataclass(frozen=True)
class Stage:
    name: str  # the job's module in jobs/
    what: str
    state: Callable[[TesseraConfig, storage.StorageOptions], str | None]  # None: not done; else what is there
    needs: tuple[str, ...] = ()  # stages whose rerun makes this one's output stale


def _read(uri: str, opts) -> dict | None:
    try:
        return storage.read_json(uri, opts) if storage.exists(uri, opts) else None
    except storage.StorageError:
        return None


def _manifest(uri_of: Callable[[TesseraConfig], str]):
    def state(cfg, opts):
        uri = storage.join(uri_of(cfg), published.MANIFEST)
        return uri if _read(uri, opts) is not None else None
    return state


def _export(section: str):
    """Done when the stage's export is at the configured step count."""
    def state(cfg, opts):
        uri = storage.join(cfg.paths.export(section), artifacts.PARTS[EXPORTED_PART[section]].meta)
        m = _read(uri, opts)
        if m is None or int(m.get("step", -1)) < getattr(cfg, section).steps:
            return None
        return f"{uri} (step {m['step']})"
    return state


def _bundle(cfg, opts):
    """Done when the bundle holds exactly the steps of the exports it is built from."""
    m = _read(storage.join(cfg.paths.bundle, published.MANIFEST), opts)
    if m is None:
        return None
    for part, uri in (("dvae", cfg.paths.encode_dvae), ("prior", cfg.paths.export("prior")),
                      ("reranker", cfg.paths.export("reranker"))):
        source = _read(storage.join(uri, artifacts.PARTS[part].meta), opts)
        have = (m.get("parts") or {}).get(part)
        if source is not None and (have is None or have.get("step") != source.get("step")):
            return None
    return storage.join(cfg.paths.bundle, published.MANIFEST)


def _evaluation(cfg, opts):
    """Done when the report is of the bundle that is there now (the same parts at the same steps),
    graded by the scorer that is there now (none, or one at the same step)."""
    uri = storage.join(cfg.paths.eval, REPORT)
    report = _read(uri, opts)
    bundle = _read(storage.join(cfg.paths.eval_bundle, published.MANIFEST), opts)
    if report is None or bundle is None:
        return None
    steps = {part: m.get("step") for part, m in (bundle.get("parts") or {}).items()}
    scorer = _read(storage.join(cfg.paths.eval_scorer, artifacts.PARTS["reranker"].meta), opts) or {}
    if (report.get("scorer") or {}).get("step") != scorer.get("step"):
        return None
    return uri if (report.get("bundle") or {}).get("steps") == steps else None


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "image shards + tokenizer", _manifest(lambda c: c.paths.data)),
    Stage("train_dvae", "stage 1: the dVAE", _export("dvae"), ("prepare",)),
    Stage("encode", "images -> tokens", _manifest(lambda c: c.paths.tokens), ("prepare", "train_dvae")),
    Stage("train_prior", "stage 2: the prior", _export("prior"), ("encode",)),
    Stage("train_reranker", "the reranker", _export("reranker"), ("prepare",)),
    Stage("export", "the model bundle", _bundle, ("train_dvae", "train_prior", "train_reranker")),
    # Not in the bundle: evaluate's own contrastive model, so reranking is not graded by the reranker.
    Stage("train_scorer", "evaluate's R-precision scorer", _export("scorer"), ("prepare",)),
    Stage("evaluate", "generated images scored", _evaluation, ("export", "train_scorer")),
)
NAMES = tuple(s.name for s in STAGES)
