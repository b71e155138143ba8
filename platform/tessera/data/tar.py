"""WebDataset tar shards: streaming reader that survives truncation, and a deterministic writer.

A shard groups consecutive members by key, as img2dataset writes them:
`000000012.jpg`, `000000012.txt`, `000000012.json`, then the next key. The key is the member path
up to the first dot of its file name (WebDataset's rule), the extension is the rest.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO


def split_member_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


@dataclass
class TarSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    position: int = 0  # index of the sample within its shard


@dataclass
class TarReadResult:
    truncated: bool = False
    error: str = ""


def iter_tar_samples(stream: BinaryIO, result: TarReadResult) -> Iterator[TarSample]:
    """Yield complete samples in shard order. A shard that ends early (truncated or corrupt
    mid-way) sets result.truncated; every sample completed before the damage is still yielded,
    the one being read when it happened is dropped."""
    current: TarSample | None = None
    position = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if _is_hidden(key):
                    continue
                # A new key completes the previous sample: yield it before reading further, so
                # damage inside this member cannot take the finished sample with it.
                if current is not None and (key != current.key or ext in current.files):
                    yield current
                    position += 1
                    current = TarSample(key=key, position=position)
                elif current is None:
                    current = TarSample(key=key, position=position)
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        result.truncated = True
        result.error = f"{type(e).__name__}: {e}"[:300]
        return
    if current is not None:
        yield current


def _is_hidden(key: str) -> bool:
    # macOS tar writes ._name resource forks; they are not samples.
    return key.rpartition("/")[2].startswith(".")


def write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """Build a shard in memory (it is then written atomically). Members get a fixed mtime and
    owner so the same samples always produce the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(name=f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
