import math

import pytest
import torch
import torch.nn.functional as F

from tessera.models.prior import NAMED_SHAPES, Prior, PriorShape, drop_captions, masked_cross_entropy

TINY = PriorShape(text_vocab=50, image_vocab=12, text_len=6, grid=3, dim=32, depth=2, heads=4,
                  attention="full")


def _batch(shape, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.text_vocab, (B, shape.text_len), generator=g)
    lengths = torch.tensor([shape.text_len, 3, 1])[:B]
    mask = torch.arange(shape.text_len)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    image = torch.randint(0, shape.image_vocab, (B, shape.num_image_tokens), generator=g)
    return ids, mask, image


def test_padding_uses_a_learned_embedding_per_position_and_ids_are_never_remapped():
    torch.manual_seed(0)
    model = Prior(TINY)
    ids, mask, image = _batch(TINY)
    x = model.embed(ids, mask, image)
    T = TINY.text_len
    for b in range(3):
        for t in range(T):
            if mask[b, t]:  # a caption token: its own id's embedding
                want = model.text_emb.weight[ids[b, t]] + model.text_pos[t]
            else:  # padding: this position's padding embedding, whatever id sits there
                want = model.text_pad[t] + model.text_pos[t]
            torch.testing.assert_close(x[b, t], want)
    # The id under padding does not matter, even one outside the vocabulary; a real one must be valid.
    other = ids.masked_fill(~mask, -1)
    torch.testing.assert_close(model.embed(other, mask, image), x)
    bad = ids.clone()
    bad[0, 0] = TINY.text_vocab
    with pytest.raises(IndexError):
        model.embed(bad, mask, image)


def test_image_positions_get_row_plus_column_embeddings():
    model = Prior(TINY)
    ids, mask, image = _batch(TINY)
    x = model.embed(ids, mask, image)
    G, T = TINY.grid, TINY.text_len
    for r in range(G):
        for c in range(G):
            want = model.image_emb.weight[image[1, r * G + c]] + model.image_row[r] + model.image_col[c]
            torch.testing.assert_close(x[1, T + r * G + c], want)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1 / 8, 7 / 8)])
def test_loss_parts_and_weighting_match_a_hand_computation(weights):
    torch.manual_seed(1)
    model = Prior(TINY).eval()
    ids, mask, image = _batch(TINY)
    out = model(ids, mask, image, text_weight=weights[0], image_weight=weights[1])
    h = model.hidden(model.embed(ids, mask, image))
    T, N = TINY.text_len, TINY.num_image_tokens
    text_terms, image_terms = [], []
    for b in range(3):
        for t in range(1, T):  # caption token t is predicted at position t-1, if it is real
            if mask[b, t]:
                text_terms.append(-F.log_softmax(model.text_head(h[b, t - 1]), -1)[ids[b, t]])
        for j in range(N):  # image token j is predicted at position T-1+j
            image_terms.append(-F.log_softmax(model.image_head(h[b, T - 1 + j]), -1)[image[b, j]])
    text = torch.stack(text_terms).mean()
    img = torch.stack(image_terms).mean()
    torch.testing.assert_close(out["text_loss"], text)
    torch.testing.assert_close(out["image_loss"], img)
    torch.testing.assert_close(out["loss"], weights[0] * text + weights[1] * img)


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_predictions_never_see_the_future(attention):
    shape = PriorShape(**{**TINY.to_dict(), "attention": attention, "depth": 4})
    torch.manual_seed(2)
    model = Prior(shape).eval()
    ids, mask, image = _batch(shape)
    T = shape.text_len
    h = model.hidden(model.embed(ids, mask, image))
    j = 4
    changed = image.clone()
    changed[:, j] = (changed[:, j] + 1) % shape.image_vocab
    h2 = model.hidden(model.embed(ids, mask, changed))
    torch.testing.assert_close(h2[:, : T + j], h[:, : T + j])  # positions before image token j
    assert not torch.allclose(h2[:, T + j:], h[:, T + j:])


def test_masked_cross_entropy_ignores_masked_positions_and_handles_none():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    want = torch.stack([F.cross_entropy(logits[0, 0], targets[0, 0]),
                        F.cross_entropy(logits[0, 1], targets[0, 1]),
                        F.cross_entropy(logits[1, 0], targets[1, 0])]).mean()
    torch.testing.assert_close(masked_cross_entropy(logits, targets, mask), want)
    assert float(masked_cross_entropy(logits, targets, torch.zeros_like(mask))) == 0.0


def test_caption_dropout_replaces_whole_captions_with_padding():
    mask = torch.ones(1000, 6, dtype=torch.bool)
    assert torch.equal(drop_captions(mask, 0.0), mask)
    assert not drop_captions(mask, 1.0).any()
    dropped = drop_captions(mask, 0.2, torch.Generator().manual_seed(0))
    rows = dropped.any(1)
    assert torch.equal(dropped, rows[:, None].expand_as(dropped))  # all or nothing per caption
    assert 150 < int((~rows).sum()) < 250


def test_tiny_prior_fits_a_batch():
    torch.manual_seed(3)
    model = Prior(TINY)
    ids, mask, image = _batch(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = model(ids, mask, image)
        first = first if first is not None else float(out["image_loss"].detach())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert first == pytest.approx(math.log(TINY.image_vocab), rel=0.2)
    assert float(out["image_loss"].detach()) < 0.3 * first


def test_named_shapes_and_validation():
    assert NAMED_SHAPES["paper"].seq_len == 256 + 1024
    assert NAMED_SHAPES["debug"].num_image_tokens == 64 and NAMED_SHAPES["debug"].image_vocab == 128
    with pytest.raises(ValueError, match="divisible"):
        PriorShape(dim=30, heads=4)
    model = Prior(TINY)
    ids, mask, image = _batch(TINY)
    with pytest.raises(ValueError, match="text_len"):
        model(ids[:, :4], mask[:, :4], image)
    with pytest.raises(ValueError, match="image_tokens"):
        model(ids, mask, image[:, :5])


def _count_block_calls(model):
    """Per-block count of forward calls (a pre-hook: a recomputation that stops early still counts)."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_activation_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(attention):
    shape = PriorShape(**{**TINY.to_dict(), "attention": attention, "depth": 4})
    torch.manual_seed(7)
    plain = Prior(shape)
    assert plain.activation_checkpointing is False  # off by default
    ckpt = Prior(shape, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = _count_block_calls(ckpt)
    ids, mask, image = _batch(shape)

    want = plain(ids, mask, image)
    want["loss"].backward()
    got = ckpt(ids, mask, image)
    assert calls == [1] * 4
    got["loss"].backward()
    assert calls == [2] * 4  # each block ran again in backward: it was checkpointed
    for key in ("loss", "text_loss", "image_loss"):
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), key
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-8), name

    # Not in evaluation, nor in KV-cached decoding: no recomputation, same outputs.
    ckpt.eval()
    plain.eval()
    with torch.no_grad():
        h = ckpt.hidden(ckpt.embed(ids, mask, image))
    assert calls == [3] * 4
    torch.testing.assert_close(h, plain.hidden(plain.embed(ids, mask, image)))
    cache = ckpt.new_cache(3, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ckpt.extend(cache, ckpt.embed(ids, mask, image[:, :4])),
                               plain.next_image_logits(ids, mask, image[:, :4]))


def test_activation_checkpointing_is_a_prior_config_option_off_by_default():
    from tessera.config import PriorTrainConfig

    assert PriorTrainConfig().activation_checkpointing is False
    assert PriorTrainConfig(activation_checkpointing=True).activation_checkpointing is True


def test_logits_and_loss_are_float32_under_bf16_autocast():
    """DALL·E, appendix D, guideline 2: "The logits for the text and image tokens are computed and
    stored in 32-bit precision. [...] using 16-bit logits resulted in a small shift in the training
    curve, so we switched to use 32-bit precision out of an abundance of caution.\""""
    torch.manual_seed(8)
    model = Prior(TINY)
    ids, mask, image = _batch(TINY)
    T, N = TINY.text_len, TINY.num_image_tokens
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        h = model.hidden(model.embed(ids, mask, image))
        text_logits, image_logits = model.logits(h)
        out = model(ids, mask, image)
        sampled = model.next_image_logits(ids, mask, image[:, :4])
        bf16_image_logits = model.image_head(h[:, T - 1: T + N - 1])  # what autocast does to a Linear
    assert bf16_image_logits.dtype == torch.bfloat16  # autocast was on
    assert text_logits.dtype == image_logits.dtype == sampled.dtype == torch.float32
    assert all(out[k].dtype == torch.float32 for k in ("loss", "text_loss", "image_loss"))

    # float32 reference from the same hidden states, computed outside autocast.
    hf = h.float()
    ref_text = hf[:, : T - 1] @ model.text_head.weight.T
    ref_image = hf[:, T - 1: T + N - 1] @ model.image_head.weight.T
    real = mask[:, 1:]
    ref_text_loss = F.cross_entropy(ref_text[real], ids[:, 1:][real])
    ref_image_loss = F.cross_entropy(ref_image.reshape(-1, TINY.image_vocab), image.reshape(-1))
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(image_logits, ref_image, **tol)
    torch.testing.assert_close(out["text_loss"], ref_text_loss, **tol)
    torch.testing.assert_close(out["image_loss"], ref_image_loss, **tol)
    torch.testing.assert_close(out["loss"], ref_text_loss / 8 + 7 * ref_image_loss / 8, **tol)
    # The tolerance is tight enough to tell: bf16 logits move the loss by more than it.
    bf16_loss = F.cross_entropy(bf16_image_logits.float().reshape(-1, TINY.image_vocab), image.reshape(-1))
    assert abs(float(bf16_loss.detach()) - float(ref_image_loss.detach())) > 10 * tol["atol"]


def test_a_prior_exported_with_the_earlier_masks_is_refused_not_run_with_the_new_ones():
    """Exports from before PriorShape.masks existed were trained with tessera's first sparse masks;
    loading them under the paper's masks would run a different model silently."""
    from dataclasses import asdict

    from safetensors.torch import save

    from tessera import artifacts
    from tessera.models.prior import Prior, PriorShape

    shape = PriorShape(text_vocab=30, image_vocab=16, text_len=5, grid=3, dim=32, depth=2, heads=4)
    weights = save(Prior(shape, attention_impl="dense").state_dict())
    old = asdict(shape)
    del old["masks"]
    with pytest.raises(artifacts.ArtifactError, match="masks version 1.*retrain"):
        artifacts.build("prior", {"kind": "tessera.prior", "shape": old}, weights, where="prior.json")
    full = {**old, "attention": "full"}  # full attention never changed: it still loads
    artifacts.build("prior", {"kind": "tessera.prior", "shape": full}, weights, where="prior.json")
    assert artifacts.build("prior", {"kind": "tessera.prior", "shape": asdict(shape)}, weights,
                           where="prior.json").shape.masks == 2
