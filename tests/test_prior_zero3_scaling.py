"""The per-resblock gradient scaler inside a real DeepSpeed ZeRO-3 engine (one CPU process, gloo):
parameter gradients come out unscaled (the engine's update equals an unscaled run's), and an
overflow injected into one block's gradient skips the update — weights and optimizer state stay
as they were — while shrinking only that block's scale."""

import os

import pytest
import torch

from tessera.models.prior import Prior, PriorShape

SHAPE = PriorShape(text_vocab=30, image_vocab=16, text_len=5, grid=3, dim=32, depth=3, heads=4,
                   attention="sparse")


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SHAPE.text_vocab, (4, SHAPE.text_len), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    image = torch.randint(0, SHAPE.image_vocab, (4, SHAPE.num_image_tokens), generator=g)
    return ids, mask, image


@pytest.fixture
def zero3_group():
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    from tessera.training.skeleton import join_process_group

    join_process_group(use_gpu=False)
    yield
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups for later tests
    os.environ.clear()
    os.environ.update(saved)


def _engine(scaled: bool):
    import deepspeed

    from tessera.parallel.deepspeed_config import build_deepspeed_config
    from tessera.training.grad_scaler import ResblockGradScaler, SkippableAdamW

    torch.manual_seed(0)
    model = Prior(SHAPE, attention_impl="dense")
    scaler = ResblockGradScaler(model.gradient_segments(), init_scale=2.0**20) if scaled else None
    opt = SkippableAdamW(model.parameters(), lr=1e-2)
    cfg = build_deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, zero_stage=3, grad_clip=None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt, scaler


def _weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_scaled_updates_match_unscaled_ones_and_an_overflow_skips_the_update(zero3_group):
    ids, mask, image = _batch()
    plain, _, _ = _engine(scaled=False)
    scaled, opt, scaler = _engine(scaled=True)
    before = _weights(scaled)
    for engine, sc in ((plain, None), (scaled, scaler)):
        loss = engine(ids, mask, image)["loss"]
        engine.backward(sc.scale_loss(loss) if sc else loss)
        if sc:
            opt.skip_next = sc.update()
        engine.step()
    a, b = _weights(plain), _weights(scaled)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(b[n], before[n]) for n in b)  # it did update

    # Inject an overflow into the activation gradient that block 2 (segment 3) hands down: a hook
    # on its input after the scaler's entry hook. Block 2's own weight gradients stay finite and
    # the filtered (zeroed) gradient below is finite too, so DeepSpeed sees a finite gradient norm:
    # only the scaler's skip keeps the update from happening.
    scales_before = scaler.scales.clone()
    handle = scaled.module.blocks[2].register_forward_pre_hook(
        lambda m, args: args[0].register_hook(lambda g: torch.full_like(g, float("inf"))) and None)
    state_before = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                    for k, v in opt.state.items()}
    loss = scaled(ids, mask, image)["loss"]
    scaled.backward(scaler.scale_loss(loss))
    handle.remove()
    flags = scaler.overflow_flags().bool().tolist()
    assert flags == [False, False, False, True, False]  # embeddings, block 0, block 1, block 2, top
    opt.skip_next = scaler.update()
    assert opt.skip_next
    scaled.step()
    assert torch.isfinite(torch.as_tensor(scaled.get_global_grad_norm()))
    after = _weights(scaled)
    for name in b:
        assert torch.equal(after[name], b[name]), name  # the update was skipped
    for k, v in opt.state.items():
        for n, t in v.items():
            if torch.is_tensor(t):
                assert torch.equal(t, state_before[k][n])
    ratio = (scales_before / scaler.scales).tolist()
    assert (ratio[3] == pytest.approx(2**0.5)
            and all(r == pytest.approx(1.0) for i, r in enumerate(ratio) if i != 3))
