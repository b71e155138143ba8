"""PowerSGD on known matrices (one member, then two real gloo processes), the cross-node byte
model, node layouts, and the grad_comm config and DeepSpeed keys."""

import os
import socket

import pytest
import torch

from tessera.parallel.comm_ledger import cross_node_bytes, ring_crossings
from tessera.parallel.deepspeed_config import build_deepspeed_config
from tessera.parallel.powersgd import PowerSGD, TensorSpec, matrix_view, worth_compressing
from tessera.parallel.topology import NodeLayout


def low_rank(n: int, m: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


@pytest.mark.parametrize("warm_start", [True, False])
def test_a_rank_r_matrix_is_reproduced_exactly(warm_start):
    m = low_rank(40, 24, 3, seed=1)
    psgd = PowerSGD([TensorSpec(m.numel(), (40, 24))], rank=3, warm_start=warm_start)
    for _ in range(3):  # the first step already, with a random Q; and every step after
        t = m.clone()
        psgd.reduce_([t])
        torch.testing.assert_close(t, m, rtol=1e-4, atol=1e-4)
        assert psgd.errors[0].abs().max() < 1e-3


def test_error_feedback_carries_the_residual_to_the_next_step():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(32, 20, generator=g)  # full rank: rank 2 loses most of it
    psgd = PowerSGD([TensorSpec(m.numel(), (32, 20))], rank=2)
    first = m.clone()
    psgd.reduce_([first])
    e1 = psgd.errors[0].clone()
    torch.testing.assert_close(first + e1, m)  # sent + kept = the gradient
    assert e1.norm() > 0.5 * m.norm() and torch.linalg.matrix_rank(first) == 2
    second = torch.zeros_like(m)  # no new gradient: what arrives is the residual, compressed
    psgd.reduce_([second])
    torch.testing.assert_close(second + psgd.errors[0], e1, rtol=1e-5, atol=1e-5)
    assert second.norm() > 0
    # Over steps with no new gradient the residual keeps arriving: the total delivered tends to M.
    delivered = first + second
    for _ in range(40):
        t = torch.zeros_like(m)
        psgd.reduce_([t])
        delivered += t
    assert (delivered - m).norm() < 0.05 * m.norm()


def test_without_error_feedback_the_residual_is_lost():
    m = torch.randn(32, 20, generator=torch.Generator().manual_seed(3))
    psgd = PowerSGD([TensorSpec(m.numel(), (32, 20))], rank=2, error_feedback=False)
    psgd.reduce_([m.clone()])
    t = torch.zeros_like(m)
    psgd.reduce_([t])
    assert t.abs().max() == 0 and not psgd.errors


def test_warm_start_converges_to_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    s = torch.tensor([10.0, 8.0, 6.0] + [1.0] * 27)
    m = u[:, :30] @ torch.diag(s) @ v.T
    best = s[3:].norm()  # Eckart–Young: the rank-3 truncation's error
    psgd = PowerSGD([TensorSpec(m.numel(), (48, 30))], rank=3, error_feedback=False)
    for _ in range(15):
        t = m.clone()
        psgd.reduce_([t])
    assert (m - t).norm() == pytest.approx(float(best), rel=1e-3)
    cold = PowerSGD([TensorSpec(m.numel(), (48, 30))], rank=3, error_feedback=False, warm_start=False)
    for _ in range(15):
        t = m.clone()
        cold.reduce_([t])
    assert (m - t).norm() > 1.05 * best  # one fresh random Q per step: no power iteration


def test_uncompressed_tensors_and_the_plan():
    assert matrix_view(100, 30) == (4, 30)  # a ZeRO shard of a (?, 30) matrix, padded to whole rows
    assert not worth_compressing((6, 5), 4) and worth_compressing((64, 64), 4)
    bias = torch.randn(17)
    small = torch.randn(6, 5)
    big = low_rank(64, 64, 2, seed=5)
    specs = [TensorSpec(17), TensorSpec(30, (6, 5)), TensorSpec(64 * 64, (64, 64))]
    psgd = PowerSGD(specs, rank=4)
    assert psgd.compressed == [2] and psgd.dense == [0, 1]
    tensors = [bias.clone(), small.clone(), big.clone()]
    stats = psgd.reduce_(tensors)
    assert torch.equal(tensors[0], bias) and torch.equal(tensors[1], small)
    torch.testing.assert_close(tensors[2], big, rtol=1e-4, atol=1e-4)
    assert stats.sent_elements == 17 + 30 + 4 * (64 + 64)
    assert stats.dense_elements == 17 + 30 + 64 * 64 and stats.sent_bytes == 4 * stats.sent_elements
    with pytest.raises(ValueError, match="planned for 3 tensors"):
        psgd.reduce_(tensors[:2])
    with pytest.raises(ValueError, match="elements"):
        psgd.reduce_([bias, small, torch.zeros(10)])


def test_uncompressed_steps_send_everything_and_keep_the_error_buffers():
    m = torch.randn(32, 20, generator=torch.Generator().manual_seed(11))
    psgd = PowerSGD([TensorSpec(m.numel(), (32, 20)), TensorSpec(7)], rank=2)
    psgd.reduce_([m.clone(), torch.zeros(7)])
    error = psgd.errors[0].clone()
    t, b = m.clone(), torch.ones(7)
    stats = psgd.reduce_uncompressed_([t, b])
    assert torch.equal(t, m) and torch.equal(b, torch.ones(7)) and torch.equal(psgd.errors[0], error)
    assert stats.sent_elements == stats.dense_elements == 32 * 20 + 7 and psgd.steps == 1


def test_state_round_trip_continues_identically():
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(24, 16, generator=g) for _ in range(4)]
    a = PowerSGD([TensorSpec(384, (24, 16))], rank=2, seed=9)
    for x in grads[:2]:
        a.reduce_([x.clone()])
    b = PowerSGD([TensorSpec(384, (24, 16))], rank=2, seed=9)
    b.load_state_dict(a.state_dict())
    for x in grads[2:]:
        ta, tb = x.clone(), x.clone()
        a.reduce_([ta])
        b.reduce_([tb])
        assert torch.equal(ta, tb)


def _two_members(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    shared = low_rank(30, 20, 2, seed=7)
    own = low_rank(30, 20, 1, seed=8 + rank)  # the members differ; their mean has rank <= 4
    bias = torch.full((5,), float(rank))
    psgd = PowerSGD([TensorSpec(600, (30, 20)), TensorSpec(5)], rank=4, seed=3)
    t, b = shared + own, bias.clone()
    psgd.reduce_([t, b])
    torch.save({"t": t, "b": b, "error": psgd.errors[0], "own": own}, out.format(rank))
    torch.distributed.destroy_process_group()


def test_two_gloo_members_get_the_same_mean():
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "member{}.pt")
        mp.start_processes(_two_members, args=(port, out), nprocs=2, start_method="spawn")
        a, b = torch.load(out.format(0)), torch.load(out.format(1))
    mean = low_rank(30, 20, 2, seed=7) + (a["own"] + b["own"]) / 2
    assert torch.equal(a["t"], b["t"])  # bit-identical on both members
    torch.testing.assert_close(a["t"], mean, rtol=1e-4, atol=1e-4)
    assert torch.equal(a["b"], torch.full((5,), 0.5))  # uncompressed: the exact mean
    # Each member keeps what its own gradient lost: M_i − mean.
    torch.testing.assert_close(a["error"], (a["own"] - b["own"]) / 2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b["error"], (b["own"] - a["own"]) / 2, rtol=1e-3, atol=1e-3)


def test_node_layouts():
    lay = NodeLayout.uniform(8, 4)
    assert lay.node_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]] and lay.num_nodes == 2
    spread = NodeLayout.from_node_ids(["b", "a", "b", "a"])  # Ray placed ranks alternately
    assert spread.node_groups() == [[0, 2], [1, 3]] and spread.replica_groups() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="different numbers of workers"):
        _ = NodeLayout.from_node_ids(["a", "a", "b"]).ranks_per_node
    with pytest.raises(ValueError, match="do not split"):
        NodeLayout.uniform(6, 4)


def test_cross_node_byte_model():
    nodes = NodeLayout.uniform(4, 2).node_of_rank  # (0, 0, 1, 1)
    d = 1000
    assert ring_crossings([0, 1, 2, 3], nodes) == 2
    assert cross_node_bytes("all_reduce", d, [0, 1], nodes) == 0  # inside a node
    # Ring all-reduce over 2 members on 2 nodes: each sends D/2 twice.
    assert cross_node_bytes("all_reduce", d, [0, 2], nodes) == 2 * d
    # Reduce-scatter over the world: 3 steps of D/4 over each of the 2 node-crossing links.
    assert cross_node_bytes("reduce_scatter", d, [0, 1, 2, 3], nodes) == 1.5 * d
    assert cross_node_bytes("all_gather", d, [0, 1, 2, 3], nodes) == 1.5 * d
    assert cross_node_bytes("all_reduce", d, [0, 1, 2, 3], nodes) == 3 * d
    assert cross_node_bytes("broadcast", d, [0, 1, 2, 3], nodes) == d
    # All-to-all: each of 4 members sends D/4 to each of the 2 members on the other node.
    assert cross_node_bytes("all_to_all", d, [0, 1, 2, 3], nodes) == 4 * 2 * d / 4
    with pytest.raises(ValueError, match="unknown collective"):
        cross_node_bytes("gossip", d, [0, 2], nodes)


def test_grad_comm_config_and_deepspeed_keys():
    from tessera.config import ConfigError, load_config

    cfg = load_config("debug", ["prior.grad_comm.method=zeropp", "prior.num_workers=4",
                                "prior.grad_comm.ranks_per_node=2"])
    assert cfg.prior.grad_comm.zeropp.hierarchical_partitioning
    with pytest.raises(ConfigError, match="quantized_gradients needs use_gpu: true.*CUDA-only"):
        load_config("debug", ["prior.grad_comm.method=zeropp",
                              "prior.grad_comm.zeropp.quantized_gradients=true"])
    with pytest.raises(ConfigError, match="quantized_weights needs use_gpu: true"):
        load_config("debug", ["prior.grad_comm.method=zeropp",
                              "prior.grad_comm.zeropp.quantized_weights=true"])
    gpu = load_config("debug", ["prior.grad_comm.method=zeropp", "prior.use_gpu=true",
                                "prior.grad_comm.zeropp.quantized_weights=true",
                                "prior.grad_comm.zeropp.quantized_gradients=true"])
    assert gpu.prior.grad_comm.zeropp.quantized_gradients
    with pytest.raises(ConfigError, match="works with ZeRO-3"):
        load_config("debug", ["prior.grad_comm.method=powersgd", "prior.zero_stage=2"])
    with pytest.raises(ConfigError, match="does not divide num_workers"):
        load_config("debug", ["prior.grad_comm.ranks_per_node=3", "prior.num_workers=4"])
    with pytest.raises(ConfigError, match="method"):
        load_config("debug", ["prior.grad_comm.method=onebit"])

    ds = build_deepspeed_config(micro_batch=2, grad_accum=1, world_size=16, zero_stage=3,
                                hpz_partition_size=8, quantized_weights=True, quantized_gradients=True)
    z = ds["zero_optimization"]
    assert (z["zero_hpz_partition_size"], z["zero_quantized_weights"],
            z["zero_quantized_gradients"]) == (8, True, True)
    plain = build_deepspeed_config(micro_batch=2, grad_accum=1, world_size=16, zero_stage=3)
    assert "zero_quantized_weights" not in plain["zero_optimization"]
    with pytest.raises(ValueError, match="need zero_stage 3"):
        build_deepspeed_config(micro_batch=2, grad_accum=1, world_size=2, zero_stage=2,
                               quantized_gradients=True)
