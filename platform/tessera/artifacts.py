"""The exported parts of a trained model, in one table, with one `export()` and one `load()`.

    {uri}/dvae.safetensors + dvae.json            tessera.models.dvae.DVAE
    {uri}/prior.safetensors + prior.json          tessera.models.prior.Prior
    {uri}/reranker.safetensors + reranker.json    tessera.models.reranker.Reranker

An export is its weights (safetensors: nothing unpickled) and a JSON written last, whose presence
marks a complete export: {"kind", "format_version", "shape", "num_parameters", ...} plus what the
exporting stage adds (step, config, the data it was trained on). Loading needs torch and
safetensors only — no DeepSpeed, no Ray. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

from tessera import storage

FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An export is missing, of another kind, or its weights do not fit its shape; the message
    names the file."""


@dataclass(frozen=True)
class Part:
    name: str  # "dvae", "prior", "reranker": also the bundle's key for it
    model: str  # "module:Class" of the torch module
    shape: str  # "module:Class" of its frozen shape dataclass
    # The training data's manifest as the export records it: under this key, whole (None) or only
    # these fields; no data_key: not recorded.
    data_key: str | None = None
    data_fields: tuple[str, ...] | None = None
    # Shape fields added after exports existed, with the value those older exports were built with.
    legacy_shape: tuple[tuple[str, object], ...] = ()

    @property
    def kind(self) -> str:
        return f"tessera.{self.name}"

    @property
    def weights(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def meta(self) -> str:
        return f"{self.name}.json"

    def model_class(self):
        return _resolve(self.model)

    def shape_class(self):
        return _resolve(self.shape)


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


PARTS: dict[str, Part] = {
    "dvae": Part("dvae", "tessera.models.dvae:DVAE", "tessera.models.dvae:DVAEShape",
                 legacy_shape=(("decoder_kernel", 1),)),
    # The prior's token dataset: its tokenizer and dVAE are what sampling needs.
    "prior": Part("prior", "tessera.models.prior:Prior", "tessera.models.prior:PriorShape",
                  data_key="tokens", legacy_shape=(("masks", 1),)),
    # The tokenizer its captions were encoded with: sampling must use the same.
    "reranker": Part("reranker", "tessera.models.reranker:Reranker", "tessera.models.reranker:RerankerShape",
                     data_key="data", data_fields=("generation", "tokenizer", "resolution")),
}


def part(name: str) -> Part:
    try:
        return PARTS[name]
    except KeyError:
        raise ArtifactError(f"no exported part called {name!r} (known: {', '.join(PARTS)})") from None


def build(name: str, meta: dict, weights: bytes | dict, *, where: str, **model_kwargs):
    """A model in eval mode from its export's JSON and weights (safetensors bytes or a state
    dict); strict: every tensor must fit the shape in the JSON."""
    from safetensors.torch import load

    p = part(name)
    if meta.get("kind") != p.kind:
        raise ArtifactError(f"{where}: expected a {p.kind} export, found kind={meta.get('kind')!r}")
    try:
        shape = {**dict(p.legacy_shape), **meta["shape"]}
        model = p.model_class()(p.shape_class()(**shape), **model_kwargs)
        model.load_state_dict(load(weights) if isinstance(weights, bytes) else weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where}: weights do not fit the {name} shape in its JSON ({e})") from None
    return model.eval()


def read_meta(name: str, uri: str, options: storage.StorageOptions | None = None) -> dict:
    """The export's JSON at `uri`, checked to be of this part."""
    p = part(name)
    where = storage.join(uri, p.meta)
    if not storage.exists(where, options):
        raise ArtifactError(f"{where}: no {name} export here")
    try:
        meta = json.loads(storage.read_bytes(where, options))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None
    if meta.get("kind") != p.kind:
        raise ArtifactError(f"{where}: not a tessera {name} export (kind={meta.get('kind')!r})")
    return meta


def load(name: str, uri: str, *, options: storage.StorageOptions | None = None, device: str = "cpu",
         **model_kwargs):
    """The exported model at `uri`, in eval mode on `device`."""
    p = part(name)
    meta = read_meta(name, uri, options)
    weights = storage.read_bytes(storage.join(uri, p.weights), options)
    return build(name, meta, weights, where=storage.join(uri, p.weights), **model_kwargs).to(device)


def export(name: str, weights: dict, shape, out_uri: str, /, *, options: storage.StorageOptions | None = None,
           data_manifest: dict | None = None, **meta_extra: Any) -> dict:
    """Write `{name}.safetensors`, then `{name}.json` (last: its presence marks a complete
    export). The weights are checked against the shape first: an export is complete or absent."""
    from safetensors.torch import save

    p = part(name)
    build(name, {"kind": p.kind, "shape": shape.to_dict()}, weights, where=out_uri)
    meta = {"kind": p.kind, "format_version": FORMAT_VERSION, "shape": shape.to_dict(),
            "num_parameters": sum(v.numel() for v in weights.values()), **meta_extra}
    if data_manifest is not None and p.data_key:
        fields = p.data_fields
        meta[p.data_key] = data_manifest if fields is None else {k: data_manifest[k] for k in fields
                                                                  if k in data_manifest}
    storage.write_bytes(storage.join(out_uri, p.weights), save(weights), options)
    storage.write_json(storage.join(out_uri, p.meta), meta, options)
    return meta
