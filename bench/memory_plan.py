"""Per-GPU memory and step FLOPs of training the prior, planned from a tessera config.

    python bench/memory_plan.py --config jobs/configs/cluster.yaml [--set prior.dim=3968 ...]
        [--gpus-per-node 8] [--gpu-memory-gb 80] [--sdpa-kernel fused|math] [--zero KEY=VALUE] [--json]

Nothing is allocated: the shape comes from the config as the prior stage derives it
(training.prior_parts.prior_shape; vocabularies and grid from `tokenizer.vocab_size` and the dVAE
size, as jobs/encode.py writes them into the token manifest), the parameters are counted on a
`meta`-device Prior, the DeepSpeed JSON is the one PriorStage.deepspeed_config builds, and
DeepSpeed's own ZeRO config model fills in its defaults (bucket sizes, thresholds). Sizes are
bytes per rank (GPU) unless said otherwise; 1 GiB = 2^30 bytes.

Symbols: W ranks, k ranks per node; n_p the elements of parameter p; B micro-batch; T caption and
N = G² image positions, L = T + N; D width, H heads, F = ff_mult·D; depth layers; Vt, Vi the
vocabularies; a the bytes of the autocast dtype (2 for bf16/fp16, 4 without autocast).

Model states (ZeRO-3; tessera's engine is fp32 and autocast gives the mixed precision, so the
parameters are fp32):
    parameters    Σ⌈n_p/S⌉·4, S the shard group: W, or k under grad_comm powersgd across nodes
                  (GradComm.partition shards within each node)
    persistent    Σ n_p·4 over n_p ≤ stage3_param_persistence_threshold: kept whole after use
    hpZ copy      Σ (n_p padded to W)/k · 4 over the non-persistent parameters (grad_comm zeropp
                  with hierarchical_partitioning): made as forward and backward release a weight,
                  dropped at the optimizer step
    gradients     Σ⌈n_p/S⌉·4 (DeepSpeed's flat fp32 gradient partition)
    AdamW         2·Σ⌈n_p/S⌉·4 (exp_avg, exp_avg_sq)
    master copy   Σ⌈n_p/S⌉·4: DeepSpeed clones the fp32 shard (its aliasing for an fp32 engine
                  compares a torch.device with a str, which is never equal)
    EMA           Σ⌈n_p/S⌉·4: ParameterEMA averages the slice each rank holds; evaluation builds a
                  plain fp32 model and loads the gathered average into it (2·4·Σ n_p, transient)
Communication buffers:
    reduce bucket reduce_bucket_size·4 (ZeRO-3 contiguous_gradients: allocated once)
    gathered      fp32 weights whole during forward/backward: ZeRO-3 keeps a module after its forward
                  use while the parameters used before its next use (≈ 2·the parameters after it;
                  3· with recomputation) are under stage3_max_reuse_distance, plus the root module's
                  own tensors, plus a prefetch of ≤ stage3_prefetch_bucket_size (steady state: from
                  the second step, once DeepSpeed has traced the module order)
    PowerSGD      per compressed shard (rows r, cols c, rank q): error feedback r·c·4 and Q c·q·4;
                  at the boundary the (r, c) matrices of all compressed shards, P and Q again
Activations, bytes per token and block, saved for backward (no checkpointing):
    2·(4D + 8)           the two LayerNorm inputs (fp32 residual stream) with mean and rstd
    2·a·D                the qkv and ff.inp inputs (autocast copies)
    3·a·D                q, k, v (the qkv output)
    a·D + 4H             attention output and logsumexp, fused SDPA kernels (flash /
                         memory-efficient on the dense path; the out projection reads a view);
                         flex adds a·D (its output is copied for the out projection); the math
                         kernel instead keeps q, k, v upcast (12·D), the probabilities 4·H·L, and a·D
    2·a·F                GELU input and output (GEGLU: 4·a·F)
    normformer adds      (4D + 8) + (4F + 8)
  plus per layer, dense path, fused kernels: the float mask bias L²·a
  plus per sample: the final LayerNorm (4D + 8)·L, the heads' fp32 inputs 4D·(T − 1 + N), their
  log-softmax outputs 4·(Vt·(T − 1) + Vi·N) and the fp32 logits alive with them (the same again),
  ids and masks 9T + 8N.
  Per-block checkpointing keeps each block's input (4D per token and block), plus one block's
  activations recomputed in backward.
  Under autocast every block weight's a-byte copy (weights and biases) stays alive to the end of the
  forward pass, gathered whole: autograd saves it for backward, and torch's autocast cache holds it
  even where checkpointing drops it (deepspeedai/DeepSpeed#7577).
The peak is the states plus the largest of: forward/backward (gathered + activations), the
accumulation boundary (PowerSGD's matrices, or the optimizer's flat fp32 gradient copy of a
sub-group), and the largest parameter gathered whole (checkpoints of an EMA or of node-sharded
weights, replica verification: one parameter at a time). Not counted: the allocator's
fragmentation, the CUDA/NCCL context (--reserve-gb), backward's activation gradients (a few
B·L·D·4), the all-gather staging under qwZ.

Step FLOPs: 6·B·L·(block matmul weights) + 6·B·D·(Vt·(T − 1) + Vi·N) for the matrix products,
plus 12·B·D·(query-key pairs) per layer for QKᵀ and AV: L² on the dense path (the mask is applied
after), the FlexAttention blocks (128 × 128) holding an allowed pair on the flex path.
Recomputation adds one forward of the blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tessera.config import ConfigError, load_config, parse_override  # noqa: E402
from tessera.models.attention import MaskSpec, dense_mask, layer_patterns  # noqa: E402
from tessera.models.prior import Prior, PriorShape  # noqa: E402

GiB = 2**30
FLEX_BLOCK = 128  # FlexAttention's default block: a block holding any allowed pair is computed whole
FP32 = 4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    world: int
    ranks_per_node: int
    method: str  # prior.grad_comm.method

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def shard_group(self) -> int:
        """Ranks each parameter is sharded over: a node under powersgd across nodes, else all."""
        return self.ranks_per_node if self.method == "powersgd" and self.nodes > 1 else self.world


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    module: str  # the module holding it directly ('' = the Prior itself)
    cols: int | None  # columns of its matrix when PowerSGD would compress it
    cast: bool  # a Linear's weight or bias inside a block: autocast makes an a-byte copy
    matmul: bool  # a block Linear's weight (its FLOPs are 6·tokens·n)


@dataclass
class Row:
    key: str
    label: str
    bytes: float
    how: str
    phase: str  # "state" (always held), "fwd_bwd", "boundary", "gather", "info" (not in a total)


def planned_shape(cfg) -> PriorShape:
    """The prior's shape as the stage builds it, with the manifest encode would write for this
    config (the tokenizer's configured vocabulary: a trained BPE may hold a few fewer)."""
    from tessera.training.dvae_loop import dvae_shape
    from tessera.training.prior_parts import prior_shape

    dvae = dvae_shape(cfg)
    return prior_shape(cfg, {"text_vocab_size": cfg.tokenizer.vocab_size,
                             "num_image_tokens": dvae.num_tokens, "grid_size": dvae.grid_size})


def plan_layout(cfg, *, gpus_per_node: int) -> Layout:
    p = cfg.prior
    world = p.num_workers
    per_node = p.grad_comm.ranks_per_node or min(gpus_per_node, world)
    if world % per_node:
        raise ConfigError(f"prior.num_workers={world} does not split into nodes of {per_node} ranks "
                          "(prior.grad_comm.ranks_per_node, else --gpus-per-node)")
    return Layout(world, per_node, p.grad_comm.method)


def deepspeed_config(cfg, layout: Layout) -> dict:
    """PriorStage.deepspeed_config for this layout, without a process group."""
    from tessera.parallel.topology import NodeLayout
    from tessera.training.grad_comm import GradComm
    from tessera.training.prior_loop import PriorStage

    stage = PriorStage(cfg, io=None)
    # GradComm's deepspeed_keys() reads only cfg, method and layout; its __init__ is a collective.
    comm = object.__new__(GradComm)
    comm.cfg, comm.method = cfg.prior.grad_comm, cfg.prior.grad_comm.method
    comm.layout = NodeLayout.uniform(layout.world, layout.ranks_per_node)
    stage.comm = comm
    return stage.deepspeed_config(world_size=layout.world)


def zero_settings(ds: dict):
    """DeepSpeed's ZeRO config model on tessera's dict: every default as the engine sees it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only the config model is read
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))


def model_params(shape: PriorShape) -> tuple[list[Param], list[str]]:
    """Every parameter (named_parameters order) and the leaf modules in forward order (the
    registration order: embeddings, blocks, final norm, heads)."""
    from tessera.training.grad_comm import compressible_weights

    with torch.device("meta"):
        model = Prior(shape, attention_impl="dense")
    cols = compressible_weights(model)
    owner, linear = {}, set()
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner[id(p)] = mname
            if isinstance(module, torch.nn.Linear) and mname.startswith("blocks."):
                linear.add(id(p))
    params = [Param(name, p.numel(), owner[id(p)], cols.get(id(p)), id(p) in linear,
                    id(p) in linear and p.ndim == 2)
              for name, p in model.named_parameters()]
    leaves = [m for m, mod in model.named_modules() if m and not list(mod.children())
              and list(mod.parameters(recurse=False))]
    return params, leaves


def attention_pairs(shape: PriorShape, impl: str) -> tuple[int, int]:
    """(query-key pairs computed, pairs the masks allow) summed over layers."""
    L, computed, allowed = shape.seq_len, 0, 0
    for pattern in layer_patterns(shape.depth, shape.attention):
        mask = dense_mask(MaskSpec(shape.text_len, shape.grid, pattern, shape.conv_kernel))
        allowed += int(mask.sum())
        if impl == "flex":
            nb = ceil_div(L, FLEX_BLOCK)
            padded = torch.zeros(nb * FLEX_BLOCK, nb * FLEX_BLOCK, dtype=torch.bool)
            padded[:L, :L] = mask
            blocks = padded.view(nb, FLEX_BLOCK, nb, FLEX_BLOCK).any(3).any(1)
            edge = [min(FLEX_BLOCK, L - i * FLEX_BLOCK) for i in range(nb)]
            computed += sum(edge[i] * edge[j] for i, j in blocks.nonzero().tolist())
        else:
            computed += L * L
    return computed, allowed


def activations(shape: PriorShape, *, batch: int, a: int, impl: str, kernel: str,
                cast_params: int) -> dict[str, float]:
    """Bytes of activations on one rank (formulas in the module docstring)."""
    s, B = shape, batch
    D, H, L, T, N = s.dim, s.heads, s.seq_len, s.text_len, s.num_image_tokens
    F = s.ff_mult * D
    per_token = 2 * (4 * D + 8) + 2 * a * D + (4 * a * F if s.glu else 2 * a * F)
    if kernel == "math":
        per_token += 12 * D + 4 * H * L + a * D
    else:
        per_token += 3 * a * D + a * D + 4 * H + (a * D if impl == "flex" else 0)
    if s.normformer:
        per_token += (4 * D + 8) + (4 * F + 8)
    per_layer = L * L * a if impl == "dense" and kernel == "fused" else 0
    one_block = B * L * per_token + per_layer
    head_positions = T - 1 + N
    vocab_positions = s.text_vocab * (T - 1) + s.image_vocab * N
    outside = B * ((4 * D + 8) * L + 4 * D * head_positions + 4 * vocab_positions + 9 * T + 8 * N)
    return {
        "block": one_block,
        "blocks": s.depth * one_block,
        "block_inputs": s.depth * B * L * 4 * D,
        "outside": outside,
        "logits": B * 4 * vocab_positions,  # the fp32 logits (or their gradient) beside the log-probs
        "weight_copies": a * cast_params if a < FP32 else 0,
        "block_weight_copy": a * cast_params / s.depth if a < FP32 else 0,
        "math_probabilities": s.depth * B * H * L * L * 4,
    }


def gathered_elements(params: list[Param], leaves: list[str], zero, *, recompute: bool) -> int:
    """Non-persistent parameter elements held whole at the forward/backward turn (steady state)."""
    persistent = persistent_names(params, zero)
    by_module: dict[str, int] = {}
    for p in params:
        if p.name not in persistent:
            by_module[p.module] = by_module.get(p.module, 0) + p.numel
    root = by_module.pop("", 0)  # the Prior's own tensors: in use for its whole forward and backward
    uses = 3 if recompute else 2
    kept, after = 0, 0
    for m in reversed(leaves):
        n = by_module.get(m, 0)
        if uses * after < zero.max_reuse_distance:
            kept += n
        after += n
    rest = sum(by_module.values()) - kept
    prefetch = min(rest, zero.prefetch_bucket_size, max(0, zero.max_live_parameters - kept - root))
    return root + kept + prefetch


def persistent_names(params: list[Param], zero) -> set[str]:
    """DeepSpeed's mark_persistent_parameters: small parameters stay whole on every rank."""
    out, total = set(), 0
    for p in params:
        if p.numel + total > zero.model_persistence_threshold:
            continue
        if p.numel <= zero.param_persistence_threshold:
            out.add(p.name)
            total += p.numel
    return out


def powersgd_elements(params: list[Param], shard: int, cfg) -> dict[str, int]:
    """PowerSGD's buffers for one rank's gradient shards, as GradComm.attach plans them."""
    from tessera.parallel.powersgd import PowerSGD, TensorSpec, matrix_view

    c = cfg.prior.grad_comm.powersgd
    specs = []
    for p in params:
        numel = ceil_div(p.numel, shard)
        specs.append(TensorSpec(numel, matrix_view(numel, p.cols) if p.cols else None))
    plan = PowerSGD(specs, rank=c.rank)
    mats = [specs[i].matrix for i in plan.compressed]
    # Q persists unless drawn afresh every step (q_update "resample"; warm_start false before it).
    q_mode = getattr(c, "q_update", None) or ("warm_start" if getattr(c, "warm_start", True) else "resample")
    matrix = sum(r * m for r, m in mats)
    q = sum(m * c.rank for _, m in mats)
    return {"errors": matrix if c.error_feedback else 0, "q": q if q_mode != "resample" else 0,
            "step": matrix + plan.plan().sent_elements, "compressed": len(mats), "dense": len(plan.dense)}


def plan_memory(cfg, *, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0, kernel: str = "fused",
                reserve_gb: float = 2.0, zero_overrides: dict | None = None, origin: str = "") -> dict:
    """The plan: rows, totals and step FLOPs, as plain data (printed by format_plan).
    `zero_overrides`: DeepSpeed zero_optimization keys tessera's builder leaves at their defaults."""
    p = cfg.prior
    shape = planned_shape(cfg)
    layout = plan_layout(cfg, gpus_per_node=gpus_per_node)
    ds = deepspeed_config(cfg, layout)
    ds["zero_optimization"].update(zero_overrides or {})
    zero = zero_settings(ds)
    params, leaves = model_params(shape)
    stage, S, W = zero.stage, layout.shard_group, layout.world
    total = sum(q.numel for q in params)
    engine = 2 if ("bf16" in ds or "fp16" in ds) else FP32
    autocast = p.precision if p.precision != "auto" else ("bf16" if p.use_gpu else "fp32")
    a = 2 if autocast in ("bf16", "fp16") else FP32
    impl = p.attention_impl if p.attention_impl != "auto" else ("flex" if p.use_gpu else "dense")
    ckpt = bool(getattr(p, "activation_checkpointing", False))
    gc = p.grad_comm
    rows: list[Row] = []

    def add(key, label, nbytes, how, phase="state"):
        rows.append(Row(key, label, float(nbytes), how, phase))

    shard = sum(ceil_div(q.numel, S) for q in params) if stage >= 1 else total
    if stage == 3:
        add("params", f"parameters: ZeRO-3 shard ({S} ranks)", engine * shard, f"Σ⌈n/{S}⌉·{engine} B")
        keep = persistent_names(params, zero)
        add("params_persistent", f"parameters: persistent whole (n ≤ {zero.param_persistence_threshold:.0e})",
            engine * sum(q.numel for q in params if q.name in keep), f"{len(keep)} tensors kept whole")
        if zero.zero_hpz_partition_size > 1:  # made as a weight is released, dropped at the step
            hpz = zero.zero_hpz_partition_size
            add("params_hpz", f"parameters: hpZ secondary shards ({hpz} per node)",
                engine * sum(ceil_div(q.numel, W) * W // hpz for q in params if q.name not in keep),
                f"Σ(n padded to {W})/{hpz}·4 B, non-persistent", "fwd_bwd")
    else:
        add("params", "parameters: whole on every rank", engine * total, f"N·{engine} B")
    grad_elems = shard if stage >= 2 else total
    add("grads", "gradients: fp32" + (" shard" if stage >= 2 else ", whole"), FP32 * grad_elems,
        f"Σ⌈n/{S}⌉·4 B" if stage >= 2 else "N·4 B")
    opt_elems = shard if stage >= 1 else total
    add("adam", "optimizer: AdamW exp_avg + exp_avg_sq", 2 * FP32 * opt_elems, "2·4 B per shard element")
    # Every ZeRO stage clones the shard into an fp32 master partition, even from an fp32 engine: the
    # aliasing ZeRO-3 has for that case compares a torch.device with a str (never equal).
    master = stage >= 1
    add("master", "optimizer: fp32 master copy of the shard", FP32 * opt_elems if master else 0,
        "a clone, fp32 engine or not (DeepSpeed 0.19)" if master else "none (no ZeRO)")
    if p.ema_decay:  # ParameterEMA averages the slice of each parameter this rank holds
        ema_group = S if stage == 3 else W
        add("ema", "EMA: fp32 average of this rank's slices",
            FP32 * sum(ceil_div(q.numel, ema_group) for q in params), f"Σ⌈n/{ema_group}⌉·4 B")
    if stage == 3:
        add("reduce_bucket", "comm: ZeRO-3 reduce bucket", FP32 * zero.reduce_bucket_size,
            f"reduce_bucket_size {zero.reduce_bucket_size:.0e}·4 B")
        live = {r: gathered_elements(params, leaves, zero, recompute=r) for r in (False, True)}
        add("gathered", "comm: gathered fp32 weights (reuse + prefetch)", engine * live[ckpt],
            f"{live[ckpt] / 1e6:.0f} M elements at the forward/backward turn", "fwd_bwd")
    elif stage in (1, 2):
        buffers = 2 if zero.overlap_comm else 1
        add("reduce_bucket", "comm: reduce buckets", buffers * FP32 * min(zero.reduce_bucket_size, total),
            f"{buffers} × min(reduce_bucket_size, N)·4 B")
    if gc.method == "powersgd" and layout.nodes > 1:
        ps = powersgd_elements(params, S, cfg)
        add("powersgd_state", "comm: PowerSGD error feedback + Q", FP32 * (ps["errors"] + ps["q"]),
            f"{ps['compressed']} compressed shards; {ps['dense']} sent whole")
        add("powersgd_step", "comm: PowerSGD matrices, P, Q at the boundary", FP32 * ps["step"],
            "all compressed (rows, cols) + both all-reduce buffers", "boundary")
    if stage == 3:
        add("step_grad_copy", "optimizer step: flat fp32 gradient of a sub-group",
            FP32 * min(shard, zero.sub_group_size), "min(shard, sub_group_size)·4 B", "boundary")

    cast_params = sum(q.numel for q in params if q.cast)
    act = activations(shape, batch=p.micro_batch, a=a, impl=impl, kernel=kernel, cast_params=cast_params)
    add("weight_copies", f"activations: {autocast} copies of block weights", act["weight_copies"],
        f"{a} B × {cast_params / 1e6:.0f} M block Linear elements, whole" if a < FP32 else "no autocast",
        "fwd_bwd")
    heads = act["outside"] + act["logits"]
    no_ckpt = act["blocks"] + heads
    # Checkpointed: the end of the forward pass (heads' tensors, every weight copy in the autocast
    # cache) or the first recomputed block in backward (its activations and weight copy).
    recomputed = act["block"] + act["block_weight_copy"] - act["weight_copies"]
    with_ckpt = act["block_inputs"] + max(heads, recomputed)
    add("act_no_ckpt", "activations: saved, no checkpointing", no_ckpt,
        f"{act['block'] / GiB:.3f} GiB per block × {shape.depth} + heads {heads / GiB:.2f}",
        "fwd_bwd" if not ckpt else "info")
    add("act_ckpt", "activations: saved, per-block checkpointing", with_ckpt,
        "block inputs 4·D·B·L each + max(heads, one recomputed block)", "fwd_bwd" if ckpt else "info")
    if kernel == "fused":
        add("math_note", "  (math SDPA would add probabilities)", act["math_probabilities"],
            "4·B·H·L² per layer, not in the totals", "info")
    # Checkpoints (EMA, node-sharded weights) and the replica check gather one parameter at a time;
    # evaluation runs the EMA inside the engine's own partitions (ParameterEMA.swapped_into).
    if p.ema_decay or gc.verify_every or (gc.method == "powersgd" and layout.nodes > 1):
        largest = max(q.numel for q in params)
        add("whole_gather", "largest parameter gathered whole (checkpoint)", FP32 * largest,
            "max n·4 B: checkpoints gather one parameter at a time", "gather")

    def peak(checkpointing: bool) -> float:
        phases = {"fwd_bwd": 0.0, "boundary": 0.0, "gather": 0.0}
        state = 0.0
        for r in rows:
            if r.key in ("act_no_ckpt", "act_ckpt"):
                if (r.key == "act_ckpt") == checkpointing:
                    phases["fwd_bwd"] += r.bytes
            elif r.key == "gathered":  # recomputation lengthens the reuse distances
                phases["fwd_bwd"] += engine * live[checkpointing]
            elif r.phase == "state":
                state += r.bytes
            elif r.phase == "boundary":
                phases["boundary"] = max(phases["boundary"], r.bytes)
            elif r.phase in phases:
                phases[r.phase] += r.bytes
        return state + max(phases.values())

    computed, allowed = attention_pairs(shape, impl)
    B, L, D = p.micro_batch, shape.seq_len, shape.dim
    block_matmul = sum(q.numel for q in params if q.matmul)
    matmul = 6 * B * L * block_matmul + 6 * B * D * (shape.text_vocab * (shape.text_len - 1)
                                                     + shape.image_vocab * shape.num_image_tokens)
    attention = 12 * B * D * computed
    recompute = 2 * B * L * block_matmul + 4 * B * D * computed
    micro = matmul + attention + (recompute if ckpt else 0)
    return {
        "origin": origin, "shape": shape.to_dict(), "parameters": total, "layout": asdict(layout),
        "nodes": layout.nodes, "zero_stage": stage, "engine_dtype": "fp32" if engine == FP32 else "16-bit",
        "autocast": autocast, "attention_impl": impl, "sdpa_kernel": kernel, "activation_checkpointing": ckpt,
        "micro_batch": B, "grad_accum": p.grad_accum, "global_batch": ds["train_batch_size"],
        "deepspeed": ds, "zero": {k: getattr(zero, k) for k in (
            "reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold",
            "max_live_parameters", "max_reuse_distance", "sub_group_size", "zero_hpz_partition_size",
            "zero_quantized_weights", "zero_quantized_gradients")},
        "rows": [asdict(r) for r in rows],
        "peak_no_ckpt": peak(False), "peak_ckpt": peak(True),
        "gpu_memory_gb": gpu_memory_gb, "reserve_gb": reserve_gb,
        "flops": {"matmul": matmul, "attention": attention, "recompute": recompute,
                  "micro_batch": micro, "step_per_gpu": micro * p.grad_accum,
                  "step_global": micro * p.grad_accum * layout.world, "six_n_tokens": 6 * total * B * L,
                  "pairs_computed": computed, "pairs_allowed": allowed},
    }


def format_plan(plan: dict) -> str:
    s, lay, z = plan["shape"], plan["layout"], plan["zero"]
    comm = plan["deepspeed"]["zero_optimization"]
    zpp = [name for name, key in (("hpZ", "zero_hpz_partition_size"), ("qwZ", "zero_quantized_weights"),
                                  ("qgZ", "zero_quantized_gradients")) if comm.get(key)]
    method = lay["method"] + (f" ({', '.join(zpp)})" if zpp else "")
    lines = [
        f"prior memory plan: {plan['origin']}",
        f"  model   {plan['parameters'] / 1e9:.3f} B parameters: dim {s['dim']}, depth {s['depth']}, "
        f"heads {s['heads']}, ff x{s['ff_mult']}{', glu' if s['glu'] else ''}"
        f"{', normformer' if s['normformer'] else ''}, attention {s['attention']}; text {s['text_len']} "
        f"(vocab {s['text_vocab']}) + image {s['grid']}x{s['grid']} (vocab {s['image_vocab']}) positions",
        f"  layout  {lay['world']} ranks = {plan['nodes']} nodes x {lay['ranks_per_node']}; "
        f"ZeRO-{plan['zero_stage']}, engine {plan['engine_dtype']}, autocast {plan['autocast']}; "
        f"micro-batch {plan['micro_batch']} x accumulation {plan['grad_accum']} x {lay['world']} = "
        f"{plan['global_batch']} per update",
        f"  comm    grad_comm {method}; reduce bucket {z['reduce_bucket_size']:.0e}, prefetch "
        f"{z['prefetch_bucket_size']:.0e}, persistence <= {z['param_persistence_threshold']:.0e}, "
        f"reuse distance {z['max_reuse_distance']:.0e}, max live {z['max_live_parameters']:.0e}",
        f"  path    attention {plan['attention_impl']} with {plan['sdpa_kernel']} SDPA kernels; "
        f"activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'} in the config",
        "",
        f"{'component':<52}{'GiB/GPU':>10}  how",
    ]
    marks = {"state": "", "fwd_bwd": "  [forward/backward]", "boundary": "  [boundary, transient]",
             "gather": "  [transient]", "info": "  [not in this config's total]"}
    for r in plan["rows"]:
        lines.append(f"{r['label']:<52}{r['bytes'] / GiB:>10.3f}  {r['how']}{marks[r['phase']]}")
    usable = plan["gpu_memory_gb"] - plan["reserve_gb"]
    for key, label in (("peak_no_ckpt", "total peak, no checkpointing"),
                       ("peak_ckpt", "total peak, per-block checkpointing")):
        gib = plan[key] / GiB
        verdict = "fits" if gib <= usable else "DOES NOT FIT"
        lines.append(f"{label:<52}{gib:>10.3f}  {verdict} in {plan['gpu_memory_gb']:g} GiB "
                     f"({plan['reserve_gb']:g} kept for CUDA/NCCL)")
    which = "peak_ckpt" if plan["activation_checkpointing"] else "peak_no_ckpt"
    fits = plan[which] / GiB <= usable
    lines.append(f"{'this config':<52}{plan[which] / GiB:>10.3f}  "
                 f"{'FITS' if fits else 'DOES NOT FIT'} on a {plan['gpu_memory_gb']:g} GiB GPU")
    f = plan["flops"]
    lines += [
        "",
        f"{'step FLOPs':<52}{'TFLOP':>10}",
        f"{'matrix products, per micro-batch per GPU':<52}{f['matmul'] / 1e12:>10.2f}  "
        f"6·B·L·(block weights) + heads",
        f"{'attention QKᵀ and AV, per micro-batch per GPU':<52}{f['attention'] / 1e12:>10.2f}  "
        f"12·B·D·{f['pairs_computed'] / 1e6:.1f} M pairs "
        f"({f['pairs_allowed'] / 1e6:.1f} M allowed by the masks)",
        f"{'recomputation (checkpointing)':<52}{f['recompute'] / 1e12:>10.2f}  one more forward of the blocks"
        f"{'' if plan['activation_checkpointing'] else ' (not in this config)'}",
        f"{'per optimizer step per GPU':<52}{f['step_per_gpu'] / 1e12:>10.2f}  "
        f"x {plan['grad_accum']} micro-batches",
        f"{'per optimizer step, all GPUs':<52}{f['step_global'] / 1e15:>10.2f}  PFLOP "
        f"(6·N·tokens alone: {f['six_n_tokens'] * plan['grad_accum'] * lay['world'] / 1e15:.2f} PFLOP)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="debug", help="YAML path or preset name (debug, single_gpu, cluster)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                    help="override a config field, e.g. --set prior.dim=3968 (repeatable)")
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="ranks per node when prior.grad_comm.ranks_per_node is null (default 8)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    ap.add_argument("--reserve-gb", type=float, default=2.0,
                    help="GiB kept for the CUDA context, NCCL and the allocator (default 2)")
    ap.add_argument("--sdpa-kernel", choices=["fused", "math"], default="fused",
                    help="fused (flash / memory-efficient / flex: no L×L per head) "
                         "or math (the probabilities kept)")
    ap.add_argument("--zero", dest="zero", action="append", default=[], metavar="KEY=VALUE",
                    help="a DeepSpeed zero_optimization key tessera leaves at its default, e.g. "
                         "--zero stage3_max_reuse_distance=1e8 (repeatable; a what-if, not what jobs run)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    args = ap.parse_args(argv)
    if args.gpus_per_node < 1:
        ap.error("--gpus-per-node must be >= 1")
    try:
        zero = {}
        for text in args.zero:
            keys, value = parse_override(text)
            try:  # YAML reads 1e8 as a string; DeepSpeed's sizes are integers
                number = float(value) if isinstance(value, str | float) else None
            except ValueError:
                number = None
            zero[".".join(keys)] = int(number) if number is not None and number.is_integer() else value
        cfg = load_config(args.config, args.overrides)
        plan = plan_memory(cfg, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                           kernel=args.sdpa_kernel, reserve_gb=args.reserve_gb, zero_overrides=zero,
                           origin=" ".join([args.config, *(f"--set {o}" for o in args.overrides),
                                            *(f"--zero {z}" for z in args.zero)]))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
