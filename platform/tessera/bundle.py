"""The model bundle: everything sampling needs, in one folder at a URI, and nothing executable.

    {uri}/dvae.safetensors + dvae.json          image tokenizer (decoder used for sampling)
    {uri}/prior.safetensors + prior.json        the transformer prior
    {uri}/reranker.safetensors + reranker.json  contrastive reranker (optional)
    {uri}/tokenizer.json                        the caption BPE the prior was trained with
    {uri}/manifest.json                         written last: name, shapes, sources, sha256 of each file

Serving and offline generation load only bundles. Loading reads JSON and safetensors (no pickle)
and checks every file against the manifest's digest, so a half-copied or mixed bundle is refused
with the file named rather than served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tessera import artifacts, published, storage

MANIFEST = published.MANIFEST
TOKENIZER = "tokenizer.json"
KIND = "tessera.bundle"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle (or the exports it is built from) is missing, corrupt or inconsistent; the
    message names the file."""


@dataclass
class Bundle:
    uri: str
    manifest: dict
    tokenizer: Any  # tessera.data.tokenizer.CaptionTokenizer
    dvae: Any  # tessera.models.dvae.DVAE, eval mode
    prior: Any  # tessera.models.prior.Prior, eval mode
    reranker: Any | None  # tessera.models.reranker.Reranker, or None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def resolution(self) -> int:
        return self.dvae.shape.image_size

    @property
    def text_len(self) -> int:
        return self.prior.shape.text_len


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(uri: str, data: bytes) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{uri}: not valid JSON ({e})") from None


def _build_model(part: str, meta: dict, weights: bytes, where: str):
    """A model from its export's JSON and safetensors bytes (strict: every tensor must fit)."""
    try:
        return artifacts.build(part, meta, weights, where=where)
    except artifacts.ArtifactError as e:
        raise BundleError(str(e)) from None


def check_consistent(tokenizer_vocab: int, models: dict) -> None:
    """The parts must speak the same codes: prior image vocabulary = dVAE codebook, grids equal,
    every caption id the tokenizer can emit inside the prior's (and reranker's) text vocabulary."""
    dvae, prior, reranker = models["dvae"].shape, models["prior"].shape, models.get("reranker")
    problems = []
    if prior.image_vocab != dvae.num_tokens:
        problems.append(f"prior image_vocab {prior.image_vocab} != dVAE codebook {dvae.num_tokens}")
    if prior.grid != dvae.grid_size:
        problems.append(f"prior grid {prior.grid} != dVAE grid {dvae.grid_size}")
    if tokenizer_vocab > prior.text_vocab:
        problems.append(f"tokenizer vocabulary {tokenizer_vocab} > prior text_vocab {prior.text_vocab}")
    if reranker is not None and tokenizer_vocab > reranker.shape.text_vocab:
        problems.append(f"tokenizer vocabulary {tokenizer_vocab} > reranker text_vocab "
                        f"{reranker.shape.text_vocab}")
    if problems:
        raise BundleError("the parts do not belong together: " + "; ".join(problems))


def write_bundle(out_uri: str, *, dvae_uri: str, prior_uri: str, tokenizer_uri: str,
                 reranker_uri: str | None = None,
                 name: str, sources: dict | None = None, overwrite: bool = False,
                 options: storage.StorageOptions | None = None) -> dict:
    """Copy the exports into one bundle at out_uri after loading each (strict) and checking they
    fit together. The manifest goes last; an existing bundle is replaced only with overwrite, and
    then its manifest is removed first, so readers never see old files under a new manifest."""
    from tessera.data.tokenizer import CaptionTokenizer

    manifest_uri = storage.join(out_uri, MANIFEST)
    if storage.exists(manifest_uri, options):
        if not overwrite:
            raise BundleError(f"{out_uri}: a bundle already exists there (pass overwrite to replace it)")
        fs, path = storage.resolve(manifest_uri, options)
        fs.delete_file(path)
    files: dict[str, bytes] = {}
    models, metas = {}, {}
    for part, src in (("dvae", dvae_uri), ("prior", prior_uri), ("reranker", reranker_uri)):
        if src is None:
            continue
        weights_name, meta_name = artifacts.PARTS[part].weights, artifacts.PARTS[part].meta
        meta_bytes = storage.read_bytes(storage.join(src, meta_name), options)
        weights = storage.read_bytes(storage.join(src, weights_name), options)
        metas[part] = _json(storage.join(src, meta_name), meta_bytes)
        models[part] = _build_model(part, metas[part], weights, storage.join(src, weights_name))
        files[weights_name], files[meta_name] = weights, meta_bytes
    tokenizer_bytes = storage.read_bytes(tokenizer_uri, options)
    try:
        tokenizer = CaptionTokenizer.from_json(tokenizer_bytes.decode())
    except Exception as e:  # tokenizers raises its own exception types
        raise BundleError(f"{tokenizer_uri}: not a tokenizer JSON ({e})") from None
    check_consistent(tokenizer.vocab_size, models)
    files[TOKENIZER] = tokenizer_bytes

    for fname, data in files.items():
        storage.write_bytes(storage.join(out_uri, fname), data, options)
    manifest = {
        **published.header(KIND, format_version=FORMAT_VERSION), "name": name,
        "resolution": models["dvae"].shape.image_size, "text_len": models["prior"].shape.text_len,
        "has_reranker": "reranker" in models,
        "parts": {part: {"shape": m["shape"], "step": m.get("step"), "weights": m.get("weights"),
                         "num_parameters": m.get("num_parameters")} for part, m in metas.items()},
        "sources": {"dvae": dvae_uri, "prior": prior_uri, "reranker": reranker_uri,
                    "tokenizer": tokenizer_uri,
                    **(sources or {})},
        "files": {fname: {"sha256": _sha256(data), "bytes": len(data)} for fname, data in files.items()},
    }
    storage.write_json(manifest_uri, manifest, options)
    return manifest


def read_manifest(uri: str, options: storage.StorageOptions | None = None) -> dict:
    where = storage.join(uri, MANIFEST)
    if not storage.exists(where, options):
        raise BundleError(f"{uri}: no {MANIFEST} — not a tessera bundle, or one still being written "
                          "(build one with jobs/export.py)")
    manifest = _json(where, storage.read_bytes(where, options))
    if manifest.get("kind") != KIND:
        raise BundleError(f"{where}: not a tessera bundle manifest (kind={manifest.get('kind')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format {manifest.get('format_version')!r}; "
                          f"this tessera reads {FORMAT_VERSION}")
    return manifest


def load_bundle(uri: str, *, options: storage.StorageOptions | None = None, device: str = "cpu") -> Bundle:
    """Every part, checked against the manifest's digests, on `device` in eval mode."""
    from tessera.data.tokenizer import CaptionTokenizer

    manifest = read_manifest(uri, options)

    def read(fname: str) -> bytes:
        expected = manifest["files"].get(fname)
        if expected is None:
            raise BundleError(f"{uri}: the manifest lists no {fname}")
        data = storage.read_bytes(storage.join(uri, fname), options)
        if _sha256(data) != expected["sha256"]:
            raise BundleError(f"{storage.join(uri, fname)}: contents differ from the manifest's sha256 "
                              "(corrupt or partly copied bundle)")
        return data

    models = {}
    for part, p in artifacts.PARTS.items():
        if part == "reranker" and not manifest.get("has_reranker"):
            continue
        weights_name, meta_name = p.weights, p.meta
        meta = _json(storage.join(uri, meta_name), read(meta_name))
        models[part] = _build_model(part, meta, read(weights_name),
                                    storage.join(uri, weights_name)).to(device)
    tokenizer = CaptionTokenizer.from_json(read(TOKENIZER).decode())
    check_consistent(tokenizer.vocab_size, models)
    return Bundle(uri=uri, manifest=manifest, tokenizer=tokenizer, dvae=models["dvae"], prior=models["prior"],
                  reranker=models.get("reranker"))


def export_bundle(cfg) -> dict:
    """The bundle of a pipeline run (a TesseraConfig): the prior's export, the dVAE its tokens were
    encoded with (as the prior's export records), the tokenizer of those tokens, and the
    reranker's export when there is one."""
    opts = storage.StorageOptions.from_config(cfg.storage)
    prior_uri = cfg.paths.bundle_prior
    prior_meta_uri = storage.join(prior_uri, artifacts.PARTS["prior"].meta)
    if not storage.exists(prior_meta_uri, opts):
        raise BundleError(f"{prior_meta_uri}: no prior export "
                          "(run jobs/train_prior.py first, or set export.prior_uri)")
    tokens = _json(prior_meta_uri, storage.read_bytes(prior_meta_uri, opts)).get("tokens") or {}
    dvae_uri = (tokens.get("dvae") or {}).get("uri") or cfg.paths.encode_dvae
    # Where the token manifest says: inside its generation (at the top in older token datasets).
    token_manifest = published.existing(cfg.paths.prior_tokens, opts) or {}
    tokenizer_path = (token_manifest.get("tokenizer") or {}).get("path", TOKENIZER)
    tokenizer_uri = storage.join(cfg.paths.prior_tokens, tokenizer_path)
    want = (tokens.get("tokenizer") or {}).get("sha256")
    if want and _sha256(storage.read_bytes(tokenizer_uri, opts)) != want:
        raise BundleError(f"{tokenizer_uri}: not the tokenizer the prior at {prior_uri} was trained with "
                          "(sha256 differs)")
    reranker_uri = cfg.paths.export("reranker") if cfg.export.include_reranker else None
    if reranker_uri and not storage.exists(
            storage.join(reranker_uri, artifacts.PARTS["reranker"].meta), opts):
        reranker_uri = None
    return write_bundle(cfg.paths.bundle, dvae_uri=dvae_uri, prior_uri=prior_uri, tokenizer_uri=tokenizer_uri,
                        reranker_uri=reranker_uri, name=cfg.bundle_name, overwrite=cfg.export.overwrite,
                        sources={"run": cfg.run.name}, options=opts)
