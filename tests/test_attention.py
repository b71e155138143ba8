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
            [1, 1, 1, 1, 1, 0],   # (1,0): all text, itself and the G = 2 before it, wrapping to row 0
            [1, 1, 0, 1, 1, 1]],  # (1,1): (0,1), (1,0), itself; not (0,0), 3 back
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


def _image_keys(spec, r, c):
    """The image cells (row, col) that image query (r, c) attends to."""
    G, T = spec.grid, spec.text_len
    row = dense_mask(spec)[T + r * G + c, T:]
    return {(int(i) // G, int(i) % G) for i in torch.nonzero(row).flatten()}


def test_conv_mask_is_a_causal_kxk_window_that_wraps_around_the_grid_edges():
    """Fig. 11 (DALL·E, appendix B.1): "Mask (d) corresponds to a causal convolutional attention
    pattern with wraparound behavior (similar to the row attention) and a 3 × 3 kernel.\""""
    spec = MaskSpec(text_len=1, grid=5, pattern="conv", kernel=3)
    # Inside the grid: the row above (left, centre, right), the left neighbour, itself.
    assert _image_keys(spec, 2, 2) == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}
    # At the left edge the "left" cells wrap to the end of the row above (and of the one above that).
    assert _image_keys(spec, 2, 0) == {(0, 4), (1, 0), (1, 1), (1, 4), (2, 0)}
    # At the right edge the "right" cell above wraps to the start of this query's own row.
    assert _image_keys(spec, 2, 4) == {(1, 3), (1, 4), (2, 0), (2, 3), (2, 4)}
    # Text: every image query sees all of it.
    assert bool(dense_mask(spec)[1 + 2 * 5 + 2, 0])
    only_self = MaskSpec(text_len=1, grid=3, pattern="conv", kernel=1)
    assert torch.nonzero(dense_mask(only_self)[9]).flatten().tolist() == [0, 9]


@pytest.mark.parametrize(("pattern", "kernel", "image_keys"),
                         [("row", 11, 32 + 1), ("column", 11, 31 + 1), ("conv", 11, 5 * 11 + 5 + 1)])
def test_paper_scale_masks_give_every_late_image_query_the_same_number_of_keys(pattern, kernel, image_keys):
    """At the paper's size (256 text tokens, a 32×32 grid, an 11×11 conv kernel) the image part of a
    mask is a fixed set of raster offsets: every image query far enough from the start sees all 256
    text tokens and exactly `image_keys` image tokens (row: itself and the 32 before; column: the 31
    above and itself; conv: 5 rows of 11 above, 5 to the left, itself)."""
    spec = MaskSpec(text_len=256, grid=32, pattern=pattern, kernel=kernel)
    m = dense_mask(spec)
    late = m[256 + 31 * 32:]  # the last grid row's queries
    assert late[:, :256].all()
    assert late[:, 256:].sum(1).tolist() == [image_keys] * 32


def test_paper_layer_schedule_of_64_layers():
    """DALL·E, appendix B.1: "The convolutional attention mask (Figure 11(d)) is only used in the last
    self-attention layer. Otherwise, given the index i of a self-attention layer (with i ∈ [1, 63]), we
    use the column attention mask (Figure 11(c)) if i − 2 mod 4 = 0, and row attention otherwise. E.g.,
    the first four self-attention layers use "row, column, row, row", respectively.\""""
    column_layers = {2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62}  # i − 2 ≡ 0 (mod 4)
    want = ["conv" if i == 64 else "column" if i in column_layers else "row" for i in range(1, 65)]
    got = layer_patterns(64, "sparse")
    assert got == want
    assert got[:4] == ["row", "column", "row", "row"]  # the paper's own example
    assert got.count("column") == 16 and got.count("row") == 47 and got.count("conv") == 1


def test_layer_schedule_at_other_depths():
    assert layer_patterns(8, "sparse") == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_patterns(1, "sparse") == ["conv"]
    assert layer_patterns(3, "full") == ["full"] * 3
    with pytest.raises(ValueError, match="attention"):
        layer_patterns(3, "axial")


# Fig. 11's example: "a hypothetical version of our transformer with a maximum text length of 6 tokens
# and image length of 16 tokens (i.e., corresponding to a 4 × 4 grid)". Query rows, key columns;
# '#' attends; columns grouped as [6 text | grid row 0 | row 1 | row 2 | row 3].
FIG11 = {
    # (a) "row attention in which each image token attends to the previous 5 image tokens in raster
    # order. The extent is chosen to be 5, so that the last token being attended to is the one in the
    # same column of the previous row."
    "row": [
        "#..... .... .... .... ....",
        "##.... .... .... .... ....",
        "###... .... .... .... ....",
        "####.. .... .... .... ....",
        "#####. .... .... .... ....",
        "###### .... .... .... ....",
        "###### #... .... .... ....",
        "###### ##.. .... .... ....",
        "###### ###. .... .... ....",
        "###### #### .... .... ....",
        "###### #### #... .... ....",
        "###### .### ##.. .... ....",
        "###### ..## ###. .... ....",
        "###### ...# #### .... ....",
        "###### .... #### #... ....",
        "###### .... .### ##.. ....",
        "###### .... ..## ###. ....",
        "###### .... ...# #### ....",
        "###### .... .... #### #...",
        "###### .... .... .### ##..",
        "###### .... .... ..## ###.",
        "###### .... .... ...# ####",
    ],
    # (b) "Column attention mask": the same grid column, earlier rows and itself.
    "column": [
        "#..... .... .... .... ....",
        "##.... .... .... .... ....",
        "###... .... .... .... ....",
        "####.. .... .... .... ....",
        "#####. .... .... .... ....",
        "###### .... .... .... ....",
        "###### #... .... .... ....",
        "###### .#.. .... .... ....",
        "###### ..#. .... .... ....",
        "###### ...# .... .... ....",
        "###### #... #... .... ....",
        "###### .#.. .#.. .... ....",
        "###### ..#. ..#. .... ....",
        "###### ...# ...# .... ....",
        "###### #... #... #... ....",
        "###### .#.. .#.. .#.. ....",
        "###### ..#. ..#. ..#. ....",
        "###### ...# ...# ...# ....",
        "###### #... #... #... #...",
        "###### .#.. .#.. .#.. .#..",
        "###### ..#. ..#. ..#. ..#.",
        "###### ...# ...# ...# ...#",
    ],
    # (d) "a causal convolutional attention pattern with wraparound behavior (similar to the row
    # attention) and a 3 × 3 kernel": raster offsets 0, 1 (left) and G−1, G, G+1 (the row above).
    "conv": [
        "#..... .... .... .... ....",
        "##.... .... .... .... ....",
        "###... .... .... .... ....",
        "####.. .... .... .... ....",
        "#####. .... .... .... ....",
        "###### .... .... .... ....",
        "###### #... .... .... ....",
        "###### ##.. .... .... ....",
        "###### .##. .... .... ....",
        "###### #.## .... .... ....",
        "###### ##.# #... .... ....",
        "###### ###. ##.. .... ....",
        "###### .### .##. .... ....",
        "###### ..## #.## .... ....",
        "###### ...# ##.# #... ....",
        "###### .... ###. ##.. ....",
        "###### .... .### .##. ....",
        "###### .... ..## #.## ....",
        "###### .... ...# ##.# #...",
        "###### .... .... ###. ##..",
        "###### .... .... .### .##.",
        "###### .... .... ..## #.##",
    ],
}


@pytest.mark.parametrize("pattern", sorted(FIG11))
def test_masks_on_the_papers_4x4_example_match_figure_11(pattern):
    """DALL·E, Fig. 11: "Illustration of the three types of attention masks for a hypothetical version
    of our transformer with a maximum text length of 6 tokens and image length of 16 tokens (i.e.,
    corresponding to a 4 × 4 grid).\""""
    want = [[ch == "#" for ch in line.replace(" ", "")] for line in FIG11[pattern]]
    assert len(want) == 22 and {len(r) for r in want} == {22}
    got = dense_mask(MaskSpec(text_len=6, grid=4, pattern=pattern, kernel=3))
    assert got.tolist() == want


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


def test_cpu_bf16_attention_scores_in_fp32_and_keeps_the_callers_dtype():
    """Under CPU bf16 autocast the dense path computes the masked softmax in fp32 (CPU's bf16 kernel is
    slow): the result is the fp32 attention of the bf16 inputs, rounded once, and gradients reach q, k, v."""
    spec = MaskSpec(text_len=3, grid=4, pattern="row")
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in _qkv(spec, seed=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, spec, "dense")
    assert out.dtype == torch.bfloat16
    expected = _reference(q.float(), k.float(), v.float(), dense_mask(spec)).bfloat16()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))
