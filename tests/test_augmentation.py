"""The paper's data augmentation as pure functions (no Ray): the dVAE's random crops (Listing 1),
encode's views (Listing 2) and BPE-dropout on captions. The Ray pipelines that apply them are
tested in test_loader.py, test_token_loader.py and test_encode.py."""

import numpy as np
import pyarrow as pa
import pytest

from tessera.config import ConfigError, load_config
from tessera.data.loader import Crops, sample_rng
from tessera.training.ray_io import dvae_crops

H, W = 160, 240  # a landscape source: s_min = 160, slack of 80 along x


def coordinates() -> np.ndarray:
    """uint8 (H, W, 3): red is the pixel's x, green its y, so a crop tells where it came from."""
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)


def source_columns(crop: np.ndarray) -> np.ndarray:
    """The source x of each output column (red along the middle row)."""
    return crop[crop.shape[0] // 2, :, 0].astype(int)


def test_listing_1_crops_two_thirds_to_eight_ninths_of_the_short_side_and_flips_half():
    """Listing 1 (paper, "image preprocessing code for training dVAE"):
        s_min = tf.minimum(h, w)
        img = tf.image.random_crop(img, 2 * [s_min] + [3])
        t_min = tf.minimum(s_min, round(9 / 8 * target_res))
        t_max = tf.minimum(s_min, round(12 / 8 * target_res))
        t = tf.random.uniform([], t_min, t_max + 1, dtype=tf.int32)
        img = tf.image.resize_images(img, [t, t], method=tf.image.ResizeMethod.AREA, ...)
        img = tf.image.random_crop(img, 2 * [target_res] + [channel_count])
        return tf.image.random_flip_left_right(img)
    Here s_min = 160 > t_max: the final crop covers target/t of the square, 64/96 to 64/72."""
    crops = Crops(size=64, scale=(9 / 8, 12 / 8), flip=True)
    spans, flipped = [], 0
    for i in range(400):
        cols = source_columns(crops.crop(coordinates(), sample_rng(0, 0, i)))
        spans.append(abs(cols[-1] - cols[0]) + 1)  # source columns the 64 output columns span
        flipped += cols[0] > cols[-1]
        assert 0 <= cols.min() and cols.max() < W
    spans = np.array(spans) / 160
    assert 2 / 3 - 0.02 <= spans.min() < 0.70 and 0.86 < spans.max() <= 8 / 9 + 0.02
    assert 150 < flipped < 250  # random_flip_left_right: about half


def test_listing_2_views_keep_a_central_square_and_never_flip():
    """Listing 2 (paper, "image preprocessing code for training the transformer"):
        off_w = tf.random.uniform([], 3 * (w - s_min) // 8,
            tf.maximum(3 * (w - s_min) // 8 + 1, 5 * (w - s_min) // 8), dtype=tf.int32)
        # Random full square crop.
        t_max = tf.minimum(s_min, round(9 / 8 * target_res))
        t = tf.random.uniform([], target_res, t_max + 1, dtype=tf.int32)
        # We don't use hflip aug since the image may contain text.
    With a slack of 80 the square starts at x in [30, 50); the final crop keeps 8/9 to all of it."""
    crops = Crops(size=64, scale=(1, 9 / 8), central=True)
    for i in range(200):
        cols = source_columns(crops.crop(coordinates(), sample_rng(0, 0, i)))
        assert cols[0] < cols[-1]  # never flipped
        assert 30 <= cols[0] and cols[-1] <= 49 + 159
        assert abs(cols[-1] - cols[0]) + 1 >= 8 / 9 * 160 - 2


def test_crops_repeat_for_the_same_seed_and_epoch_and_differ_across_epochs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ids = rng.integers(-2**63, 2**63 - 1, 16, dtype=np.int64)
    crops = Crops(size=32, scale=(9 / 8, 12 / 8), flip=True, seed=7)
    epoch0 = crops.crop_batch(images, ids, draw=0)
    assert epoch0.shape == images.shape and epoch0.dtype == np.uint8
    assert np.array_equal(epoch0, crops.crop_batch(images, ids, draw=0))
    # Each sample's crop depends on its own id only, not on its batch or position in it.
    assert np.array_equal(epoch0[::-1], crops.crop_batch(images[::-1], ids[::-1], draw=0))
    epoch1 = crops.crop_batch(images, ids, draw=1)
    assert sum(not np.array_equal(a, b) for a, b in zip(epoch0, epoch1, strict=True)) >= 14
    other_seed = Crops(size=32, scale=(9 / 8, 12 / 8), flip=True, seed=8).crop_batch(images, ids, draw=0)
    assert not np.array_equal(epoch0, other_seed)
    for image, crop in zip(images, epoch0, strict=True):  # enlarged parts of the image, not noise
        assert image.min() <= crop.mean() <= image.max()


def test_a_crop_of_scale_one_without_flip_is_the_image_itself():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = Crops(size=32, scale=(1, 1)).crop(image, sample_rng(3, 0, 5))
    assert np.array_equal(out, image)
    with pytest.raises(ValueError, match="1 <= low <= high"):
        Crops(size=32, scale=(0.9, 1.2))


def test_paper_scale_crops_cut_shapes_objects_and_view_scale_keeps_them():
    """Why dvae.augment is off for the shapes sizes and encode.view_scale defaults to Listing 2's:
    prepared shapes images are already at the model's resolution, so the crop window is 1/scale
    of the frame. At Listing 1's 9/8..12/8 a sizeable share of objects is cut to less than half;
    at Listing 2's 1..9/8 virtually none is."""
    from tessera.data.shapes import render_sample

    yy, xx = np.mgrid[0:32, 0:32]
    where = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)  # red: x, green: y

    def kept_fractions(scale) -> np.ndarray:
        crops, out = Crops(size=32, scale=scale), []
        for i in range(150):
            objects = render_sample(i, seed=0, image_size=32).attributes["objects"]
            for j, (x0, y0, x1, y1) in enumerate(o["bbox"] for o in objects):
                for draw in range(5):
                    c = crops.crop(where, sample_rng(i, j, draw)).astype(int)  # the window it shows
                    ix = max(0, min(x1, c[..., 0].max() + 1) - max(x0, c[..., 0].min()))
                    iy = max(0, min(y1, c[..., 1].max() + 1) - max(y0, c[..., 1].min()))
                    out.append(ix * iy / ((x1 - x0) * (y1 - y0)))
        return np.array(out)

    assert np.mean(kept_fractions((9 / 8, 12 / 8)) < 0.5) > 0.08
    listing2 = kept_fractions((1, 9 / 8))
    assert np.mean(listing2 < 0.5) < 0.01 and listing2.mean() > 0.97


def test_dvae_augment_defaults_on_for_the_paper_size_only():
    """Paper §A.2: "The dVAE is trained on the same dataset as the transformer, using the data
    augmentation code given in Listing 1." — on where the paper's shape (256 px) is trained."""
    assert dvae_crops(load_config("debug")) is None  # shapes at 32 px: off (see the test above)
    assert dvae_crops(load_config("single_gpu")) is None
    paper = dvae_crops(load_config("cluster"))
    assert paper == Crops(size=256, scale=(9 / 8, 12 / 8), flip=True, seed=0)
    on = dvae_crops(load_config("debug", ["dvae.augment=true", "dvae.augment_scale=[1, 1.125]",
                                          "loader.shuffle_seed=4"]))
    assert on == Crops(size=32, scale=(1, 1.125), flip=True, seed=4)
    assert dvae_crops(load_config("cluster", ["dvae.augment=false"])) is None
    with pytest.raises(ConfigError, match="dvae: .*augment_scale"):
        load_config("debug", ["dvae.augment_scale=[0.5, 1]"])
    with pytest.raises(ConfigError, match="encode: .*view_scale"):
        load_config("debug", ["encode.view_scale=[1.2, 1.1]"])


# ── BPE-dropout ──────────────────────────────────────────────────────────────────────────────

CAPTION = "a large green triangle on the left"


@pytest.fixture(scope="module")
def tokenizer():
    from tessera.data.shapes import render_sample
    from tessera.data.tokenizer import CaptionTokenizer, train_tokenizer

    captions = [render_sample(i, seed=0, image_size=32).caption for i in range(2000)]
    return CaptionTokenizer(train_tokenizer(captions, vocab_size=1024)), captions


def test_bpe_dropout_changes_a_captions_ids_for_some_seeds_and_decodes_to_the_same_text(tokenizer):
    """Paper §2.2 and its footnote 5: "we BPE-encode the lowercased caption using at most 256
    tokens" — "During training, we apply 10% BPE dropout (Provilkov et al., 2019), whose use is
    common in the neural machine translation literature."; §B.2: "We also apply 10% BPE dropout
    when BPE-encoding the captions for training." """
    from tessera.data.tokenizer import BPEDropout

    tok, _ = tokenizer
    plain = tok.ids([CAPTION])[0]
    dropout = BPEDropout(tok, 0.1)
    draws = [dropout.ids([CAPTION], [seed])[0] for seed in range(20)]
    assert sum(d != plain for d in draws) >= 5  # the caption's words are several merges deep
    assert all(len(d) >= len(plain) for d in draws)  # skipped merges only ever split words
    assert all(tok.tokenizer.decode(d).strip() == CAPTION for d in draws)
    assert dropout.ids([CAPTION] * 3, [4, 4, 5])[:2] == [draws[4], draws[4]]  # seeded per caption


def test_bpe_dropout_at_p_zero_is_the_tokenizer_and_near_zero_segments_as_bpe_does(tokenizer):
    from tessera.data.tokenizer import BPEDropout

    tok, captions = tokenizer
    texts = [*captions[:300], "xylophone zebra aaaa <|endoftext|> café 日本 🙂", "  spaced   out  "]
    plain = tok.ids(texts)
    assert BPEDropout(tok, 0.0).ids(texts, range(len(texts))) == plain
    # p > 0 takes the re-segmenting path; with no merge ever skipped it must be BPE itself.
    assert BPEDropout(tok, 1e-12).ids(texts, range(len(texts))) == plain
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BPEDropout(tok, 1.0)


def test_bpe_dropout_longer_than_fit_falls_back_to_the_plain_ids(tokenizer):
    from tessera.data.tokenizer import BPEDropout

    tok, _ = tokenizer
    plain = tok.ids([CAPTION])[0]
    dropout = BPEDropout(tok, 0.5)
    longer = [s for s in range(20) if len(dropout.ids([CAPTION], [s])[0]) > len(plain)]
    assert longer
    assert all(dropout.ids([CAPTION], [s], fit=len(plain))[0] == plain for s in longer)


def _token_table(captions: list[str], tok, views: int = 1) -> pa.Table:
    from tessera.data.token_loader import token_schema

    n = len(captions) * views
    table = {
        "key": [f"k{i // views}" for i in range(n)], "split": ["train"] * n,
        "caption": [c for c in captions for _ in range(views)],
        "text_ids": pa.array([ids for ids in tok.ids(captions) for _ in range(views)], pa.list_(pa.int32())),
        "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 4), pa.int16()), 4),
    }
    if views > 1:
        table["view"] = pa.array(np.tile(np.arange(views), len(captions)), pa.int16())
    return pa.table(table, schema=token_schema(2, views=views))


def test_token_rows_are_resegmented_per_epoch_and_view_and_repeat_for_the_same_epoch(tokenizer):
    from tessera.data.token_loader import CaptionBPEDropout, pad_token_batch

    tok, captions = tokenizer
    table = _token_table(captions[:40], tok, views=2)
    dropout = CaptionBPEDropout(tok.tokenizer.to_str(), 0.1, seed=0, text_len=16)
    rows = {e: dropout.apply(table, epoch=e).column("text_ids").to_pylist() for e in (0, 1)}
    assert rows[0] == dropout.apply(table, epoch=0).column("text_ids").to_pylist()
    assert sum(a != b for a, b in zip(rows[0], rows[1], strict=True)) > 20
    assert sum(a != b for a, b in zip(rows[0][::2], rows[0][1::2], strict=True)) > 10  # views differ
    assert all(len(r) <= 16 for r in rows[0])
    assert [tok.tokenizer.decode(r).strip() for r in rows[1]] == table.column("caption").to_pylist()
    out = pad_token_batch(dropout.apply(table, epoch=1), text_len=16)
    assert out["text_ids"].shape == (80, 16) and out["text_ids"].dtype == np.int32
