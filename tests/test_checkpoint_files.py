"""Checkpoints hold no pickles: DeepSpeed's own files are written and read back as safetensors
(tessera.training.safe_state), the whole weights beside them are DeepSpeed's fp32 master copy,
and a resume from them continues the run exactly — for each ZeRO stage, in one process with a
real DeepSpeed engine (a process group of one on gloo)."""

import os
import shutil

import pytest
import torch

from tessera.training.skeleton import join_process_group


@pytest.fixture
def one_process_group():
    saved = dict(os.environ)
    join_process_group(False)
    yield
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(zero_stage: int, precision: str, seed: int):
    import deepspeed

    from tessera.parallel.deepspeed_config import build_deepspeed_config

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ds = build_deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, zero_stage=zero_stage,
                                precision=precision, grad_clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def _train(engine, first: int, steps: int) -> list[float]:
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for i in range(first, first + steps):  # batch i is the same in every run
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        loss = (engine(x.to(engine.device, dtype)).float() - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _module_weights(engine) -> dict[str, torch.Tensor]:
    """The weights the module computes with (gathered whole under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"),
                                                   (3, "fp32"), (3, "bf16")])
def test_checkpoint_is_safetensors_and_resumes_exactly(zero_stage, precision, one_process_group, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tessera.training import safe_state
    from tessera.training.checkpoint import GATHERED_WEIGHTS, load_engine_state, save_checkpoint

    kept = tmp_path / "checkpoint"
    a = _engine(zero_stage, precision, seed=0)
    _train(a, 0, 3)
    save_checkpoint(a, lambda metrics, folder: shutil.copytree(folder, kept), {"step": 3},
                    state={"step": 3}, config={}, data_manifest=None)
    module = _module_weights(a)
    straight = _train(a, 3, 3)

    b = _engine(zero_stage, precision, seed=1)  # other initial weights: all must come from the files
    load_engine_state(b, str(kept))
    assert _train(b, 3, 3) == pytest.approx(straight, rel=1e-6, abs=1e-7)
    assert b.global_steps == a.global_steps == 6  # DeepSpeed's own counters came back too

    files = sorted((kept / "ds").iterdir())
    assert any("optim_states" in f.name for f in files) == (zero_stage > 0)
    for f in files:  # every one a safetensors file with tessera's structure header: no pickle
        with safe_open(str(f), framework="pt") as st:
            assert safe_state.STRUCTURE in st.metadata()
    assert not list(kept.glob("*.py"))  # DeepSpeed's recovery scripts, which cannot read these files

    weights = load_file(str(kept / GATHERED_WEIGHTS))
    assert set(weights) == set(module) and all(w.dtype == torch.float32 for w in weights.values())
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, w in weights.items():  # the module computes with these weights, rounded to its dtype
        assert torch.equal(w.to(low).float(), module[name]), name
    if precision == "bf16" and zero_stage > 0:  # the fp32 masters, not the bf16 copies
        assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())


def test_a_pickled_checkpoint_is_refused_by_name(one_process_group, tmp_path):
    from tessera.training.checkpoint import load_engine_state, save_checkpoint
    from tessera.training.safe_state import CheckpointFormatError

    kept = tmp_path / "checkpoint"
    engine = _engine(1, "fp32", seed=0)
    save_checkpoint(engine, lambda metrics, folder: shutil.copytree(folder, kept), {"step": 0},
                    state={"step": 0}, config={}, data_manifest=None)
    target = next((kept / "ds").glob("*optim_states.pt"))
    torch.save({"anything": torch.zeros(2)}, target)  # as DeepSpeed's own engine writes them
    with pytest.raises(CheckpointFormatError, match=rf"{target}: not a safetensors checkpoint file"):
        load_engine_state(engine, str(kept))


def test_state_codec_round_trips_deepspeed_types_and_refuses_others():
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from tessera.training.safe_state import CheckpointFormatError, decode, encode

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": scaler, "shape": torch.Size([3, 4]),
             "betas": (0.9, 0.95), "names": {"a"}, 0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3)},
             "module": OrderedDict(w=torch.arange(4.0)), "inf": float("inf"), "none": None}
    tensors: dict = {}
    out = decode(__import__("json").loads(__import__("json").dumps(encode(state, tensors))), tensors, "f")
    assert out["zero_stage"] is ZeroStageEnum.weights and isinstance(out["module"], OrderedDict)
    assert type(out["loss_scaler"]) is DynamicLossScaler and vars(out["loss_scaler"]) == vars(scaler)
    assert out["shape"] == torch.Size([3, 4]) and out["betas"] == (0.9, 0.95) and out["names"] == {"a"}
    assert torch.equal(out[0]["exp_avg"], torch.ones(3)) and out[0]["step"].item() == 7.0
    assert out["inf"] == float("inf") and out["none"] is None

    class Anything:
        pass

    with pytest.raises(TypeError, match=r"state\.optimizer\.hook: cannot store a .*Anything"):
        encode({"optimizer": {"hook": Anything()}}, {})
    # A tampered file cannot make the loader build anything outside the allowlist.
    with pytest.raises(CheckpointFormatError, match="os:system, which is not allowed"):
        decode({"t": "object", "c": "os:system", "v": {"t": "dict", "v": []}}, {}, "f")
