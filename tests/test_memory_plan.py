"""bench/memory_plan.py against what really gets allocated.

Model states: four gloo processes build the prior exactly as PriorStage.run does (start,
build_model, optimizer, deepspeed_config, prepare_model, a real `deepspeed.initialize` on
DeepSpeed's CPU accelerator), take two optimizer steps, and sum the tensors the engine holds: the
parameters' ZeRO-3 partitions (ds_tensor), the persistent whole parameters, hpZ's secondary
partitions (at the end of backward), the flat fp32 gradient partition, AdamW's moments, the fp32
master copy, the reduce bucket, the EMA and PowerSGD's buffers; and, at the forward/backward turn of
the second step, the weights ZeRO-3 holds gathered. Each must match the plan within 5%.

Activations: the tensors autograd saves during a forward pass (hooked, storages counted once,
parameters excluded) against the plan's formulas, on the dense path's CPU kernels."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera.config import load_config
from tessera.models.prior import Prior, PriorShape

ROOT = Path(__file__).resolve().parents[1]

# Debug-sized (dim 64, depth 2) on 4 ranks; a 2048-token caption vocabulary makes the embedding
# and the text head bigger than ZeRO-3's persistence threshold (1e5), the rest stays whole.
SMALL = ["prior.dim=64", "prior.depth=2", "prior.heads=4", "prior.num_workers=4", "prior.micro_batch=2",
         "tokenizer.vocab_size=2048", "prior.ema_decay=0.99", "prior.precision=fp32",
         "prior.caption_dropout=0", "prior.zero_stage=3"]
ONE_NODE = ["prior.grad_comm.method=none", "prior.grad_comm.ranks_per_node=4"]
VARIANTS = {  # config overrides, DeepSpeed zero_optimization keys set beside tessera's
    "none": (ONE_NODE, {}),
    # 2 nodes x 2 ranks: parameters sharded within the node, PowerSGD between nodes.
    "powersgd": (["prior.grad_comm.method=powersgd", "prior.grad_comm.ranks_per_node=2",
                  "prior.grad_comm.powersgd.rank=2"], {}),
    # hpZ alone (the quantized parts need CUDA): a secondary partition within each node.
    "zeropp": (["prior.grad_comm.method=zeropp", "prior.grad_comm.ranks_per_node=2"], {}),
    # Most weights partitioned and a short reuse distance: only the heads stay gathered at the turn.
    "reuse": (ONE_NODE, {"stage3_param_persistence_threshold": 1000, "stage3_max_reuse_distance": 200_000,
                         "stage3_prefetch_bucket_size": 0}),
}
MODEL_STATES = ("params", "grads", "adam", "master")
COMPARED = (*MODEL_STATES, "params_persistent", "params_hpz", "reduce_bucket", "ema", "powersgd_state",
            "gathered")


class _TokensIO:
    """What PriorStage asks of its io before training: the token manifest."""

    def __init__(self, manifest: dict):
        self.manifest = manifest

    def token_manifest(self) -> dict:
        return self.manifest


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _rank(rank: int, world: int, port: int, overrides: list[str], zero: dict, manifest: dict,
          out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from tessera.training.ema import ParameterEMA
    from tessera.training.prior_loop import PriorStage
    from tessera.training.skeleton import join_process_group

    cfg = load_config("debug", overrides)
    stage = PriorStage(cfg, _TokensIO(manifest))
    join_process_group(use_gpu=False)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Stage.run's set-up, step by step.
    stage.start()
    torch.manual_seed(0)
    model = stage.build_model()
    optimizer = stage.optimizer(model)
    ds_config = stage.deepspeed_config()
    ds_config["zero_optimization"].update(zero)
    model = stage.prepare_model(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    stage.engine, stage.device = engine, engine.device
    stage.on_engine()
    ema = ParameterEMA(engine.module, cfg.prior.ema_decay, zero_stage=3)
    params = list(engine.module.parameters())

    turn = {}

    def at_turn(grad):  # the loss's gradient: the first thing backward computes
        turn["gathered"] = sum(p.ds_numel * p.element_size() for p in params
                               if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist)
        return grad

    engine.module.register_forward_hook(lambda m, args, out: out["loss"].register_hook(at_turn) and None)
    s = stage.shape
    g = torch.Generator().manual_seed(rank)
    for step in range(2):
        B = cfg.prior.micro_batch
        batch = {"text_ids": torch.randint(1, s.text_vocab, (B, s.text_len), generator=g),
                 "text_mask": torch.ones(B, s.text_len, dtype=torch.bool),
                 "image_tokens": torch.randint(0, s.image_vocab, (B, s.num_image_tokens), generator=g)}
        stage.forward_backward(batch, step=step, seed=step)
        # hpZ's secondary shards live from a weight's release to the optimizer step.
        turn["params_hpz"] = _nbytes(getattr(p, "ds_secondary_tensor", None) for p in params)
        stage.before_step(step=step, boundary=True)
        engine.step()
        ema.update(engine.module)

    zero = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    moments = [t for state in zero.optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.numel() > 1]  # exp_avg, exp_avg_sq (not the step count)
    masters = [hp for hp, lp in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat,
                                    strict=True) if hp.data_ptr() != lp.data_ptr()]
    psgd = stage.comm.powersgd
    measured = {
        "params": _nbytes(p.ds_tensor for p in params),
        "params_persistent": sum(p.data.numel() * p.element_size() for p in params if p.ds_persist),
        "params_hpz": turn["params_hpz"],  # at the end of the second backward pass
        "grads": _nbytes([zero.grad_partitions_flat_buffer]),
        "adam": _nbytes(moments),
        "master": _nbytes(masters),
        "reduce_bucket": _nbytes(b.buffer for b in zero.ipg_buckets.values()),
        "ema": ema.local_bytes,
        "powersgd_state": _nbytes([*psgd.errors.values(), *psgd.qs.values()]) if psgd else 0,
        "gathered": turn["gathered"],
    }
    Path(out.format(rank)).write_text(json.dumps(measured))
    stage.close()
    deepspeed.comm.barrier()  # all done before any closes its sockets (see test_ema.py)
    deepspeed.comm.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", list(VARIANTS))
def test_planned_model_states_match_a_zero3_engine_on_four_ranks(method, tmp_path):
    import torch.multiprocessing as mp

    from bench.memory_plan import plan_memory

    overrides, zero = [*SMALL, *VARIANTS[method][0]], VARIANTS[method][1]
    cfg = load_config("debug", overrides)
    plan = plan_memory(cfg, zero_overrides=zero, origin=f"test {method}")
    s = plan["shape"]
    manifest = {"text_vocab_size": s["text_vocab"], "num_image_tokens": s["image_vocab"],
                "grid_size": s["grid"]}
    out = str(tmp_path / "rank{}.json")
    mp.start_processes(_rank, args=(4, _free_port(), overrides, zero, manifest, out), nprocs=4,
                       start_method="spawn")
    ranks = [json.loads(Path(out.format(r)).read_text()) for r in range(4)]

    planned = {r["key"]: r["bytes"] for r in plan["rows"]}
    print(f"\n{method}: {plan['parameters']} parameters, 4 ranks as {plan['nodes']} node(s); bytes per rank")
    print(f"  {'component':<18}{'planned':>12}{'measured (ranks 0-3)':>44}")
    for key in COMPARED:
        got = [m[key] for m in ranks]
        print(f"  {key:<18}{planned.get(key, 0):>12.0f}{str(got):>44}")
    states_planned = sum(planned[k] for k in MODEL_STATES)
    states_measured = [sum(m[k] for k in MODEL_STATES) for m in ranks]
    print(f"  {'params+grads+opt':<18}{states_planned:>12.0f}{str(states_measured):>44}")

    for key in COMPARED:
        want = planned.get(key, 0.0)
        for rank, m in enumerate(ranks):
            assert m[key] == pytest.approx(want, rel=0.05, abs=64), (key, rank)
    assert all(v == pytest.approx(states_planned, rel=0.05) for v in states_measured)
    if method == "powersgd":
        world = {r["key"]: r["bytes"] for r in plan_memory(load_config("debug", [*SMALL, *ONE_NODE]))["rows"]}
        assert planned["params"] == pytest.approx(2 * world["params"], rel=0.05)  # sharded over 2, not 4
        assert planned["powersgd_state"] > 0
    if method == "zeropp":  # the embedding and text head: the weights over the persistence threshold
        assert planned["params_hpz"] == pytest.approx(2 * 4 * 2048 * 64 / 2)
    if method == "reuse":  # both heads and the root's text tensors, not the caption embedding
        assert planned["gathered"] == pytest.approx(4 * (2048 * 64 + 512 * 64 + 2 * 16 * 64))


def _saved_bytes(shape: PriorShape, *, batch: int, autocast: bool, kernel: str, checkpointing: bool,
                 monkeypatch) -> int:
    """Bytes of the tensors autograd saves in one forward pass (each storage once, no parameters).
    Attention in bf16 under autocast, as on CUDA (the plan's device), not CPU's fp32 detour."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tessera.models import attention

    monkeypatch.setattr(attention, "CPU_BF16_ATTENTION_IN_FP32", False)

    torch.manual_seed(0)
    model = Prior(shape, attention_impl="dense", activation_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, shape.text_vocab, (batch, shape.text_len), generator=g)
    mask = torch.ones(batch, shape.text_len, dtype=torch.bool)
    image = torch.randint(0, shape.image_vocab, (batch, shape.num_image_tokens), generator=g)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION,
                                                            SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, mask, image)
        out["loss"].backward()  # the recomputation (checkpointing) under the same kernels
    return sum(seen.values())


@pytest.mark.parametrize("variant", ["plain", "glu", "normformer"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_planned_activations_match_what_autograd_saves(variant, autocast, kernel, monkeypatch):
    from bench.memory_plan import activations, model_params

    if variant == "normformer" and autocast:
        pytest.skip("CPU autocast runs layer_norm in bf16 (CUDA's, which the plan counts, in fp32)")
    shape = PriorShape(text_vocab=300, image_vocab=64, text_len=16, grid=8, dim=64, depth=3, heads=4,
                       attention="sparse", conv_kernel=3, glu=variant == "glu",
                       normformer=variant == "normformer")
    params, _ = model_params(shape)
    a = 2 if autocast else 4
    act = activations(shape, batch=4, a=a, impl="dense", kernel=kernel,
                      cast_params=sum(p.numel for p in params if p.cast))
    # Autograd saves the weights' bf16 copies (the biases' live only in the autocast cache).
    copies = a * sum(p.numel for p in params if p.matmul) if autocast else 0
    for checkpointing, planned in ((False, act["blocks"] + act["outside"] + copies),
                                   (True, act["block_inputs"] + act["outside"])):
        got = _saved_bytes(shape, batch=4, autocast=autocast, kernel=kernel, checkpointing=checkpointing,
                           monkeypatch=monkeypatch)
        assert planned == pytest.approx(got, rel=0.01), (checkpointing, planned, got)


def test_the_plan_counts_powersgd_ema_and_checkpointing_where_configured():
    from bench.memory_plan import plan_memory

    cfg = load_config("cluster", ["prior.grad_comm.method=powersgd", "prior.ema_decay=0.999",
                                  "prior.activation_checkpointing=true"])
    plan = plan_memory(cfg, gpus_per_node=8)
    rows = {r["key"]: r for r in plan["rows"]}
    assert plan["nodes"] == 4 and plan["layout"]["ranks_per_node"] == 8
    assert {"powersgd_state", "powersgd_step", "ema", "whole_gather"} <= set(rows)
    assert "params_hpz" not in rows
    assert rows["act_ckpt"]["phase"] == "fwd_bwd" and rows["act_no_ckpt"]["phase"] == "info"
    assert rows["ema"]["bytes"] == pytest.approx(rows["adam"]["bytes"] / 2)  # fp32 per shard element
    assert plan["peak_ckpt"] < plan["peak_no_ckpt"]
    assert plan["flops"]["micro_batch"] == pytest.approx(
        plan["flops"]["matmul"] + plan["flops"]["attention"] + plan["flops"]["recompute"])


@pytest.mark.parametrize("config", ["debug", "jobs/configs/cluster.yaml"])
def test_the_script_prints_one_table_with_every_row(config):
    # The debug preset's one-worker prior runs stage 0; the plan's ZeRO-3 rows are what is checked.
    zero3 = ["--set", "prior.zero_stage=3"] if config == "debug" else []
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_plan.py"), "--config", config, *zero3],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for label in ("parameters: ZeRO-3 shard", "parameters: persistent whole", "gradients: fp32 shard",
                  "optimizer: AdamW exp_avg + exp_avg_sq", "optimizer: fp32 master copy",
                  "comm: ZeRO-3 reduce bucket", "comm: gathered fp32 weights",
                  "activations: saved, no checkpointing", "activations: saved, per-block checkpointing",
                  "total peak, no checkpointing", "total peak, per-block checkpointing", "this config",
                  "step FLOPs", "per optimizer step per GPU"):
        assert label in text, label
    assert "parameters: hpZ secondary shard" not in text  # neither preset uses ZeRO++
    assert ("PowerSGD" in text) == (config != "debug")  # the cluster's method between nodes
    assert "FITS on a 80 GiB GPU" in text


def test_a_layout_that_does_not_split_into_nodes_names_the_field():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_plan.py"), "--config", "debug",
                          "--set", "prior.num_workers=12", "--gpus-per-node", "8"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "prior.num_workers=12" in out.stderr
