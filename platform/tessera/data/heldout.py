"""Held-out captions for any source (data.heldout): the samples it names leave train and val and
are published as the "heldout" split, where the shapes source puts its novel colour/shape pairs,
so evaluation and the prior's held-out figures read them from the prepared manifest unchanged.

Each prepare task decides for its own rows, with no pass over the whole dataset: a caption or key
is looked up in the sets given, a fraction is a hash of (seed, caption). So every sample of a
caption lands on the same side, in any input order, on every rerun.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

from tessera import storage
from tessera.config import ConfigError, HeldoutConfig
from tessera.data.preprocess import sanitize_key


def normalize_caption(text: str) -> str:
    """What two captions must share to count as one: the tokenizer lowercases, and prepare
    collapses whitespace, so "Red  Apple" and "red apple" are one caption to the prior."""
    return " ".join(text.split()).casefold()


def in_fraction(caption: str, *, fraction: float, seed: int) -> bool:
    """Is this (normalised) caption among the held-out share? Independent of the val split's
    hash of the key, so a held-out share and a val share never correlate."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"heldout:{seed}:{caption}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class HeldOut:
    captions: frozenset[str]  # normalised
    keys: frozenset[str]  # as prepare writes them (sanitized)
    fraction: float = 0.0
    seed: int = 0

    @classmethod
    def load(cls, cfg: HeldoutConfig, opts: storage.StorageOptions) -> HeldOut | None:
        """The held-out sets from data.heldout (reading its file), or None when it holds nothing."""
        if not cfg.active:
            return None
        captions, keys = list(cfg.captions), list(cfg.keys)
        if cfg.uri:
            more_captions, more_keys = read_list(cfg.uri, opts)
            captions += more_captions
            keys += more_keys
        return cls(captions=frozenset(normalize_caption(c) for c in captions if c.strip()),
                   keys=frozenset(sanitize_key(k.strip()) for k in keys if k.strip()),
                   fraction=cfg.fraction, seed=cfg.seed)

    def holds(self, key: str, caption: str) -> bool:
        c = normalize_caption(caption)
        return (key in self.keys or c in self.captions
                or in_fraction(c, fraction=self.fraction, seed=self.seed))

    def apply(self, table: pa.Table) -> pa.Table:
        """Processed rows (preprocess.PROCESSED_SCHEMA) -> the same rows, those held out moved to
        the "heldout" split. Skipped rows have no caption and stay as they are."""
        splits = table.column("split").to_pylist()
        for i, (key, caption) in enumerate(zip(table.column("key").to_pylist(),
                                               table.column("caption").to_pylist(), strict=True)):
            if caption is not None and splits[i] != "heldout" and self.holds(key, caption):
                splits[i] = "heldout"
        return table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))

    def digest(self) -> str:
        """Changes with anything that moves a sample between splits (a resumed prepare must not mix
        parts split by an older list)."""
        spec = {"captions": sorted(self.captions), "keys": sorted(self.keys), "fraction": self.fraction,
                "seed": self.seed}
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    def describe(self, cfg: HeldoutConfig) -> dict:
        """For the prepared manifest: where the held-out split came from."""
        return {"captions": len(self.captions), "keys": len(self.keys), "uri": cfg.uri,
                "fraction": self.fraction, "seed": self.seed, "sha256": self.digest()}


def read_list(uri: str, opts: storage.StorageOptions) -> tuple[list[str], list[str]]:
    """(captions, keys) from a .txt file (a caption per line) or .jsonl ({"caption": ...} or
    {"key": ...} per line)."""
    try:
        text = storage.read_bytes(uri, opts).decode("utf-8")
    except storage.StorageError as e:
        raise storage.StorageError(f"data.heldout.uri: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.heldout.uri: {uri} is not UTF-8 text ({e})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    captions: list[str] = []
    keys: list[str] = []
    if uri.lower().endswith(".txt"):
        captions = [line for _, line in lines]
    else:
        for n, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.heldout.uri: {uri} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not any(isinstance(row.get(f), str) for f in ("caption", "key")):
                raise ConfigError(f"data.heldout.uri: {uri} line {n} needs a \"caption\" or \"key\" string")
            if isinstance(row.get("caption"), str):
                captions.append(row["caption"])
            if isinstance(row.get("key"), str):
                keys.append(row["key"])
    if not captions and not keys:
        raise ConfigError(f"data.heldout.uri: {uri} holds no captions or keys")
    return captions, keys
