import pytest
import torch

from tessera.models.prior import Prior, PriorShape
from tessera.sampling.sampler import filter_logits, sample_image_tokens

TINY = PriorShape(text_vocab=40, image_vocab=10, text_len=5, grid=3, dim=32, depth=2, heads=4,
                  attention="sparse")


def _caption(B=2):
    ids = torch.tensor([[3, 7, 9, 0, 0], [5, 0, 0, 0, 0]])[:B]
    return ids, ids > 0


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert (torch.isfinite(filter_logits(logits[:, [3, 1, 0, 2]], top_p=0.8)).tolist()
            == [[False, True, True, False]])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_greedy_sampling_follows_the_argmax_of_each_step():
    torch.manual_seed(0)
    prior = Prior(TINY).eval()
    ids, mask = _caption()
    got = sample_image_tokens(prior, ids, mask, temperature=0)
    assert got.shape == (2, 3, 3)
    tokens = torch.zeros(2, 0, dtype=torch.long)
    for _ in range(9):
        tokens = torch.cat([tokens, prior.next_image_logits(ids, mask, tokens).argmax(-1, keepdim=True)], 1)
    assert torch.equal(got.flatten(1), tokens)
    # top_k=1 at any temperature is greedy too.
    assert torch.equal(sample_image_tokens(prior, ids, mask, temperature=1.5, top_k=1), got)


def test_seeds_repeat_and_differ():
    torch.manual_seed(1)
    prior = Prior(TINY).eval()
    ids, mask = _caption()
    a = sample_image_tokens(prior, ids, mask, seed=3)
    assert torch.equal(a, sample_image_tokens(prior, ids, mask, seed=3))
    assert not torch.equal(a, sample_image_tokens(prior, ids, mask, seed=4))
    assert int(a.min()) >= 0 and int(a.max()) < TINY.image_vocab


def _prime(prior, ids, mask, k):
    return sample_image_tokens(prior, ids, mask, seed=99).flatten(1)[:, :k]


@pytest.mark.parametrize("attention", ["sparse", "full"])
def test_cached_and_uncached_sampling_draw_the_same_tokens(attention):
    """Under the row/column/conv masks too, with guidance, priming and several samples per prompt."""
    torch.manual_seed(2)
    shape = PriorShape(text_vocab=40, image_vocab=10, text_len=5, grid=4, dim=32, depth=4, heads=4,
                       attention=attention, conv_kernel=3)
    prior = Prior(shape).eval()
    ids, mask = _caption()
    for kwargs in ({"seed": 5}, {"seed": 7, "top_k": 4, "top_p": 0.9, "temperature": 0.8},
                   {"seed": 1, "guidance_scale": [3.0, 1.0]},
                   {"seed": [4, 5, 6, 7, 8, 9], "samples_per_prompt": 3},
                   {"seed": 2, "prime": _prime(prior, ids, mask, 6), "guidance_scale": 2.0,
                    "samples_per_prompt": 2}):
        cached = sample_image_tokens(prior, ids, mask, **kwargs)
        uncached = sample_image_tokens(prior, ids, mask, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), kwargs


def test_cached_logits_match_the_full_forward_at_every_position():
    torch.manual_seed(3)
    shape = PriorShape(text_vocab=40, image_vocab=10, text_len=5, grid=4, dim=32, depth=4, heads=4,
                       attention="sparse")
    prior = Prior(shape).eval()
    ids, mask = _caption()
    image = torch.randint(0, 10, (2, 16))
    cache = prior.new_cache(2, device="cpu", dtype=torch.float32)
    got = [prior.extend(cache, prior.embed(ids, mask, image[:, :0]))]
    for i in range(15):
        got.append(prior.extend(cache, prior.embed_image_token(image[:, i], i)))
    for i in range(16):
        want = prior.next_image_logits(ids, mask, image[:, :i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_priming_keeps_the_given_rows_and_samples_per_prompt_are_independent():
    torch.manual_seed(4)
    prior = Prior(TINY).eval()
    ids, mask = _caption()
    prime = torch.tensor([[1, 2, 3], [4, 5, 6]])  # the top row of a 3×3 grid
    out = sample_image_tokens(prior, ids, mask, prime=prime, samples_per_prompt=4, seed=0)
    assert out.shape == (8, 3, 3)
    assert torch.equal(out[:, 0], prime.repeat_interleave(4, 0))
    assert len({tuple(r.flatten().tolist()) for r in out[:4]}) > 1  # candidates differ
    with pytest.raises(ValueError, match="prime"):
        sample_image_tokens(prior, ids, mask, prime=torch.zeros(2, 9, dtype=torch.long))


def test_an_image_depends_on_its_seed_not_on_its_batch():
    torch.manual_seed(5)
    prior = Prior(TINY).eval()
    ids, mask = _caption()
    both = sample_image_tokens(prior, ids, mask, seed=[11, 12], top_k=5)
    alone = sample_image_tokens(prior, ids[1:], mask[1:], seed=[12], top_k=5)
    assert torch.equal(both[1], alone[0])


def test_guidance_moves_samples_towards_the_caption():
    """With a huge scale the guided distribution concentrates on tokens the caption makes more
    likely than the caption-free branch does; at scale 1 the rows equal plain sampling."""
    torch.manual_seed(6)
    prior = Prior(TINY).eval()
    ids, mask = _caption()
    plain = sample_image_tokens(prior, ids, mask, seed=3)
    assert torch.equal(plain, sample_image_tokens(prior, ids, mask, seed=3, guidance_scale=1.0))
    greedy_guided = sample_image_tokens(prior, ids, mask, temperature=0, guidance_scale=50.0)
    cond = prior.next_image_logits(ids, mask, torch.zeros(2, 0, dtype=torch.long))
    uncond = prior.next_image_logits(torch.zeros_like(ids), torch.zeros_like(mask),
                                     torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(greedy_guided.flatten(1)[:, 0], (cond + 49 * (cond - uncond)).argmax(-1))
