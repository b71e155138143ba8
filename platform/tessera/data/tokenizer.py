"""Caption tokenizer: byte-level BPE (HF `tokenizers`) over lowercased captions, as the paper.

Byte-level BPE never produces an unknown token, so no id is reserved for one. Padding is not a
token either: encode() returns a mask, and the prior gives padded positions learned embeddings of
their own (no real token id is ever remapped to mean "pad").
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(captions: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


class CaptionTokenizer:
    """Encodes caption batches to fixed-length id arrays plus a validity mask."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_json(cls, text: str) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def ids(self, captions: list[str]) -> list[list[int]]:
        """Unpadded, untruncated token ids per caption."""
        return [e.ids for e in self.tokenizer.encode_batch(list(captions), add_special_tokens=False)]

    def encode(self, captions: list[str], *, text_len: int) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (B, text_len) int32 with 0 at padded positions, mask (B, text_len) bool.
        Captions longer than text_len are truncated."""
        encs = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        ids = np.zeros((len(encs), text_len), dtype=np.int32)
        mask = np.zeros((len(encs), text_len), dtype=bool)
        for i, e in enumerate(encs):
            n = min(len(e.ids), text_len)
            ids[i, :n] = e.ids[:n]
            mask[i, :n] = True
        return ids, mask

    def decode(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        rows = []
        for i, row in enumerate(np.asarray(ids)):
            keep = row if mask is None else row[np.asarray(mask[i], dtype=bool)]
            rows.append(self.tokenizer.decode([int(t) for t in keep]).strip())
        return rows
