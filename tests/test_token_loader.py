import numpy as np
import pyarrow as pa

from tessera.data.token_loader import pad_token_batch, token_schema


def _table(captions: list[list[int]], grid: int = 2) -> pa.Table:
    n = len(captions)
    tokens = np.arange(n * grid * grid, dtype=np.int16)
    return pa.table({
        "key": [f"k{i}" for i in range(n)],
        "split": ["train"] * n,
        "caption": [f"c{i}" for i in range(n)],
        "text_ids": pa.array(captions, pa.list_(pa.int32())),
        "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens, pa.int16()), grid * grid),
    }, schema=token_schema(grid))


def test_captions_are_padded_truncated_and_masked_and_tokens_kept_in_order():
    out = pad_token_batch(_table([[5, 6, 7], [], [1, 2, 3, 4, 5, 6], [9]]), text_len=4)
    np.testing.assert_array_equal(out["text_ids"], [[5, 6, 7, 0], [0, 0, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0]])
    np.testing.assert_array_equal(out["text_mask"], [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(out["image_tokens"], np.arange(16).reshape(4, 4))
    assert (out["text_ids"].dtype == np.int32 and out["text_mask"].dtype == bool
            and out["image_tokens"].dtype == np.int16)


def test_a_sliced_multi_chunk_table_reads_its_own_rows():
    t = pa.concat_tables([_table([[1], [2, 2]]), _table([[3, 3, 3], [4]])]).slice(1, 2)
    out = pad_token_batch(t, text_len=3)
    np.testing.assert_array_equal(out["text_ids"], [[2, 2, 0], [3, 3, 3]])
    np.testing.assert_array_equal(out["image_tokens"], [[4, 5, 6, 7], [0, 1, 2, 3]])


def _write_token_dataset(uri: str, captions: dict[str, list[str]], tokenizer_json: str | None,
                         views: int = 1) -> dict:
    """Token shards in encode's layout: row r of a split has image tokens all equal to r (its name);
    with views > 1, rows r·views.. are the views of caption r."""
    import io

    import pyarrow.parquet as pq

    from tessera import storage
    from tessera.data.token_loader import MANIFEST_KIND
    from tessera.data.tokenizer import CaptionTokenizer

    splits = {}
    for split, caps in captions.items():
        n = len(caps) * views
        ids = CaptionTokenizer.from_json(tokenizer_json).ids(caps) if tokenizer_json else [[1]] * len(caps)
        columns = {
            "key": [f"{split}-{i // views}" for i in range(n)], "split": [split] * n,
            "caption": [c for c in caps for _ in range(views)],
            "text_ids": pa.array([i for i in ids for _ in range(views)], pa.list_(pa.int32())),
            "image_tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(np.repeat(np.arange(n), 4), pa.int16()), 4),
        }
        if views > 1:
            columns["view"] = pa.array(np.tile(np.arange(views), len(caps)), pa.int16())
        table = pa.table(columns, schema=token_schema(2, views=views))
        path = f"gen/{split}/shard-000000.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(uri, path), buf.getvalue())
        splits[split] = {"num_samples": n, "shards": [{"path": path, "num_samples": n}]}
    manifest = {"kind": MANIFEST_KIND, "format_version": 1, "generation": "gen", "grid_size": 2,
                "num_image_tokens": 16, "text_vocab_size": 1024, "splits": splits, "views": views}
    if tokenizer_json:
        storage.write_text(storage.join(uri, "tokenizer.json"), tokenizer_json)
        manifest["tokenizer"] = {"path": "tokenizer.json"}
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    return manifest


def test_bpe_dropout_resegments_training_captions_each_epoch_and_never_validation(ray_cluster, tmp_path):
    """Paper §B.2: "We also apply 10% BPE dropout when BPE-encoding the captions for training."
    Training rows get a fresh segmentation each epoch (the same again for a dataset built anew),
    each decoding to its caption; validation rows, and p = 0, keep the ids encode wrote."""
    import pytest

    from tessera.config import load_config
    from tessera.data.shapes import render_sample
    from tessera.data.token_loader import build_token_dataset
    from tessera.data.tokenizer import CaptionTokenizer, train_tokenizer

    captions = [render_sample(i, seed=0, image_size=32).caption for i in range(240)]
    tok_json = train_tokenizer(captions * 4, vocab_size=1024).to_str()
    tok = CaptionTokenizer.from_json(tok_json)
    uri = str(tmp_path / "tokens")
    manifest = _write_token_dataset(uri, {"train": captions[:200], "val": captions[200:]}, tok_json)
    stored = {split: tok.encode(caps, text_len=16)[0]
              for split, caps in (("train", captions[:200]), ("val", captions[200:]))}

    def rows(ds) -> dict[int, np.ndarray]:
        out = {}
        for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
            for ids, mask, image in zip(b["text_ids"], b["text_mask"], b["image_tokens"], strict=True):
                assert not ids[~mask].any()
                out[int(image[0])] = ids
        return out

    def config(p: float):
        return load_config("debug", [f"prior.tokens_uri={uri}", f"loader.bpe_dropout={p}",
                                     "loader.text_len=16", "ray.data_cpu_limit=1"])

    ds = build_token_dataset(config(0.1), manifest)
    epochs = [rows(ds), rows(ds)]
    for seen in epochs:
        assert sorted(seen) == list(range(200))
        mask = np.stack([seen[r] for r in range(200)]) != 0
        assert tok.decode(np.stack([seen[r] for r in range(200)]), mask) == captions[:200]
    changed = [sum(not np.array_equal(seen[r], stored["train"][r]) for r in range(200)) for seen in epochs]
    assert all(c > 40 for c in changed)
    assert sum(not np.array_equal(epochs[0][r], epochs[1][r]) for r in range(200)) > 40
    again = rows(build_token_dataset(config(0.1), manifest))
    assert all(np.array_equal(again[r], epochs[0][r]) for r in range(200))

    val = build_token_dataset(config(0.1), manifest, split="val")
    for _ in range(2):
        seen = rows(val)
        assert all(np.array_equal(seen[r], stored["val"][r]) for r in range(40))
    plain = rows(build_token_dataset(config(0.0), manifest))
    assert all(np.array_equal(plain[r], stored["train"][r]) for r in range(200))

    # encode.views = 2: the two rows of an image draw their segmentations apart.
    two = _write_token_dataset(str(tmp_path / "views"), {"train": captions[:40]}, tok_json, views=2)
    seen = rows(build_token_dataset(config(0.1).model_copy(update={"prior": config(0.1).prior.model_copy(
        update={"tokens_uri": str(tmp_path / "views")})}), two))
    assert sorted(seen) == list(range(80))
    assert sum(not np.array_equal(seen[2 * r], seen[2 * r + 1]) for r in range(40)) > 10

    bare = _write_token_dataset(str(tmp_path / "bare"), {"train": captions[:8]}, None)
    with pytest.raises(ValueError, match="loader.bpe_dropout=0.1 needs the captions' tokenizer"):
        build_token_dataset(config(0.1).model_copy(update={"prior": config(0.1).prior.model_copy(
            update={"tokens_uri": str(tmp_path / "bare")})}), bare)
