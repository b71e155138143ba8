"""Export: a (possibly ZeRO-3-sharded) DeepSpeed checkpoint -> `dvae.safetensors` + `dvae.json`,
loadable with torch + safetensors alone (no DeepSpeed, no Ray, nothing unpickled)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera import storage
from tessera.models.dvae import DVAE, DVAEShape

WEIGHTS = "dvae.safetensors"
META = "dvae.json"
KIND = "tessera.dvae"


def consolidated_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from every rank's shard files (ZeRO 1/2/3), or from the single model file
    a ZeRO-0 run writes, or — for parameters sharded within each node (grad_comm powersgd), whose
    shard files DeepSpeed's zero_to_fp32 cannot put together — the whole weights rank 0 gathered
    into the checkpoint."""
    from tessera.training.grad_comm import GATHERED_WEIGHTS

    ckpt = Path(checkpoint_dir)
    if (ckpt / GATHERED_WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(ckpt / GATHERED_WEIGHTS))
    if any((ckpt / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    else:
        # Our own checkpoint, written by this code: trusted input for torch.load.
        state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def checkpoint_weights(checkpoint_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """(weights, "ema") when the run kept a parameter EMA, else (its trained weights, "trained")."""
    from tessera.training.common import CHECKPOINT_TAG, EMA_FILE

    if (Path(checkpoint_dir) / EMA_FILE).exists():
        from safetensors.torch import load_file

        return load_file(str(Path(checkpoint_dir) / EMA_FILE)), "ema"
    return consolidated_state_dict(checkpoint_dir, CHECKPOINT_TAG), "trained"


def save_dvae(weights: dict[str, torch.Tensor], shape: DVAEShape, out_uri: str, /, *,
              options: storage.StorageOptions | None = None, **meta_extra) -> dict:
    """Write `dvae.safetensors` then `dvae.json` (last: its presence marks a complete export)."""
    from safetensors.torch import save

    DVAE(shape).load_state_dict(weights)  # strict: the export is complete or it is not written
    meta = {"kind": KIND, "format_version": 1, "shape": shape.to_dict(),
            "num_parameters": sum(v.numel() for v in weights.values()), **meta_extra}
    storage.write_bytes(storage.join(out_uri, WEIGHTS), save(weights), options)
    storage.write_json(storage.join(out_uri, META), meta, options)
    return meta


def export_dvae(checkpoint_dir: str, out_uri: str, *, options: storage.StorageOptions | None = None) -> dict:
    """The checkpoint's parameter EMA when the run kept one, else its trained weights."""
    from tessera.training.common import STATE_FILE

    state_file = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    shape = DVAEShape(**state_file["shape"])
    weights, source = checkpoint_weights(checkpoint_dir)
    extra = {"step": state_file["step"], "weights": source}
    config = Path(checkpoint_dir) / "config.json"
    if config.exists():
        extra["config"] = json.loads(config.read_text())
    return save_dvae(weights, shape, out_uri, options=options, **extra)


def load_dvae(uri: str, *, options: storage.StorageOptions | None = None, device: str = "cpu") -> DVAE:
    from safetensors.torch import load

    meta = storage.read_json(storage.join(uri, META), options)
    if meta.get("kind") != KIND:
        raise ValueError(f"{uri}: {META} is not a tessera dVAE export (kind={meta.get('kind')!r})")
    model = DVAE(DVAEShape(**meta["shape"]))
    model.load_state_dict(load(storage.read_bytes(storage.join(uri, WEIGHTS), options)))
    return model.to(device).eval()


PRIOR_WEIGHTS = "prior.safetensors"
PRIOR_META = "prior.json"
PRIOR_KIND = "tessera.prior"


def export_prior(checkpoint_dir: str, out_uri: str, *, options: storage.StorageOptions | None = None) -> dict:
    """`prior.safetensors` then `prior.json` (shape, step, config, and the token dataset it was
    trained on: its tokenizer and dVAE are what sampling needs)."""
    from safetensors.torch import save

    from tessera.models.prior import Prior, PriorShape
    from tessera.training.common import DATA_MANIFEST_FILE, STATE_FILE

    ckpt = Path(checkpoint_dir)
    state = json.loads((ckpt / STATE_FILE).read_text())
    shape = PriorShape(**state["shape"])
    weights, source = checkpoint_weights(checkpoint_dir)
    Prior(shape).load_state_dict(weights)  # strict: the export is complete or it is not written
    meta = {"kind": PRIOR_KIND, "format_version": 1, "shape": shape.to_dict(), "step": state["step"],
            "weights": source, "num_parameters": sum(v.numel() for v in weights.values())}
    for name, key in (("config.json", "config"), (DATA_MANIFEST_FILE, "tokens")):
        if (ckpt / name).exists():
            meta[key] = json.loads((ckpt / name).read_text())
    storage.write_bytes(storage.join(out_uri, PRIOR_WEIGHTS), save(weights), options)
    storage.write_json(storage.join(out_uri, PRIOR_META), meta, options)
    return meta


def load_prior(uri: str, *, options: storage.StorageOptions | None = None, device: str = "cpu",
               attention_impl: str = "auto"):
    from safetensors.torch import load

    from tessera.models.prior import Prior, PriorShape

    meta = storage.read_json(storage.join(uri, PRIOR_META), options)
    if meta.get("kind") != PRIOR_KIND:
        raise ValueError(f"{uri}: {PRIOR_META} is not a tessera prior export (kind={meta.get('kind')!r})")
    model = Prior(PriorShape(**meta["shape"]), attention_impl=attention_impl)
    model.load_state_dict(load(storage.read_bytes(storage.join(uri, PRIOR_WEIGHTS), options)))
    return model.to(device).eval()


RERANKER_WEIGHTS = "reranker.safetensors"
RERANKER_META = "reranker.json"
RERANKER_KIND = "tessera.reranker"


def export_reranker(checkpoint_dir: str, out_uri: str, *, options: storage.StorageOptions | None = None) -> dict:
    """`reranker.safetensors` then `reranker.json` (shape, step, the last validation retrieval
    accuracy, config, and the tokenizer its captions were encoded with: sampling must use the same)."""
    from safetensors.torch import save

    from tessera.models.reranker import Reranker, RerankerShape
    from tessera.training.common import DATA_MANIFEST_FILE, STATE_FILE

    ckpt = Path(checkpoint_dir)
    state = json.loads((ckpt / STATE_FILE).read_text())
    shape = RerankerShape(**state["shape"])
    weights, source = checkpoint_weights(checkpoint_dir)
    Reranker(shape).load_state_dict(weights)  # strict: the export is complete or it is not written
    meta = {"kind": RERANKER_KIND, "format_version": 1, "shape": shape.to_dict(), "step": state["step"],
            "weights": source, "num_parameters": sum(v.numel() for v in weights.values())}
    if state.get("retrieval"):
        meta["retrieval"] = state["retrieval"]
    if (ckpt / "config.json").exists():
        meta["config"] = json.loads((ckpt / "config.json").read_text())
    if (ckpt / DATA_MANIFEST_FILE).exists():
        data = json.loads((ckpt / DATA_MANIFEST_FILE).read_text())
        meta["data"] = {k: data[k] for k in ("generation", "tokenizer", "resolution") if k in data}
    storage.write_bytes(storage.join(out_uri, RERANKER_WEIGHTS), save(weights), options)
    storage.write_json(storage.join(out_uri, RERANKER_META), meta, options)
    return meta


def load_reranker(uri: str, *, options: storage.StorageOptions | None = None, device: str = "cpu"):
    """The exported reranker, in eval mode on `device` (torch + safetensors only; nothing unpickled)."""
    from safetensors.torch import load

    from tessera.models.reranker import Reranker, RerankerShape

    meta = storage.read_json(storage.join(uri, RERANKER_META), options)
    if meta.get("kind") != RERANKER_KIND:
        raise ValueError(f"{uri}: {RERANKER_META} is not a tessera reranker export (kind={meta.get('kind')!r})")
    model = Reranker(RerankerShape(**meta["shape"]))
    model.load_state_dict(load(storage.read_bytes(storage.join(uri, RERANKER_WEIGHTS), options)))
    return model.to(device).eval()
