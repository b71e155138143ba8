import pytest
import torch

from tessera.models.attention import (
    MaskSpec,
    attend,
    dense_mask,
    flex_available,
    layer_patterns,
    resolve_impl,
)

# [text 0, text 1 ; image (0,0)=2, (0,1)=3, (1,0)=4, (1,1)=5]
HAND = {
    "full": [[1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1, 1]],
    "row": [[1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],   # (1,0): all text, itself; not row 0
            [1, 1, 0, 0, 1, 1]],
    "column": [[1, 0, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [1, 1, 1, 0, 0, 0],
               [1, 1, 0, 1, 0, 0],   # (0,1): all text, itself; not (0,0)
               [1, 1, 1, 0, 1, 0],   # (1,0): (0,0) above it
               [1, 1, 0, 1, 0, 1]],  # (1,1): (0,1) above it
}


@pytest.mark.parametrize("pattern", sorted(HAND))
def test_masks_on_a_2x2_grid_match_hand_computed(pattern):
    got = dense_mask(MaskSpec(text_len=2, grid=2, pattern=pattern))
    assert got.dtype == torch.bool
    assert got.int().tolist() == HAND[pattern]


def test_conv_mask_is_a_causal_kxk_window():
    # 1 text token, 3x3 grid: image (r, c) sits at position 1 + 3r + c.
    m = dense_mask(MaskSpec(text_len=1, grid=3, pattern="conv", kernel=3))
    keys = {q: set(torch.nonzero(m[q]).flatten().tolist()) for q in range(10)}
    assert keys[5] == {0, 1, 2, 3, 4, 5}   # (1,1): whole row 0, (1,0), itself
    assert keys[7] == {0, 4, 5, 7}         # (2,0): (1,0), (1,1), itself; not (1,2)
    assert keys[9] == {0, 5, 6, 8, 9}      # (2,2): (1,1), (1,2), (2,1), itself
    only_self = dense_mask(MaskSpec(text_len=1, grid=3, pattern="conv", kernel=1))
    assert torch.nonzero(only_self[9]).flatten().tolist() == [0, 9]


def test_paper_layer_schedule():
    assert layer_patterns(8, "sparse") == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    assert layer_patterns(3, "full") == ["full"] * 3
    with pytest.raises(ValueError, match="attention"):
        layer_patterns(3, "axial")


def test_masks_are_built_once_per_shape():
    spec = MaskSpec(text_len=4, grid=3, pattern="row")
    assert dense_mask(spec) is dense_mask(MaskSpec(text_len=4, grid=3, pattern="row"))


def test_bad_specs_name_what_is_wrong():
    with pytest.raises(ValueError, match="pattern"):
        MaskSpec(text_len=2, grid=2, pattern="diagonal")
    with pytest.raises(ValueError, match="odd"):
        MaskSpec(text_len=2, grid=2, pattern="conv", kernel=4)


def _qkv(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, spec.seq_len, 8, generator=g, requires_grad=True) for _ in range(3)]


def _reference(q, k, v, mask):
    """Attention written out: softmax over allowed keys only."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
def test_dense_path_is_masked_softmax_attention(pattern):
    spec = MaskSpec(text_len=3, grid=4, pattern=pattern)
    q, k, v = _qkv(spec)
    torch.testing.assert_close(attend(q, k, v, spec, "dense"), _reference(q, k, v, dense_mask(spec)))


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
def test_flex_block_mask_agrees_with_dense(pattern):
    # Forward only: torch 2.13 has no FlexAttention backward on CPU (the gpu tests cover gradients).
    spec = MaskSpec(text_len=3, grid=4, pattern=pattern)
    q, k, v = (t.detach() for t in _qkv(spec, seed=1))
    flex = attend(q, k, v, spec, "flex", compiled=False)
    torch.testing.assert_close(flex, attend(q, k, v, spec, "dense"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_compiled_flex_agrees_with_dense():
    spec = MaskSpec(text_len=3, grid=4, pattern="conv")
    q, k, v = (t.detach() for t in _qkv(spec, seed=2))
    torch.testing.assert_close(attend(q, k, v, spec, "flex"), attend(q, k, v, spec, "dense"),
                               atol=1e-5, rtol=1e-5)


def test_auto_picks_dense_on_cpu():
    assert resolve_impl("auto", "cpu") == "dense"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("sparse", "cpu")
