"""Compressed gradient communication: which tensors PowerSGD compresses (the paper's rule, on the
debug prior, before and after real DeepSpeed ZeRO-3 partitioning in two gloo processes), then the
whole path under real Ray Train workers and a real DeepSpeed ZeRO-3 engine: 4 workers declared as
2 nodes × 2 ranks (gloo on CPU), the debug prior's width and depth.

`powersgd` keeps every worker's parameters bit-identical after every step (checked by the loop's
own replica verification), learns, and sends a fraction of `none`'s bytes across the node
boundary; its error-feedback state survives a failure and resume (the resumed run repeats the
uninterrupted one's losses). `zeropp` (hierarchical partitioning alone, the part that runs on CPU)
computes the same steps as `none` with its parameter gathers inside the node."""

import os
import socket

import pytest
import torch
from test_train_prior import TINY, fit, synthetic_rows
from torch import nn
from train_harness import losses, reports

from tessera.config import load_config
from tessera.models.prior import NAMED_SHAPES, Prior
from tessera.parallel.powersgd import PowerSGD
from tessera.training.grad_comm import compressible_weights, parameter_roles, plan_tensors

DEBUG = NAMED_SHAPES["debug"]


def paper_sets(model: Prior) -> tuple[set[str], set[str]]:
    """(uncompressed, compressed) parameter names of the prior by the paper's rule, written out from
    the model's own attributes: appendix E, "We use PowerSGD (Vogels et al., 2019) to compress the
    gradients with respect to all parameters except the embeddings, unembeddings, gains, and biases." """
    embeddings = {"text_emb.weight", "image_emb.weight", "text_pad", "text_pos", "image_row", "image_col"}
    unembeddings = {"text_head.weight", "image_head.weight"}
    gains_and_biases = {n for n, p in model.named_parameters() if p.ndim == 1}
    matrices = {f"blocks.{i}.{m}.weight" for i in range(len(model.blocks))
                for m in ("attn.qkv", "attn.out", "ff.inp", "ff.out")}
    return embeddings | unembeddings | gains_and_biases, matrices


@pytest.mark.parametrize("variant", [{}, {"glu": True, "normformer": True}])
def test_the_paper_s_uncompressed_set_on_the_debug_prior(variant):
    """Appendix E: "We use PowerSGD (Vogels et al., 2019) to compress the gradients with respect to
    all parameters except the embeddings, unembeddings, gains, and biases." Appendix D: "We disable
    gradient compression for these parameters (though PowerSGD would not make sense for 1D
    parameters like gains and biases)." """
    from dataclasses import replace

    model = Prior(replace(DEBUG, **variant), attention_impl="dense")
    uncompressed, compressed = paper_sets(model)
    names = {n for n, _ in model.named_parameters()}
    assert uncompressed | compressed == names and not uncompressed & compressed

    roles = parameter_roles(model)
    assert {n for n, r in roles.items() if r == "matrix"} == compressed
    assert {n for n, r in roles.items() if r != "matrix"} == uncompressed
    assert roles["text_head.weight"] == roles["image_head.weight"] == "unembedding"
    assert roles["text_emb.weight"] == roles["image_row"] == "embedding"
    assert roles["norm.weight"] == "gain" and roles["blocks.0.attn.qkv.bias"] == roles["norm.bias"] == "bias"
    ids = {id(p): n for n, p in model.named_parameters()}
    assert {ids[i] for i in compressible_weights(model)} == compressed

    # What PowerSGD is handed: the same split, on the whole tensors of one process.
    planned = plan_tensors(model)
    psgd = PowerSGD([spec for *_, spec in planned], rank=4)
    assert {planned[i][0] for i in psgd.dense} == uncompressed
    assert {planned[i][0] for i in psgd.compressed} == compressed


def test_a_renamed_head_is_refused_not_compressed():
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_head = nn.Linear(8, 16, bias=False)
            self.logits = nn.Linear(8, 16, bias=False)  # an unembedding under an unknown name

    with pytest.raises(ValueError, match=r"no module named \['image_head'\].*PRIOR_UNEMBEDDINGS"):
        parameter_roles(Renamed())
    roles = parameter_roles(Renamed(), unembeddings=("text_head", "logits"))
    assert roles == {"text_head.weight": "unembedding", "logits.weight": "unembedding"}


def _zero3_member(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    from tessera.training.skeleton import join_process_group

    join_process_group(use_gpu=False)
    import deepspeed

    from tessera.parallel.deepspeed_config import build_deepspeed_config

    torch.manual_seed(0)
    model = Prior(DEBUG, attention_impl="dense")
    before = parameter_roles(model)
    ds = build_deepspeed_config(micro_batch=1, grad_accum=1, world_size=2, zero_stage=3)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds)  # as GradComm.partition does
    planned = plan_tensors(model)
    sizes: list[int] = []  # elements of each all-reduce this member sends: the byte ledger's input

    def all_reduce_mean(t: torch.Tensor) -> None:
        sizes.append(t.numel())
        torch.distributed.all_reduce(t)
        t.div_(2)

    psgd = PowerSGD([spec for *_, spec in planned], rank=4, all_reduce=all_reduce_mean)
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(spec.numel, generator=g) for *_, spec in planned]
    psgd.reduce_(grads)
    torch.save({"before": before, "after": parameter_roles(model),
                "partitioned": all(p.numel() == 0 for p in model.parameters()),
                "planned": [(n, p.ds_tensor.numel(), spec) for n, p, spec in planned],
                "dense": [planned[i][0] for i in psgd.dense],
                "compressed": [planned[i][0] for i in psgd.compressed], "sizes": sizes}, out.format(rank))
    deepspeed.comm.barrier()  # both done before either closes its sockets (see test_ema.py)
    deepspeed.comm.destroy_process_group()


def test_the_uncompressed_set_survives_zero3_partitioning():
    """The same rule on each rank's ZeRO-3 partition, in two real gloo processes (appendix E, as
    above), and the rank of each partition's factors is `rank` (appendix B.2: "each GPU uses a
    compression rank of 112 for its parameter shards"). The first all-reduce's size is the ledger's
    count: every P factor plus every uncompressed partition, whole."""
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "member{}.pt")
        mp.start_processes(_zero3_member, args=(port, out), nprocs=2, start_method="spawn")
        members = [torch.load(out.format(r), weights_only=False) for r in range(2)]
    uncompressed, compressed = paper_sets(Prior(DEBUG, attention_impl="dense"))
    for m in members:
        assert m["partitioned"]  # ZeRO-3 did take the parameters apart
        assert m["after"] == m["before"]
        assert set(m["dense"]) == uncompressed and set(m["compressed"]) == compressed
        specs = {name: spec for name, _, spec in m["planned"]}
        assert all(spec.numel == numel for _, numel, spec in m["planned"])  # this rank's partition
        p_elements = sum(specs[n].matrix[0] * 4 for n in compressed)
        q_elements = sum(specs[n].matrix[1] * 4 for n in compressed)
        dense_elements = sum(specs[n].numel for n in uncompressed)
        assert m["sizes"] == [p_elements + dense_elements, q_elements]
        # The text head travels whole: its 1024 vocabulary rows of 256, halved by ZeRO-3 over 2 ranks.
        assert specs["text_head.weight"].numel == 1024 * 256 // 2
        assert specs["text_head.weight"].matrix is None and specs["image_head.weight"].matrix is None


# The debug size's width and depth (dim 256, depth 4, 8 heads; the debug preset narrows the demo's
# prior to dim 192) on TINY's short sequences.
DEBUG_WIDTH = [o for o in TINY if not o.startswith(("prior.dim=", "prior.depth=", "prior.heads="))] + [
    "prior.dim=256", "prior.heads=8"]
TWO_BY_TWO = [*DEBUG_WIDTH, "prior.precision=fp32", "prior.steps=6", "prior.checkpoint_every=3",
              "prior.eval_every=6", "prior.grad_comm.ranks_per_node=2", "prior.grad_comm.verify_every=1",
              "prior.lr=1e-3", "prior.num_workers=4"]


def run(tmp_path, name, overrides, **kwargs):
    cfg = load_config("debug", [*TWO_BY_TWO, *overrides])
    log = tmp_path / f"{name}.jsonl"
    run.results[name] = fit(cfg, tmp_path, name, log, num_workers=4, **kwargs)
    return log


run.results = {}


def per_step(log, key):
    return sum(m[key] for m in reports(log)) / len(reports(log))


@pytest.mark.integration
def test_powersgd_and_zeropp_two_nodes_of_two_ranks(ray_cluster, tmp_path):
    import ray.train

    powersgd = ["prior.grad_comm.method=powersgd", "prior.grad_comm.powersgd.rank=4"]
    none = run(tmp_path, "none", ["prior.grad_comm.method=none"])
    psgd = run(tmp_path, "powersgd", powersgd)
    for log in (none, psgd):
        rs = reports(log)
        assert [m["step"] for m in rs] == list(range(1, 7))
        assert all(m["replicas_identical"] for m in rs)  # every rank, after every step
        assert all(m["nodes"] == 2 for m in rs)
    a = losses(psgd)
    assert a[6] < 0.85 * a[1]  # it learns

    none_bytes, psgd_bytes = per_step(none, "cross_node_bytes"), per_step(psgd, "cross_node_bytes")
    assert none_bytes > 10e6  # 3.3 M fp32 parameters gathered and reduce-scattered across the boundary
    assert psgd_bytes <= 0.2 * none_bytes
    # Gradients alone: PowerSGD's factors against ZeRO-3's world-wide reduce-scatter.
    assert per_step(psgd, "cross_node_grad_bytes") <= 0.2 * per_step(none, "cross_node_grad_bytes")
    assert per_step(psgd, "cross_node_param_bytes") == 0  # parameters are sharded inside a node
    assert 0 < reports(psgd)[-1]["powersgd_sent_fraction"] < 0.15

    # Export reads the whole weights ZeRO-3 gathered at save time (the node-sharded shard files
    # are not DeepSpeed's world-wide layout): every parameter, and the model they make works.
    import torch

    from tessera import artifacts
    from tessera.training.checkpoint import export_checkpoint

    with run.results["powersgd"].checkpoint.as_directory() as ckpt:
        meta = export_checkpoint("prior", ckpt, str(tmp_path / "export"))
    assert meta["step"] == 6 and meta["num_parameters"] > 3_000_000
    model = artifacts.load("prior", str(tmp_path / "export"))
    rows = synthetic_rows(10_000_000, 8, text_len=6)
    with torch.no_grad():
        out = model(torch.as_tensor(rows["text_ids"]).long(), torch.as_tensor(rows["text_mask"]),
                    torch.as_tensor(rows["image_tokens"]).long())
    # The step-6 validation loss the run reported, from the exported weights.
    assert float(out["image_loss"]) == pytest.approx(reports(psgd)[-1]["val_image_loss"], rel=1e-4)

    # With a rank too large to gain, PowerSGD sends every partition whole: node-sharded ZeRO-3 plus
    # the cross-node all-reduce must then compute what plain ZeRO-3 does (up to summation order).
    dense = run(tmp_path, "dense", ["prior.grad_comm.method=powersgd", "prior.grad_comm.powersgd.rank=4096"])
    assert reports(dense)[-1]["powersgd_sent_fraction"] == 1.0
    for step, loss in losses(dense).items():
        assert loss == pytest.approx(losses(none)[step], rel=1e-4), step

    # ZeRO++ hierarchical partitioning (the part that runs on CPU): the same computation, with the
    # parameter gathers served by each node's secondary copy.
    hpz = run(tmp_path, "zeropp", ["prior.grad_comm.method=zeropp", "prior.steps=3",
                                   "prior.checkpoint_every=3", "prior.eval_every=3"])
    assert all(m["replicas_identical"] for m in reports(hpz))
    for step, loss in losses(hpz).items():
        assert loss == pytest.approx(losses(none)[step], rel=1e-5), step
    assert per_step(hpz, "cross_node_param_bytes") < 0.25 * per_step(none, "cross_node_param_bytes")

    # A failure after the step-3 checkpoint: the resumed run repeats the uninterrupted losses,
    # so each rank's error-feedback buffers and Q factors came back with the checkpoint.
    interrupt = {"at": 4, "how": "raise", "flag": str(tmp_path / "interrupted")}
    with pytest.raises(ray.train.TrainingFailedError):
        run(tmp_path, "resumed", powersgd, interrupt=interrupt)
    b = losses(run(tmp_path, "resumed", powersgd, interrupt=interrupt))
    for step in range(4, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
