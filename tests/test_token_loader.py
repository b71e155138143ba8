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
