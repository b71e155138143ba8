"""DeepSpeed's checkpoint files as safetensors, so that resuming a run unpickles nothing.

DeepSpeed writes and reads every file of a checkpoint (the model states, each rank's ZeRO
optimizer states) through its engine's `checkpoint_engine`, by default with torch.save and an
unrestricted unpickling load (DeepSpeed 0.19.8 turns torch's weights-only mode off) — reading such
a file runs whatever code it names, and checkpoints live in shared object storage.
`SafetensorsCheckpointEngine` takes its place: a state becomes one safetensors file holding its
tensors, with the rest of the structure as JSON in the file's header. JSON lacks tuples, sets,
non-string keys, torch.Size and dtypes, so those are tagged; the only objects rebuilt are the few
DeepSpeed classes a state holds (its loss scaler, the ZeRO stage enum, a parameter's place in a
flat partition), named in an allowlist; anything else fails at save time, naming where it sits
in the state.

The files keep DeepSpeed's names (*.pt) so its loader finds them; DeepSpeed's offline tools
(zero_to_fp32.py) cannot read them, and need not: exports read the whole weights tessera writes
beside them (tessera.training.checkpoint).
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from enum import Enum

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

STRUCTURE = "tessera.state"  # the header field holding the JSON
# DeepSpeed classes a checkpoint state may hold, rebuilt from their attributes; nothing else is.
# (fragment_address: ZeRO 1/2 under bf16 record where each parameter sits in the flat partition.)
OBJECTS = frozenset({"deepspeed.runtime.fp16.loss_scaler:LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment:fragment_address"})
ENUMS = frozenset({"deepspeed.runtime.zero.config:ZeroStageEnum"})


class CheckpointFormatError(ValueError):
    """A checkpoint file is not a safetensors state, or holds what it may not; names the file."""


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class(name: str, allowed: frozenset[str], where: str) -> type:
    if name not in allowed:
        raise CheckpointFormatError(f"{where}: names {name}, which is not allowed in a checkpoint")
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def encode(obj, tensors: dict[str, torch.Tensor], where: str = "state"):
    """`obj` as JSON-able values; its tensors go into `tensors` (CPU, contiguous) by number."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"t": "tensor", "v": key}
    if isinstance(obj, Enum):  # before int and str: DeepSpeed's enums are both
        if _name(type(obj)) not in ENUMS:
            raise TypeError(f"{where}: cannot store the enum {_name(type(obj))} in a checkpoint")
        return {"t": "enum", "c": _name(type(obj)), "v": obj.value}
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, torch.Size):
        return {"t": "size", "v": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"t": "dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        pairs = [[encode(k, tensors, where), encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]
        return {"t": "odict" if isinstance(obj, OrderedDict) else "dict", "v": pairs}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        return {"t": "tuple" if isinstance(obj, tuple) else "set", "v": items}
    if _name(type(obj)) in OBJECTS:
        return {"t": "object", "c": _name(type(obj)), "v": encode(vars(obj), tensors, where)}
    raise TypeError(f"{where}: cannot store a {_name(type(obj))} in a safetensors checkpoint "
                    f"(not in tessera.training.safe_state's allowlist)")


def decode(obj, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag, value = obj.get("t"), obj.get("v")
    if tag == "tensor":
        return tensors[value]
    if tag in ("dict", "odict"):
        pairs = ((decode(k, tensors, where), decode(v, tensors, where)) for k, v in value)
        return OrderedDict(pairs) if tag == "odict" else dict(pairs)
    if tag in ("tuple", "set"):
        return (tuple if tag == "tuple" else set)(decode(v, tensors, where) for v in value)
    if tag == "size":
        return torch.Size(value)
    if tag == "dtype":
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointFormatError(f"{where}: {value!r} is not a torch dtype")
        return dtype
    if tag == "enum":
        return _class(obj.get("c"), ENUMS, where)(value)
    if tag == "object":
        cls = _class(obj.get("c"), OBJECTS, where)
        out = cls.__new__(cls)
        out.__dict__.update(decode(value, tensors, where))
        return out
    raise CheckpointFormatError(f"{where}: unknown tag {tag!r} in the state")


def save_state(state, path: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(encode(state, tensors))
    save_file(tensors, path, metadata={STRUCTURE: structure})


def load_state(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            structure = (f.metadata() or {}).get(STRUCTURE)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointFormatError(
            f"{path}: not a safetensors checkpoint file ({e}); checkpoints written before tessera "
            "stored them as safetensors are pickles, which it does not load: start the run afresh "
            "(another run.name) or resume it with the tessera that wrote it") from None
    if structure is None:
        raise CheckpointFormatError(f"{path}: a safetensors file without tessera's {STRUCTURE} header")
    return decode(json.loads(structure), tensors, path)


class SafetensorsCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default engine with safetensors files in place of pickles (see the module)."""

    def save(self, state_dict, path: str) -> None:
        save_state(state_dict, path)

    def load(self, path: str, map_location=None):
        # On the CPU whatever map_location says: DeepSpeed copies what it loads into its own buffers.
        return load_state(path)


def install(engine) -> None:
    """Make `engine` write and read its checkpoints as safetensors (before the first of either)."""
    if not isinstance(engine.checkpoint_engine, SafetensorsCheckpointEngine):
        engine.checkpoint_engine = SafetensorsCheckpointEngine()
