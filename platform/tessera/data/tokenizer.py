"""Caption tokenizer: byte-level BPE (HF `tokenizers`) over lowercased captions, as the paper.

Byte-level BPE never produces an unknown token, so no id is reserved for one. Padding is not a
token either: encode() returns a mask, and the prior gives padded positions learned embeddings of
their own (no real token id is ever remapped to mean "pad").

BPE-dropout (BPEDropout) re-segments captions with merges randomly skipped, from a seed per
caption; `tokenizers`' own BPE(dropout=p) draws from an unseeded per-thread RNG, so a run using it
could not repeat its captions' segmentations.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence

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


class BPEDropout:
    """BPE-dropout (Provilkov et al., 2019) with the merges of a trained CaptionTokenizer: each
    word of the deterministic encoding is segmented again from its single bytes, and at every merge
    step each applicable merge is skipped with probability p; the best-ranked one left is applied,
    and the word stops when none is left. At p = 0 this is BPE itself (the tokenizer's own ids).
    The token strings still concatenate to the same word, so the ids decode to the same text.
    """

    def __init__(self, tokenizer: CaptionTokenizer, p: float):
        if not 0 <= p < 1:
            raise ValueError(f"BPE-dropout probability must be in [0, 1), got {p}")
        spec = json.loads(tokenizer.tokenizer.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"BPE-dropout needs a BPE tokenizer, got a {model.get('type')} model")
        self.tokenizer, self.p = tokenizer, p
        self.vocab: dict[str, int] = model["vocab"]
        # Merges are "a b" strings in older tokenizer files, [a, b] pairs in newer ones.
        self.ranks = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): r
                      for r, m in enumerate(model["merges"])}
        self.added = {t["id"] for t in spec.get("added_tokens", [])}

    def ids(self, captions: Sequence[str], seeds: Sequence[int], *,
            fit: int | None = None) -> list[list[int]]:
        """Unpadded ids per caption, caption i's segmentation drawn from seeds[i]; one longer than
        `fit` tokens is replaced by the plain segmentation (dropout never makes a caption lose words
        to truncation)."""
        encs = self.tokenizer.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        if self.p == 0:
            return [e.ids for e in encs]
        out = []
        for enc, seed in zip(encs, seeds, strict=True):
            rng = random.Random(seed)
            ids: list[int] = []
            for word, group in itertools.groupby(zip(enc.word_ids, enc.tokens, enc.ids, strict=True),
                                                 key=lambda t: t[0]):
                tokens = list(group)
                # Special tokens (and anything outside a word) are kept as they are.
                if word is None or any(i in self.added for _, _, i in tokens):
                    ids += [i for _, _, i in tokens]
                else:
                    ids += self._segment("".join(t for _, t, _ in tokens), rng) or [i for _, _, i in tokens]
            out.append(enc.ids if fit is not None and len(ids) > fit else ids)
        return out

    def _segment(self, word: str, rng: random.Random) -> list[int] | None:
        """The word's ids under dropout; None if one of its bytes is not in the vocabulary."""
        rank_of, draw, p = self.ranks.get, rng.random, self.p
        symbols = list(word)
        while len(symbols) > 1:
            best_rank, at = -1, -1  # the best-ranked merge not skipped, and where
            for i in range(len(symbols) - 1):
                rank = rank_of((symbols[i], symbols[i + 1]))
                # A merge ranked after the best one so far could not be chosen: no draw for it.
                if rank is not None and (at < 0 or rank < best_rank) and draw() >= p:
                    best_rank, at = rank, i
            if at < 0:
                break
            symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
        try:
            return [self.vocab[s] for s in symbols]
        except KeyError:
            return None
