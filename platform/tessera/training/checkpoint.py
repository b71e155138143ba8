"""A training checkpoint folder, and its export (tessera.artifacts) when a stage ends.

    {checkpoint}/ds/...                  every rank's DeepSpeed shard (ZeRO 1/2/3 or one model file)
    {checkpoint}/tessera_state.json      step, shape and what the stage keeps (rank 0)
    {checkpoint}/config.json             the whole TesseraConfig (rank 0)
    {checkpoint}/data_manifest.json      the manifest of the data trained on (rank 0)
    {checkpoint}/ema.safetensors         the parameter EMA, when the stage keeps one (rank 0)
    {checkpoint}/weights.safetensors     whole weights gathered by rank 0 when the parameters are
                                         sharded within each node (grad_comm), + per-rank files
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
    """Every rank writes its DeepSpeed shard (and its `rank_files`, named per rank) into one
    folder; rank 0 adds tessera's own files; then `report(metrics, folder)` hands it on (Ray
    Train uploads it to the run's storage)."""
    ema_state = ema.state_dict() if ema is not None else None  # a gather: every rank takes part
    with tempfile.TemporaryDirectory(prefix="tessera-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        for name, data in (rank_files or {}).items():
            Path(tmp, name).write_bytes(data)
        if dist.is_main():
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            Path(tmp, CONFIG_FILE).write_text(json.dumps(config))
            if data_manifest is not None:
                Path(tmp, DATA_MANIFEST_FILE).write_text(json.dumps(data_manifest))
            if ema_state is not None:
                from safetensors.torch import save_file

                save_file(ema_state, str(Path(tmp, EMA_FILE)))
        report(metrics, tmp)


def load_state(checkpoint_dir: str) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def load_ema(ema, checkpoint_dir: str) -> None:
    if ema is not None and (Path(checkpoint_dir) / EMA_FILE).exists():
        from safetensors.torch import load_file

        ema.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)))


def consolidated_state_dict(checkpoint_dir: str, tag: str = CHECKPOINT_TAG) -> dict[str, torch.Tensor]:
    """Full fp32 weights from every rank's shard files (ZeRO 1/2/3), or from the single model file
    a ZeRO-0 run writes, or — for parameters sharded within each node (grad_comm powersgd), whose
    shard files DeepSpeed's zero_to_fp32 cannot put together — the whole weights rank 0 gathered
    into the checkpoint."""
    ckpt = Path(checkpoint_dir)
    if (ckpt / GATHERED_WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(ckpt / GATHERED_WEIGHTS))
    if any((ckpt / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    else:
        # Our own checkpoint, written by this code: trusted input for torch.load.
        state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


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
