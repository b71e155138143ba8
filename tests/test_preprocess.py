"""Per-sample rules, the truncation-tolerant tar reader and the shard plan, without Ray."""

import io
import tarfile

import pyarrow as pa
import pytest
from corpus import bad_samples, good_samples, tar_bytes
from PIL import Image

from tessera.data import plan
from tessera.data.preprocess import RAW_SCHEMA, REASONS, Rules, assign_split, process_table
from tessera.data.tar import TarReadResult, iter_tar_samples, write_tar

RULES = Rules(resolution=32, max_image_pixels=4_000_000)


def raw_table(samples):
    rows = {n: [] for n in RAW_SCHEMA.names}
    for i, (key, files) in enumerate(samples):
        img = next((files[e] for e in ("jpg", "png", "webp", "gif") if e in files), None)
        for n, v in dict(key=key, order=i, image=img, caption=files.get("txt"), meta=None, split=None,
                         reason=None).items():
            rows[n].append(v)
    return pa.table(rows, schema=RAW_SCHEMA)


def test_every_bad_kind_gets_its_reason_and_good_ones_are_resized():
    bad, expected = bad_samples()
    out = process_table(raw_table(bad + good_samples(6)), RULES).to_pylist()
    got = {}
    for row in out:
        if row["reason"]:
            got[row["reason"]] = got.get(row["reason"], 0) + 1
            assert row["image"] is None and row["caption"] is None
    assert got == expected
    assert set(got) <= set(REASONS)
    kept = [r for r in out if not r["reason"]]
    assert len(kept) == 6
    for r in kept:
        im = Image.open(io.BytesIO(r["image"]))
        assert im.size == (32, 32) and im.mode == "RGB" and im.format == "PNG"


def test_transparent_pixels_become_white_and_crop_is_centred():
    im = Image.new("RGBA", (96, 48), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (36, 0, 60, 48))  # a red band in the centre third
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    row = process_table(raw_table([("t", {"png": buf.getvalue(), "txt": b"red band"})]), RULES).to_pylist()[0]
    out = Image.open(io.BytesIO(row["image"])).convert("RGB")
    assert out.getpixel((16, 16))[0] > 200 and out.getpixel((16, 16))[1] < 60  # centre is red
    assert min(out.getpixel((1, 16))) > 200  # transparent edge is white, not black


def test_filters_min_side_and_caption_length():
    rules = Rules(resolution=32, min_side=100, max_caption_chars=26)  # "a photo of thing number 0": 25
    samples = good_samples(2)
    samples[1][1]["txt"] = b"this caption is far too long"
    reasons = [r["reason"] for r in process_table(raw_table(samples), rules).to_pylist()]
    assert reasons == ["too_small", "caption_too_long"]


def test_split_is_stable_and_near_fraction():
    keys = [f"k{i}" for i in range(4000)]
    splits = [assign_split(k, val_fraction=0.1, seed=3) for k in keys]
    assert splits == [assign_split(k, val_fraction=0.1, seed=3) for k in keys]
    assert 300 < splits.count("val") < 500
    assert assign_split("k1", val_fraction=0.0, seed=0) == "train"


def test_tar_reader_keeps_samples_before_truncation():
    data = tar_bytes(good_samples(5))
    result = TarReadResult()
    assert len(list(iter_tar_samples(io.BytesIO(data), result))) == 5 and not result.truncated
    for cut in (700, len(data) // 2):
        result = TarReadResult()
        got = list(iter_tar_samples(io.BytesIO(data[:cut]), result))
        assert result.truncated, cut
        assert all({"txt", "json"} <= set(s.files) for s in got)
        assert len(got) < 5
    # Cut inside the zero padding after the last member: every sample is complete.
    result = TarReadResult()
    assert len(list(iter_tar_samples(io.BytesIO(data[: len(data) - 3000]), result))) == 5
    result = TarReadResult()
    assert list(iter_tar_samples(io.BytesIO(b"this is not a tar file at all" * 40), result)) == []
    assert result.truncated


def test_tar_reader_splits_repeated_keys_and_writer_is_deterministic():
    s = good_samples(2)
    result = TarReadResult()
    got = list(iter_tar_samples(io.BytesIO(tar_bytes([s[0], s[0], s[1]])), result))
    assert [g.key for g in got] == [s[0][0], s[0][0], s[1][0]]
    assert write_tar(s) == write_tar(s)
    with tarfile.open(fileobj=io.BytesIO(write_tar(s))) as tf:
        assert tf.getnames()[0] == f"{s[0][0]}.jpg"


@pytest.mark.parametrize("blocks, per_shard", [([3, 0, 4], 5), ([1000] * 7, 1000), ([999, 2, 1], 10),
                                               ([0, 0], 3), ([17] * 88, 64)])
def test_plan_shards_exact_sizes_in_order(blocks, per_shard):
    shards = plan.plan_shards(blocks, per_shard)
    sizes = [sum(s.stop - s.start for s in sh) for sh in shards]
    assert sum(sizes) == sum(blocks)
    assert all(n == per_shard for n in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= per_shard)
    flat = [(s.block, i) for sh in shards for s in sh for i in range(s.start, s.stop)]
    assert flat == [(b, i) for b, n in enumerate(blocks) for i in range(n)]  # every row once, in order


def test_plan_shards_at_cluster_scale():
    # 22 nodes x 8 read tasks producing uneven blocks: still exact, still cheap to plan.
    blocks = [(i * 7919) % 5000 for i in range(22 * 8 * 50)]
    shards = plan.plan_shards(blocks, 10_000)
    assert len(shards) == -(-sum(blocks) // 10_000)
    with pytest.raises(ValueError):
        plan.plan_shards([1], 0)
