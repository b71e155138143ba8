"""A training checkpoint folder, and its export (tessera.artifacts) when a stage ends.

    {checkpoint}/ds/...                  every rank's DeepSpeed files (ZeRO 1/2/3 or one model
                                         file): the engine and optimizer state a resume restores,
                                         as safetensors (tessera.training.safe_state), not pickles
    {checkpoint}/weights.safetensors     the whole fp32 weights, gathered by rank 0 (what an export reads)
    {checkpoint}/tessera_state.json      step, shape and what the stage keeps (rank 0)
    {checkpoint}/config.json             the whole TesseraConfig (rank 0)
    {checkpoint}/data_manifest.json      the manifest of the data trained on (rank 0)
    {checkpoint}/ema.safetensors         the parameter EMA, when the stage keeps one (rank 0)
    + per-rank files a stage adds (the prior's gradient-compression state)

Nothing read back from a checkpoint is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tessera import artifacts, storage
from tessera.parallel import dist

CHECKPOINT_TAG = "ds"
STATE_FILE = "tessera_state.json"
CONFIG_FILE = "config.json"
EMA_FILE = "ema.safetensors"
DATA_MANIFEST_FILE = "data_manifest.json"
GATHERED_WEIGHTS = "weights.safetensors"


def save_checkpoint(engine, report, metrics: dict, *, state: dict, config: dict, data_manifest: dict | None,
                    ema=None, rank_files: dict[str, bytes] | None = None) -> None:
    """Every rank writes its DeepSpeed files (and its `rank_files`, named per rank) into one
    folder; rank 0 adds tessera's own files and the whole weights; then `report(metrics, folder)`
    hands it on (Ray Train uploads it to the run's storage). A collective: every rank calls it."""
    from safetensors.torch import save_file

    from tessera.training import safe_state

    rank_files = rank_files or {}
    ema_state = ema.state_dict() if ema is not None else None  # a gather: every rank takes part
    # A stage may have gathered the weights itself (grad_comm, for node-sharded parameters): rank 0
    # knows, and every rank must agree before the gather below, which is a collective.
    gathered = dist.all_reduce_mean([float(GATHERED_WEIGHTS in rank_files)])[0] > 0
    weights = None if gathered else whole_weights(engine)
    safe_state.install(engine)
    with tempfile.TemporaryDirectory(prefix="tessera-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        # DeepSpeed copies in its recovery scripts, which cannot read safetensors files: not shipped.
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            Path(tmp, script).unlink(missing_ok=True)
        for name, data in rank_files.items():
            Path(tmp, name).write_bytes(data)
        if dist.is_main():
            if weights is not None:
                save_file(weights, str(Path(tmp, GATHERED_WEIGHTS)))
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            Path(tmp, CONFIG_FILE).write_text(json.dumps(config))
            if data_manifest is not None:
                Path(tmp, DATA_MANIFEST_FILE).write_text(json.dumps(data_manifest))
            if ema_state is not None:
                save_file(ema_state, str(Path(tmp, EMA_FILE)))
        report(metrics, tmp)


def whole_weights(engine) -> dict[str, torch.Tensor]:
    """The model's whole weights in fp32 on rank 0's CPU ({} on the others), gathered one
    parameter at a time, so no rank holds more than one whole parameter beside its shard (a
    collective: every rank calls it). A parameter's value is DeepSpeed's fp32 master copy where it
    keeps one (ZeRO 1-3), else the module's own (ZeRO-0: the weights themselves)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    main, out = dist.is_main(), {}
    for name, p in engine.module.named_parameters():
        whole = safe_get_full_fp32_param(p)
        if whole is None and hasattr(p, "ds_id"):  # ZeRO-3 without a master copy (frozen)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                whole = p.detach().clone()
        if main:
            out[name] = (p if whole is None else whole).detach().to("cpu", torch.float32, copy=True)
    if main:
        persistent = engine.module.state_dict().keys()  # buffers are never partitioned
        for name, buf in engine.module.named_buffers():
            if name in persistent:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def load_engine_state(engine, checkpoint_dir: str) -> None:
    """Restore the engine (weights, optimizer, DeepSpeed's counters) from a checkpoint's safetensors
    files; a folder without them is an error naming it, not a silent fresh start."""
    from tessera.training import safe_state

    safe_state.install(engine)
    path, _ = engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir}/{CHECKPOINT_TAG}: no DeepSpeed checkpoint to resume from")


def load_state(checkpoint_dir: str) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def load_ema(ema, checkpoint_dir: str) -> None:
    if ema is not None and (Path(checkpoint_dir) / EMA_FILE).exists():
        from safetensors.torch import load_file

        ema.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)))


def consolidated_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The whole fp32 weights rank 0 gathered into the checkpoint (safetensors: nothing unpickled)."""
    path = Path(checkpoint_dir) / GATHERED_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing — a checkpoint written before tessera stored its weights as safetensors "
            "keeps them only in DeepSpeed's pickles, which tessera does not load")
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_weights(checkpoint_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """(weights, "ema") when the run kept a parameter EMA, else (its trained weights, "trained")."""
    if (Path(checkpoint_dir) / EMA_FILE).exists():
        from safetensors.torch import load_file

        return load_file(str(Path(checkpoint_dir) / EMA_FILE)), "ema"
    return consolidated_state_dict(checkpoint_dir), "trained"


def export_checkpoint(part: str, checkpoint_dir: str, out_uri: str, *,
                      options: storage.StorageOptions | None = None) -> dict:
    """The checkpoint as an export of `part` (tessera.artifacts): its EMA weights when the run
    kept one, else its trained weights; with the step, config, training data and whatever the
    stage put under "export" in its state."""
    ckpt = Path(checkpoint_dir)
    state = load_state(checkpoint_dir)
    p = artifacts.part(part)
    shape = p.shape_class()(**{**dict(p.legacy_shape), **state["shape"]})
    weights, source = checkpoint_weights(checkpoint_dir)
    extra = {"step": state["step"], "weights": source, **(state.get("export") or {})}
    if (ckpt / CONFIG_FILE).exists():
        extra["config"] = json.loads((ckpt / CONFIG_FILE).read_text())
    data = (json.loads((ckpt / DATA_MANIFEST_FILE).read_text()) if (ckpt / DATA_MANIFEST_FILE).exists()
            else None)
    return artifacts.export(part, weights, shape, out_uri, options=options, data_manifest=data, **extra)
