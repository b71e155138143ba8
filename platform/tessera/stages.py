"""The pipeline's stages in order, and how to tell that one is finished from what it published.

Each stage is one job in jobs/; it counts as done when the file its job writes last is there
(a manifest, or an export's json) and, for a training stage, that export is at the configured
step count. `jobs/pipeline.py` runs the stages that are not done; a training stage that stopped
part-way resumes from its run's latest checkpoint when its job runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tessera import storage
from tessera.config import TesseraConfig
from tessera.evaluation.run import REPORT, bundle_uri, output_uri
from tessera.training import export as exports


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
        uri = storage.join(uri_of(cfg), "manifest.json")
        return uri if _read(uri, opts) is not None else None
    return state


def _export(uri_of: Callable[[TesseraConfig], str], meta: str, section: str):
    def state(cfg, opts):
        uri = storage.join(uri_of(cfg), "export", meta)
        m = _read(uri, opts)
        if m is None or int(m.get("step", -1)) < getattr(cfg, section).steps:
            return None
        return f"{uri} (step {m['step']})"
    return state


def _bundle(cfg, opts):
    """Done when the bundle holds exactly the steps of the exports it is built from."""
    m = _read(storage.join(cfg.bundle_uri, "manifest.json"), opts)
    if m is None:
        return None
    for part, uri, meta in (("dvae", cfg.encode_dvae_uri, exports.META),
                            ("prior", storage.join(cfg.prior_uri, "export"), exports.PRIOR_META),
                            ("reranker", storage.join(cfg.reranker_uri, "export"), exports.RERANKER_META)):
        source = _read(storage.join(uri, meta), opts)
        have = (m.get("parts") or {}).get(part)
        if source is not None and (have is None or have.get("step") != source.get("step")):
            return None
    return storage.join(cfg.bundle_uri, "manifest.json")


def _evaluation(cfg, opts):
    """Done when the report is of the bundle that is there now (the same parts at the same steps)."""
    uri = storage.join(output_uri(cfg), REPORT)
    report = _read(uri, opts)
    bundle = _read(storage.join(bundle_uri(cfg), "manifest.json"), opts)
    if report is None or bundle is None:
        return None
    steps = {part: m.get("step") for part, m in (bundle.get("parts") or {}).items()}
    return uri if (report.get("bundle") or {}).get("steps") == steps else None


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "image shards + tokenizer", _manifest(lambda c: c.data_uri)),
    Stage("train_dvae", "stage 1: the dVAE", _export(lambda c: c.dvae_uri, exports.META, "dvae"), ("prepare",)),
    Stage("encode", "images -> tokens", _manifest(lambda c: c.tokens_uri), ("prepare", "train_dvae")),
    Stage("train_prior", "stage 2: the prior", _export(lambda c: c.prior_uri, exports.PRIOR_META, "prior"), ("encode",)),
    Stage("train_reranker", "the reranker", _export(lambda c: c.reranker_uri, exports.RERANKER_META,
                                                    "reranker"),
          ("prepare",)),
    Stage("export", "the model bundle", _bundle, ("train_dvae", "train_prior", "train_reranker")),
    Stage("evaluate", "generated images scored", _evaluation, ("export",)),
)
NAMES = tuple(s.name for s in STAGES)
