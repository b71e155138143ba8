"""Every default location of a run, in one place.

A section's own URI wins when the config sets one; otherwise each stage lives under `run.root_uri`:

    {root}/data        prepared image shards + tokenizer.json + manifest.json   (prepare)
    {root}/dvae        checkpoints, history.json, samples/; export/ = dvae.*     (train_dvae)
    {root}/tokens      token shards + manifest.json                             (encode)
    {root}/prior       checkpoints, history.json, samples/; export/ = prior.*    (train_prior)
    {root}/reranker    checkpoints, history.json; export/ = reranker.*          (train_reranker)
    {root}/scorer      checkpoints, history.json; export/ = reranker.*          (train_scorer:
                       evaluate's own contrastive model for R-precision, not the bundle's reranker)
    {root}/bundle      the model bundle serving and generation load             (export)
    {root}/eval        report.json, report.md, grids, curves; classifier/       (evaluate)
    {root}/generated   gen-…/images/*.png + index.jsonl, manifest.json          (generate)
    {root}/tracking    {run.name}-{stage}/ event files, or an MLflow file store (tracking.kind)
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera import storage

EXPORT = "export"  # a training stage's export folder, under its own URI
REPORT = "report.json"  # the evaluation's report, written last: {eval}/report.json
HISTORY = "history.json"  # a training stage's reports so far: {stage}/history.json
STAGES = ("dvae", "prior", "reranker", "scorer")
# The exported part (tessera.artifacts) of each training stage: the scorer that grades
# evaluations is a second reranker, trained apart from the bundle's.
EXPORTED_PART = {"dvae": "dvae", "prior": "prior", "reranker": "reranker", "scorer": "reranker"}


@dataclass(frozen=True)
class RunPaths:
    root: str
    data: str
    dvae: str
    encode_dvae: str  # the dVAE export encode uses
    tokens: str  # where encode writes
    prior_tokens: str  # what the prior trains on
    prior: str
    reranker: str
    scorer: str  # evaluate's contrastive model (R-precision), not the bundle's reranker
    bundle: str  # where export writes the bundle
    bundle_prior: str  # the prior export the bundle is built from
    eval: str
    eval_bundle: str  # the bundle evaluate scores
    eval_scorer: str  # the scorer export evaluate loads
    classifier: str  # evaluate's saved attribute classifier
    generated: str
    generate_bundle: str  # the bundle generate draws with
    tracking: str  # TensorBoard's log folder, MLflow's tracking URI or W&B's folder (tracking.kind)

    @classmethod
    def of(cls, cfg) -> RunPaths:
        """The paths of a TesseraConfig."""
        root = cfg.run.root_uri

        def under(own: str | None, *parts: str) -> str:
            return own or storage.join(root, *parts)

        dvae, prior = under(cfg.dvae.output_uri, "dvae"), under(cfg.prior.output_uri, "prior")
        tokens, bundle = under(cfg.encode.output_uri, "tokens"), under(cfg.export.output_uri, "bundle")
        scorer = under(cfg.scorer.output_uri, "scorer")
        return cls(
            root=root, data=under(cfg.data.output_uri, "data"), dvae=dvae,
            encode_dvae=cfg.encode.dvae_uri or storage.join(dvae, EXPORT), tokens=tokens,
            prior_tokens=cfg.prior.tokens_uri or tokens, prior=prior,
            reranker=under(cfg.reranker.output_uri, "reranker"), scorer=scorer, bundle=bundle,
            bundle_prior=cfg.export.prior_uri or storage.join(prior, EXPORT),
            eval=under(cfg.evaluate.output_uri, "eval"), eval_bundle=cfg.evaluate.bundle_uri or bundle,
            eval_scorer=cfg.evaluate.scorer_uri or storage.join(scorer, EXPORT),
            classifier=under(cfg.evaluate.classifier.uri, "eval", "classifier"),
            generated=under(cfg.generate.output_uri, "generated"),
            generate_bundle=cfg.generate.bundle_uri or bundle,
            tracking=under(cfg.tracking.uri, "tracking"),
        )

    def stage(self, name: str) -> str:
        """A training stage's folder: "dvae", "prior", "reranker" or "scorer"."""
        if name not in STAGES:
            raise ValueError(f"no training stage called {name!r} (known: {', '.join(STAGES)})")
        return getattr(self, name)

    def export(self, name: str) -> str:
        """Where a training stage exports its last checkpoint (tessera.artifacts)."""
        return storage.join(self.stage(name), EXPORT)
