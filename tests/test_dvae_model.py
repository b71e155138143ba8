import math

import pytest
import torch

from tessera.models.dvae import (
    DVAE,
    NAMED_SHAPES,
    DVAEShape,
    codebook_usage,
    logit_laplace_nll,
    map_pixels,
    psnr,
    unmap_pixels,
)

TINY = DVAEShape(image_size=32, num_tokens=64, grid_size=8, hidden=16, blocks_per_group=1, decoder_init=16)


def test_shapes_of_encode_decode_and_named_sizes():
    torch.manual_seed(0)
    m = DVAE(TINY)
    x = torch.rand(2, 3, 32, 32)
    tokens = m.encode(x)
    assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.int64 and int(tokens.max()) < 64
    y = m.decode(tokens)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert NAMED_SHAPES["paper"].groups == 4 and NAMED_SHAPES["paper"].grid_size == 32
    assert (NAMED_SHAPES["paper"].num_tokens == 8192 and NAMED_SHAPES["debug"].groups == 3
            and NAMED_SHAPES["debug"].grid_size == 8)
    with pytest.raises(ValueError, match="power of two"):
        DVAEShape(image_size=48, grid_size=16)


def test_encode_is_deterministic_argmax():
    m = DVAE(TINY)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(m.encode(x), m.encode(x))
    assert torch.equal(m.encode(x), m.encoder(map_pixels(x)).argmax(1))


def test_pixel_mapping_and_logit_laplace():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    xm = map_pixels(x)
    assert float(xm.min()) >= 0.1 and float(xm.max()) <= 0.9
    # NLL is lowest when μ = logit(x) and matches the closed form there: log(2b x(1-x)).
    logit = torch.log(xm) - torch.log1p(-xm)
    exact = torch.cat([logit, torch.zeros_like(logit)], 1)
    assert logit_laplace_nll(exact, xm) < logit_laplace_nll(
        exact + 0.5 * torch.cat([torch.ones_like(logit), torch.zeros_like(logit)], 1), xm)
    expected = (math.log(2) + torch.log(xm * (1 - xm))).mean()
    assert torch.allclose(logit_laplace_nll(exact, xm), expected, atol=1e-5)


def test_kl_is_zero_for_uniform_logits_and_loss_backprops():
    m = DVAE(TINY)
    for p in m.encoder.net[-1].parameters():
        torch.nn.init.zeros_(p)  # all-zero logits: q is uniform
    out = m(torch.rand(2, 3, 32, 32), tau=1.0, beta=6.6)
    assert abs(float(out["kl"].detach())) < 1e-5
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_metrics():
    a = torch.zeros(1, 3, 4, 4)
    assert float(psnr(a, a + 0.1)) == pytest.approx(20.0, abs=1e-4)
    ppl, used = codebook_usage(torch.tensor([[0, 1], [2, 3]]), 8)
    assert ppl == pytest.approx(4.0) and used == pytest.approx(0.5)


def test_a_few_steps_learn_on_flat_colour_images():
    torch.manual_seed(0)
    m = DVAE(TINY)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    x = torch.zeros(16, 3, 32, 32)
    for i in range(16):
        x[i, i % 3] = 0.2 + 0.05 * i
    before = float(psnr(m.decode(m.encode(x)), x))
    for _ in range(120):
        loss = m(x, tau=1.0, beta=0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(psnr(m.decode(m.encode(x)), x))
    assert after > before + 5  # measured: 7.1 -> 15.6 dB (the 1×1 decoder kernel of before: 16.3)


def test_logit_scale_sharpens_the_posterior_but_not_the_tokens():
    torch.manual_seed(0)
    m = DVAE(TINY)
    x = torch.rand(2, 3, 32, 32)
    plain, sharp = m(x, tau=1.0, beta=0.0), m(x, tau=1.0, beta=0.0, logit_scale=5.0)
    assert torch.allclose(sharp["logits"], 5 * plain["logits"], rtol=1e-5, atol=1e-6)
    assert float(sharp["kl"]) > float(plain["kl"])  # further from uniform
    assert torch.equal(sharp["logits"].argmax(1), m.encode(x))


def _conv_kernels(block) -> list[int]:
    return [m.kernel_size[0] for m in block.res_path if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("size", ["debug", "small", "paper"])
def test_resblocks_have_the_released_dall_e_kernels(size):
    """OpenAI's released dall_e code (encoder.py / decoder.py): EncoderBlock.res_path is conv_1 3×3,
    conv_2 3×3, conv_3 3×3, conv_4 1×1; DecoderBlock.res_path is conv_1 1×1, conv_2 3×3, conv_3 3×3,
    conv_4 3×3; each with hidden width n_out / 4 and post_gain = 1 / n_layers², n_layers =
    group_count × n_blk_per_group. The encoder opens with a 7×7 conv and ends with a 1×1 to the
    vocabulary; the decoder opens with a 1×1 from the vocabulary and ends with a 1×1."""
    from tessera.models.dvae import _Block

    shape = NAMED_SHAPES[size]
    model = DVAE(shape) if size != "paper" else None
    if model is None:  # the paper size is too big to build here often; its blocks on the meta device
        with torch.device("meta"):
            model = DVAE(shape)
    enc = [m for m in model.encoder.net if isinstance(m, _Block)]
    dec = [m for m in model.decoder.net if isinstance(m, _Block)]
    assert len(enc) == len(dec) == shape.groups * shape.blocks_per_group
    assert all(_conv_kernels(b) == [3, 3, 3, 1] for b in enc)
    assert all(_conv_kernels(b) == [1, 3, 3, 3] for b in dec)
    gain = 1 / (shape.groups * shape.blocks_per_group) ** 2
    assert all(b.post_gain == gain for b in enc + dec)
    first, last = model.encoder.net[0], model.encoder.net[-1]
    assert (first.kernel_size, last.kernel_size, last.out_channels) == ((7, 7), (1, 1), shape.num_tokens)
    first, last = model.decoder.net[0], model.decoder.net[-1]
    assert (first.kernel_size, first.in_channels, last.kernel_size) == ((1, 1), shape.num_tokens, (1, 1))


def test_an_export_from_before_the_decoder_kernel_field_still_loads():
    """Exports written when the decoder block's last conv was 1×1 have no decoder_kernel in their
    shape; they load as what they are."""
    from dataclasses import asdict, replace

    from safetensors.torch import save

    from tessera import artifacts

    old = DVAE(replace(NAMED_SHAPES["debug"], decoder_kernel=1))
    shape = asdict(old.shape)
    del shape["decoder_kernel"]
    meta = {"kind": "tessera.dvae", "shape": shape}
    loaded = artifacts.build("dvae", meta, save(old.state_dict()), where="old.json")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(x), old.eval().encode(x))
    with pytest.raises(artifacts.ArtifactError, match="old.json"):
        artifacts.build("dvae", {**meta, "shape": {**shape, "decoder_kernel": 3}}, save(old.state_dict()),
                        where="old.json")


def test_convolutions_start_as_in_the_released_code():
    """OpenAI's released dall_e `Conv2d` (dall_e/utils.py) starts every convolution with
    `w.normal_(std=1 / ((self.n_in * self.kw ** 2) ** (1/2)))` and `b = torch.zeros((self.n_out,))`;
    init="torch" keeps PyTorch's default (kaiming-uniform, a third of that variance, nonzero biases)."""
    torch.manual_seed(0)
    shape = NAMED_SHAPES["small"]
    for init, ratio in (("released", 1.0), ("torch", 1 / 3)):
        convs = [m for m in DVAE(shape, init=init).modules() if isinstance(m, torch.nn.Conv2d)]
        big = [c for c in convs if c.weight.numel() >= 4096]
        assert len(big) > 20
        for c in big:
            fan_in = c.in_channels * c.kernel_size[0] * c.kernel_size[1]
            var = float(c.weight.var()) * fan_in
            assert abs(var - ratio) < 0.15 * ratio, (init, c, var)
        biases_zero = all(float(c.bias.abs().max()) == 0 for c in convs)
        assert biases_zero == (init == "released")
    with pytest.raises(ValueError, match="init"):
        DVAE(TINY, init="xavier")
