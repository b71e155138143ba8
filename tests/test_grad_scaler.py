"""Per-resblock gradient scaling on a tiny fp32 CPU model: embeddings, 3 residual blocks, a top."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.training.grad_scaler import ResblockGradScaler, SkippableAdamW

V, D, B, T = 11, 8, 2, 5
SQRT2 = 2**0.5
GROWTH = 2 ** (1 / 1000)


class _Inf(torch.autograd.Function):
    """Identity forward; backward puts inf into the gradient, like an fp16 overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad + float("inf")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        # Where backward overflows, if anywhere: "activation" puts inf only into the input's gradient
        # (via the residual), "weight" only into lin.weight's; each is caught by a different hook.
        self.overflow = None

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        weight = _Inf.apply(self.lin.weight) if self.overflow == "weight" else self.lin.weight
        h = torch.tanh(F.linear(x, weight, self.lin.bias))
        return (_Inf.apply(x) if self.overflow == "activation" else x) + h


class Top(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, x):  # (B, T, D) -> (B, T, V)
        return self.head(self.norm(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.top = Top()

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.top(x)

    def segments(self):
        return [
            (None, list(self.emb.parameters())),
            *((b, list(b.parameters())) for b in self.blocks),
            (self.top, list(self.top.parameters())),
        ]


def build(**kwargs):
    torch.manual_seed(0)
    net = Net()
    return net, ResblockGradScaler(net.segments(), model=net, **kwargs)


def build_with_reference(**kwargs):
    """Also an identical plain model: copied before the scaler, since deepcopy would carry its hooks."""
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    return net, ResblockGradScaler(net.segments(), model=net, **kwargs), ref


def loss_of(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    return F.cross_entropy(net(idx).view(-1, V), target.view(-1))


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tol)


def one_hot(k, n=5):
    flags = torch.zeros(n, dtype=torch.bool)
    flags[k] = True
    return flags


def test_scaled_backward_gives_true_gradients():
    net, scaler, ref = build_with_reference()
    # Assigned after the hooks were registered: they must read scales at backward time.
    scaler.scales = torch.tensor([2.0**8, 2.0**20, 2.0**11, 2.0**24, 2.0**14], dtype=torch.float64)
    scaler.scale_loss(loss_of(net)).backward()
    loss_of(ref).backward()
    # Powers of two commute with every rounding, so the match is exact up to summation order.
    assert_grads_close(grads(net), grads(ref), rtol=1e-6, atol=0)
    assert not scaler.overflow_flags().any()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("where", ["activation", "weight"])
def test_overflow_in_a_block_flags_only_that_segment(k, where):
    net, scaler = build()
    scaler.scales = torch.tensor([2.0**10, 2.0**12, 2.0**14, 2.0**16, 2.0**18], dtype=torch.float64)
    before = scaler.scales.clone()
    net.blocks[k - 1].overflow = where  # segment k is blocks[k - 1]
    scaler.scale_loss(loss_of(net)).backward()

    assert scaler.overflow_flags().tolist() == one_hot(k).tolist()
    below = list(net.emb.parameters()) + [p for b in net.blocks[: k - 1] for p in b.parameters()]
    assert all(torch.isfinite(p.grad).all() for p in below)
    assert scaler.update() is True
    expected = before.clone()
    expected[k] /= SQRT2
    torch.testing.assert_close(scaler.scales, expected, rtol=1e-12, atol=0)
    assert (scaler.updates, scaler.skipped) == (1, 1)
    assert not scaler.overflow_flags().any()  # reset by update()


def test_scales_grow_after_finite_updates():
    net, scaler = build()
    for _ in range(3):
        net.zero_grad()
        scaler.scale_loss(loss_of(net)).backward()
        assert scaler.update() is False
    for _ in range(7):
        assert scaler.update() is False
    torch.testing.assert_close(scaler.scales, torch.full((5,), 2.0**16 * GROWTH**10, dtype=torch.float64))
    assert scaler.stats() == pytest.approx(
        {
            "grad_scale_min": 2.0**16 * GROWTH**10,
            "grad_scale_max": 2.0**16 * GROWTH**10,
            "grad_scale_mean_log2": 16 + 10 / 1000,
            "skipped_updates": 0,
        }
    )
    assert (scaler.updates, scaler.skipped) == (10, 0)


def run_cooldown(scaler, *, until):
    """Overflow segment 1 at update 0 and 124, finite updates between; stops before update `until`."""
    log = []
    while scaler.updates < until:
        step = scaler.updates
        before = scaler.scales[1].item()
        overflow = step in (0, 124)
        skipped = scaler.update(one_hot(1) if overflow else torch.zeros(5, dtype=torch.bool))
        assert skipped is overflow
        log.append((step, scaler.scales[1].item() / before))
    return log


def test_shrink_cooldown():
    _, scaler = build()
    log = dict(run_cooldown(scaler, until=125))
    assert log[0] == pytest.approx(1 / SQRT2)  # shrinks
    assert log[1] == pytest.approx(GROWTH)
    assert log[124] == 1.0  # within 125 updates of the shrink: skipped, not shrunk, not grown
    others = scaler.scales[[0, 2, 3, 4]].clone()
    before = scaler.scales[1].item()
    assert scaler.update(one_hot(1)) is True  # update 125: 125 after the shrink, shrinks again
    assert scaler.scales[1].item() == pytest.approx(before / SQRT2)
    assert torch.equal(scaler.scales[[0, 2, 3, 4]], others)
    assert (scaler.updates, scaler.skipped) == (126, 3)


def test_scales_clamped_to_replica_range():
    _, scaler = build(replicas=4, growth=2.0, shrink_cooldown=0)
    assert scaler.scales.tolist() == [4 * 2.0**16] * 5
    for _ in range(20):
        scaler.update()
    assert scaler.scales.tolist() == [4 * 2.0**24] * 5
    for _ in range(40):
        assert scaler.update(torch.ones(5, dtype=torch.bool)) is True
    assert scaler.scales.tolist() == [4 * 2.0**7] * 5
    assert build(replicas=4, init_scale=1.0)[1].scales.tolist() == [4 * 2.0**7] * 5
    assert build(replicas=4, init_scale=1e12)[1].scales.tolist() == [4 * 2.0**24] * 5


def test_flags_from_outside_override_own():
    net, scaler = build()
    net.blocks[1].overflow = "activation"
    scaler.scale_loss(loss_of(net)).backward()
    assert scaler.overflow_flags().tolist() == one_hot(2).tolist()
    # All ranks finite (e.g. a MAX all-reduce as uint8): no skip, everything grows, own flags reset.
    assert scaler.update(torch.zeros(5, dtype=torch.uint8)) is False
    torch.testing.assert_close(scaler.scales, torch.full((5,), 2.0**16 * GROWTH, dtype=torch.float64))
    assert not scaler.overflow_flags().any()

    net.blocks[1].overflow = None
    net.zero_grad()
    scaler.scale_loss(loss_of(net)).backward()
    assert not scaler.overflow_flags().any()
    # Another rank overflowed in segment 4: skip here too, shrink segment 4 only.
    assert scaler.update(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])) is True
    assert scaler.scales[4].item() == pytest.approx(2.0**16 * GROWTH / SQRT2)
    assert scaler.scales[:4].tolist() == pytest.approx([2.0**16 * GROWTH] * 4)
    with pytest.raises(ValueError, match="flags has shape"):
        scaler.update(torch.zeros(4))


def test_state_dict_round_trip():
    _, scaler = build()
    run_cooldown(scaler, until=100)  # shrank segment 1 at update 0
    state = json.loads(
        json.dumps({k: v.tolist() if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()})
    )
    _, fresh = build()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scales, scaler.scales)
    assert (fresh.updates, fresh.skipped) == (scaler.updates, scaler.skipped) == (100, 1)
    # Both remember the shrink at update 0: same skips and shrinks from here on.
    assert run_cooldown(fresh, until=126) == run_cooldown(scaler, until=126)
    assert torch.equal(fresh.scales, scaler.scales)
    assert fresh.skipped == 2

    _, other = build()
    state["scales"] = state["scales"][:4]
    with pytest.raises(ValueError, match="'scales' has shape"):
        other.load_state_dict(state)


def test_skippable_adamw_leaves_state_untouched():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = SkippableAdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    assert opt.skip_next is False

    def step():
        opt.zero_grad()
        lin(torch.randn(5, 4)).square().sum().backward()
        opt.step()

    step()  # creates moments and step counts
    params = copy.deepcopy(lin.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.skip_next = True
    step()
    assert opt.skip_next is False
    assert all(torch.equal(params[k], v) for k, v in lin.state_dict().items())
    after = opt.state_dict()["state"]
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[i][key], value), (i, key)
    step()
    assert not torch.equal(params["weight"], lin.weight)
    assert opt.state_dict()["state"][0]["step"].item() == 2


def test_gradient_accumulation():
    net, scaler, ref = build_with_reference()
    for _ in range(5):
        scaler.update()  # scales 2^16·2^(5/1000): not powers of two
    scaler.scales[[1, 3]] *= 8
    for seed in (1, 2):
        scaler.scale_loss(loss_of(net, seed)).backward()
        loss_of(ref, seed).backward()
    assert_grads_close(grads(net), grads(ref), rtol=1e-5, atol=1e-7)
    assert not scaler.overflow_flags().any()


def test_remove_and_inputs_without_grad():
    net, scaler, ref = build_with_reference()
    block = net.blocks[0]
    x = torch.randn(B, T, D)  # requires no grad: passes through the entry hook untouched
    assert torch.equal(block(x), x + torch.tanh(block.lin(x)))
    with torch.no_grad():
        net(torch.zeros(B, T, dtype=torch.long))

    scaler.remove()
    loss_of(net).backward()  # no hooks left: a plain backward gives plain gradients
    loss_of(ref).backward()
    assert_grads_close(grads(net), grads(ref), rtol=0, atol=0)


def test_segments_validated():
    net = Net()
    segments = net.segments()
    with pytest.raises(ValueError, match=r"'blocks\.0\.lin\.weight' is in segments\[1\] and segments\[2\]"):
        ResblockGradScaler(
            [*segments[:2], (segments[2][0], segments[2][1] + segments[1][1]), *segments[3:]], model=net
        )
    with pytest.raises(ValueError, match=r"in no segment: \['top\.head\.weight', 'top\.head\.bias'\]"):
        ResblockGradScaler([*segments[:4], (net.top, list(net.top.norm.parameters()))], model=net)
    with pytest.raises(ValueError, match=r"segments\[0\] is the embeddings"):
        ResblockGradScaler([(net.emb, segments[0][1]), *segments[1:]])
    with pytest.raises(ValueError, match=r"segments\[2\] needs an entry"):
        ResblockGradScaler([*segments[:2], (None, segments[2][1]), *segments[3:]])
    assert math.isclose(ResblockGradScaler(segments).scales[0].item(), 2.0**16)
