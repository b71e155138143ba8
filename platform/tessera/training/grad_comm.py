"""Gradient communication between nodes, as configured (`prior.grad_comm`), on one rank.

    none      DeepSpeed's ZeRO as configured: parameters sharded over every rank, gradients
              reduce-scattered over every rank, uncompressed.
    powersgd  the paper's scheme on ZeRO-3: parameters sharded within each node only
              (`deepspeed.zero.Init(module=…, data_parallel_group=<node group>)`), so ZeRO-3's own
              reduce-scatter averages gradients inside the node, uncompressed; then, at each
              accumulation boundary, each rank's gradient partition is averaged with the ranks
              holding the same partition on the other nodes by PowerSGD with error feedback
              (`deepspeed.utils.safe_get_local_grad` / `safe_set_local_grad` read and write the
              partition; DeepSpeed then clips and steps as usual). As the paper's appendix E: "We use
              PowerSGD ... to compress the gradients with respect to all parameters except the
              embeddings, unembeddings, gains, and biases" — those travel whole, in fp32, in the same
              all-reduce as the P factors (`parameter_roles`).
    zeropp    DeepSpeed ZeRO++: hierarchical partitioning with the secondary group = a node
              (`zero_hpz_partition_size`), and quantized weights / gradients where the hardware
              has DeepSpeed's CUDA kernels (refused at config load otherwise).

Every setting books the bytes that cross node boundaries (tessera.parallel.comm_ledger) and
reports them per optimizer step.
"""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path

import torch
from torch import nn

from tessera.parallel import dist
from tessera.parallel.comm_ledger import CommLedger
from tessera.parallel.powersgd import PowerSGD, TensorSpec, matrix_view
from tessera.parallel.topology import NodeLayout, make_process_groups
from tessera.training.checkpoint import GATHERED_WEIGHTS  # rank 0's whole weights, node-sharded runs

log = logging.getLogger("tessera.grad_comm")


def this_node_id() -> str:
    """Ray's node id inside a Ray worker, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def node_layout(ranks_per_node: int | None) -> NodeLayout:
    """Declared (`ranks_per_node`: consecutive ranks share a node), or detected from every rank's
    node id. A collective when detected: call it on every rank."""
    world = dist.world_size()
    if ranks_per_node is not None:
        return NodeLayout.uniform(world, ranks_per_node)
    if world == 1:
        return NodeLayout((0,))
    ids: list = [None] * world
    torch.distributed.all_gather_object(ids, this_node_id())
    return NodeLayout.from_node_ids(ids)


# The prior's unembeddings: its output heads (tessera.models.prior.Prior), by module name.
PRIOR_UNEMBEDDINGS = ("text_head", "image_head")
UNCOMPRESSED_ROLES = ("embedding", "unembedding", "gain", "bias")


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The parameter's own shape, also once ZeRO-3 has partitioned it (p.shape is then (0,))."""
    return tuple(getattr(p, "ds_shape", p.shape))


def parameter_roles(model: nn.Module, *, unembeddings=PRIOR_UNEMBEDDINGS) -> dict[str, str]:
    """Qualified parameter name -> its role in the paper's terms: "matrix" (compressed), or one of
    UNCOMPRESSED_ROLES. Decided from the module tree, the names and the full shapes alone, so the
    answer is the same before and after ZeRO-3 partitions the parameters (same objects, same
    names; `ds_shape` keeps the shape).

    The first rule that applies decides:
        weights of an nn.Embedding                  embedding
        1-D parameters                              bias (named *bias), else gain
        in a module named in `unembeddings`         unembedding (the prior's output heads)
        Linear / convolution weights                matrix
        any other parameter                         embedding (the prior's padding, position, row
                                                    and column tables)

    ValueError when a module named in `unembeddings` is missing: a renamed head would otherwise be
    compressed without a word."""
    roles: dict[str, str] = {}
    found: set[str] = set()
    for module_name, module in model.named_modules():
        heads = [part for part in module_name.split(".") if part in unembeddings]  # a head or inside one
        found.update(heads)
        for name, p in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.Embedding):
                role = "embedding"
            elif len(full_shape(p)) == 1:
                role = "bias" if name.endswith("bias") else "gain"
            elif heads:
                role = "unembedding"
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name == "weight":
                role = "matrix"
            else:
                role = "embedding"
            roles[qualified] = role
    missing = [u for u in unembeddings if u not in found]
    if missing:
        raise ValueError(f"grad_comm: the model has no module named {missing}; the unembeddings "
                         f"{list(unembeddings)} (the prior's output heads) must travel uncompressed, "
                         "so update PRIOR_UNEMBEDDINGS if the heads were renamed")
    return roles


def compressible_weights(model: nn.Module, *, unembeddings=PRIOR_UNEMBEDDINGS) -> dict[int, int]:
    """id(weight) -> columns of its matrix, for every parameter PowerSGD compresses (role "matrix")."""
    roles = parameter_roles(model, unembeddings=unembeddings)
    return {id(p): math.prod(full_shape(p)[1:]) for name, p in model.named_parameters()
            if roles[name] == "matrix"}


def plan_tensors(model: nn.Module, *, unembeddings=PRIOR_UNEMBEDDINGS
                 ) -> list[tuple[str, nn.Parameter, TensorSpec]]:
    """(name, parameter, spec) for every trainable parameter, in named_parameters() order: the list
    PowerSGD averages. Each spec holds this rank's partition (`ds_tensor` under ZeRO-3, else the
    whole tensor); a "matrix" partition is viewed as rows of the weight's columns (a ZeRO shard of
    a weight is a block of its rows), every other role is sent uncompressed."""
    roles = parameter_roles(model, unembeddings=unembeddings)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        numel = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        matrix = matrix_view(numel, math.prod(full_shape(p)[1:])) if roles[name] == "matrix" else None
        out.append((name, p, TensorSpec(numel, matrix)))
    return out


class GradComm:
    def __init__(self, cfg, *, zero_stage: int, use_gpu: bool):
        self.cfg = cfg
        self.method = cfg.method
        self.layout = node_layout(cfg.ranks_per_node)
        self.rank = dist.rank()
        if self.method == "powersgd":
            if zero_stage != 3:
                raise ValueError("grad_comm.method powersgd builds on ZeRO-3's node-sharded partitions: "
                                 "set zero_stage: 3")
            if self.layout.num_nodes > 1:
                _ = self.layout.ranks_per_node  # the same on every node, or a clear error
        if self.method == "zeropp":
            if zero_stage != 3:
                raise ValueError("grad_comm.method zeropp is ZeRO++ (ZeRO-3 only): set zero_stage: 3")
            if ((cfg.zeropp.quantized_weights or cfg.zeropp.quantized_gradients)
                    and not (use_gpu and torch.cuda.is_available())):
                raise ValueError("grad_comm.zeropp quantized_weights/quantized_gradients "
                                 "need CUDA (DeepSpeed's "
                                 "quantization kernels are CUDA-only); turn them off or train on GPUs")
            k = self.layout.ranks_per_node
            if self.layout.node_groups() != NodeLayout.uniform(self.layout.world_size, k).node_groups():
                # DeepSpeed builds hpZ's secondary groups from consecutive ranks.
                raise ValueError(f"grad_comm zeropp needs consecutive ranks on each node; "
                                 f"the workers' nodes are "
                                 f"{list(self.layout.node_of_rank)} (use placement_strategy PACK)")
        self.node_group = self.replica_group = None
        if self.method == "powersgd" and self.layout.num_nodes > 1:
            self.node_group, self.replica_group = make_process_groups(self.layout, self.rank)
        elif self.method == "powersgd":
            log.warning("grad_comm powersgd on one node: no gradient crosses a node boundary, so ZeRO-3 "
                        "reduces them uncompressed")
        self.ledger = CommLedger(self.layout, self.rank)
        self.powersgd: PowerSGD | None = None
        self._params: list[nn.Parameter] = []
        self.steps = 0
        self.total_steps = 0
        self._run_bytes = 0.0  # every rank's cross-node bytes summed, since this process started
        self._identical: bool | None = None  # replicas identical at every check since the last metrics()

    # --- set-up, in the order the loop calls them ------------------------------------------------
    def deepspeed_keys(self) -> dict:
        """Extra arguments of build_deepspeed_config."""
        if self.method != "zeropp":
            return {}
        z = self.cfg.zeropp
        return {"hpz_partition_size": self.layout.ranks_per_node if z.hierarchical_partitioning else None,
                "quantized_weights": z.quantized_weights, "quantized_gradients": z.quantized_gradients}

    def partition(self, model: nn.Module, ds_config: dict) -> nn.Module:
        """powersgd: shard the parameters over this rank's node only (every rank starts from the
        same weights: rank 0's are broadcast first). Other settings leave it to deepspeed.initialize."""
        if self.method != "powersgd" or self.node_group is None:
            return model
        import deepspeed

        with torch.no_grad():
            for p in model.parameters():
                torch.distributed.broadcast(p.data, 0)
        deepspeed.zero.Init(module=model, data_parallel_group=self.node_group, config_dict_or_path=ds_config)
        return model

    @property
    def param_partition(self) -> str:
        """"node" when ZeRO-3 shards parameters within each node (powersgd), else "world"."""
        return "node" if self.method == "powersgd" and self.node_group is not None else "world"

    def attach(self, engine) -> None:
        if self.layout.num_nodes > 1:
            self.ledger.install()
        if self.method != "powersgd" or self.replica_group is None:
            return
        planned = plan_tensors(engine.module)
        self._params = [p for _, p, _ in planned]
        roles = parameter_roles(engine.module)
        self._roles = [(name, roles[name]) for name, _, _ in planned]
        specs = [spec for _, _, spec in planned]
        members = torch.distributed.get_process_group_ranks(self.replica_group)
        group = self.replica_group

        def all_reduce_mean(t: torch.Tensor) -> None:
            self.ledger.record("grads", "all_reduce", t.numel() * t.element_size(), members)
            torch.distributed.all_reduce(t, group=group)
            t.div_(len(members))

        c = self.cfg.powersgd
        self.powersgd = PowerSGD(specs, rank=c.rank, q_update=c.q_update, error_feedback=c.error_feedback,
                                 seed=c.seed, eps=c.orthogonalization_eps, all_reduce=all_reduce_mean,
                                 device=engine.device)

    # --- every optimizer step --------------------------------------------------------------------
    def reduce(self, step: int, skip: bool = False) -> None:
        """At the accumulation boundary of optimizer step `step` (0-based), after backward, before
        engine.step(). `skip`: this update is being skipped on every rank (non-finite gradients),
        so nothing is averaged and the error-feedback buffers stay clean."""
        self.steps += 1
        self.total_steps += 1
        if self.powersgd is None or skip:
            return
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        grads = [safe_get_local_grad(p) for p in self._params]
        if step < self.cfg.powersgd.start_step:
            self.powersgd.reduce_uncompressed_(grads)
        else:
            self.powersgd.reduce_(grads)
        for p, g in zip(self._params, grads, strict=True):
            safe_set_local_grad(p, g)

    def verify(self, engine) -> bool:
        """Whether every rank holds bit-identical full parameters (a collective: gathers the
        parameters and compares their digests). Kept for the next metrics()."""
        import hashlib

        with self.uncounted():
            digest = hashlib.sha256()
            for _, p in _whole_parameters(engine):
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
            mine = digest.hexdigest()
            everyone = [mine]
            if dist.world_size() > 1:
                everyone = [None] * dist.world_size()
                torch.distributed.all_gather_object(everyone, mine)
        same = len(set(everyone)) == 1
        self._identical = same and self._identical is not False
        return same

    def metrics(self) -> dict:
        """Cross-node bytes per optimizer step since the last call (and over the whole run in
        this process), summed over ranks (a collective: every rank calls it)."""
        steps = max(self.steps, 1)
        own = self.ledger.take()
        totals = [own["grads"], own["params"], own["other"]]
        if dist.world_size() > 1:
            t = torch.tensor(totals, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            totals = t.tolist()
        self.steps = 0
        self._run_bytes += sum(totals)
        out = {"cross_node_grad_bytes": totals[0] / steps, "cross_node_param_bytes": totals[1] / steps,
               "cross_node_bytes": sum(totals) / steps, "nodes": self.layout.num_nodes,
               "cross_node_bytes_run_mean": self._run_bytes / max(self.total_steps, 1)}
        if self._identical is not None:
            out["replicas_identical"], self._identical = self._identical, None
        if self.powersgd is not None:
            plan = self.powersgd.plan()
            out["powersgd_sent_fraction"] = plan.sent_elements / max(plan.dense_elements, 1)
            # What goes uncompressed, by role: the paper's set, plus matrices too small to gain.
            whole: dict[str, list[str]] = {}
            for i in self.powersgd.dense:
                name, role = self._roles[i]
                whole.setdefault(role if role != "matrix" else "matrix (too small to gain)", []).append(name)
            out["powersgd_uncompressed"] = whole
            dense = self.powersgd.dense
            out["powersgd_uncompressed_bytes"] = 4 * sum(self.powersgd.specs[i].numel for i in dense)
            # Steps whose factors came out non-finite (error buffers and Q left as they were).
            out["powersgd_nonfinite_steps"] = self.powersgd.nonfinite_steps
        return out

    def uncounted(self):
        """Collectives inside (evaluation, sampling, checks) are not training traffic."""
        return self.ledger.pause()

    # --- checkpoint: each rank's error-feedback buffers and Q factors -----------------------------
    def _state_file(self) -> str:
        return f"powersgd-rank{self.rank:05d}.safetensors"

    def checkpoint_files(self, engine) -> dict[str, bytes]:
        """This rank's files for the checkpoint: its PowerSGD state; and, on rank 0, the whole
        weights when they are sharded within nodes (a collective: every rank calls it), because
        DeepSpeed's zero_to_fp32 only reassembles shards laid out over every rank."""
        from safetensors.torch import save

        files = {}
        if self.powersgd is not None:
            files[self._state_file()] = save(self.powersgd.state_dict())
        if self.param_partition == "node":
            weights = {}
            with self.uncounted():
                for name, p in _whole_parameters(engine):
                    if dist.is_main():
                        weights[name] = p.detach().float().cpu().clone()
            if dist.is_main():
                for name, buf in engine.module.state_dict().items():  # buffers: never partitioned
                    weights.setdefault(name, buf.detach().float().cpu().clone())
                files[GATHERED_WEIGHTS] = save(weights)
        return files

    def load_from(self, checkpoint_dir: str) -> None:
        if self.powersgd is None:
            return
        path = Path(checkpoint_dir, self._state_file())
        if not path.exists():
            log.warning("no PowerSGD state for rank %d in the checkpoint: error feedback starts from zero",
                        self.rank)
            return
        from safetensors.torch import load_file

        self.powersgd.load_state_dict(load_file(str(path)))

    def close(self) -> None:
        self.ledger.uninstall()


def _whole_parameters(engine):
    """(name, whole parameter) in order, gathered one at a time under ZeRO-3 (a collective: every
    rank iterates it to the end), so no rank holds more than one whole parameter at once — at the
    paper's 12 B the whole fp32 model is 46 GB, more than a GPU has beside training state."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", lambda: False)()
    for name, p in engine.module.named_parameters():
        if not partitioned:
            yield name, p
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield name, p
