"""Outputs published by a manifest: the convention every job that writes a dataset, a bundle or
a report keeps.

A job writes its files under a fresh `gen-…` folder and `manifest.json` last; the manifest names
the generation, so readers never see a half-written output. Publishing keeps the generation it
replaces (the manifest names it `previous_generation`) until the next publish, so a job that
read the old manifest — a training run streaming its shards for hours — can finish reading it;
any other generation folder is garbage from a crashed or superseded run. Every manifest starts
with the same header (`header`): its kind, format version, creation time and the code version
that wrote it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tessera import storage

MANIFEST = "manifest.json"


def code_version() -> str:
    """The git commit this code came from when there is one (a dev checkout), else the package
    version (a cluster working_dir upload has no .git)."""
    from tessera import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def now_utc() -> str:
    """'2026-12-02T11:38:25+00:00': the creation time every manifest records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def header(kind: str, *, generation: str | None = None, format_version: int = 1) -> dict:
    """The fields every manifest starts with."""
    out = {"kind": kind, "format_version": format_version, "created": now_utc(),
           "code_version": code_version()}
    if generation is not None:
        out["generation"] = generation
    return out


def new_generation() -> str:
    """A fresh generation folder name: time-ordered, unique across concurrent writers."""
    return f"gen-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{storage.unique_suffix()[:6]}"


def existing(folder: str, options: storage.StorageOptions | None = None) -> dict | None:
    """The published manifest in `folder`, or None."""
    uri = storage.join(folder, MANIFEST)
    return storage.read_json(uri, options) if storage.exists(uri, options) else None


def read(folder: str, kind: str, *, what: str, produced_by: str,
         options: storage.StorageOptions | None = None) -> dict:
    """The manifest in `folder`, checked to be of `kind`; the error says which job makes one."""
    uri = storage.join(folder, MANIFEST)
    if not storage.exists(uri, options):
        raise storage.StorageError(f"{uri}: no {what} here (run {produced_by} first)")
    manifest = storage.read_json(uri, options)
    if manifest.get("kind") != kind:
        raise ValueError(f"{uri}: not a tessera {what} manifest (kind={manifest.get('kind')!r})")
    return manifest


def generation_names(folder: str, options: storage.StorageOptions | None = None) -> list[str]:
    """The generation folders under `folder`, oldest first (their names are time-ordered)."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(folder, options)
    names = [info.path.rstrip("/").rsplit("/", 1)[-1]
             for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory]
    return sorted(n for n in names if n.startswith("gen-"))


def retained(manifest: dict | None) -> list[str]:
    """The generations a published manifest keeps alive: its own and the one it replaced."""
    m = manifest or {}
    return [g for g in (m.get("generation"), m.get("previous_generation")) if g]


def clear_unpublished_generations(folder: str, options: storage.StorageOptions,
                                  keep: str | None | list[str | None]) -> None:
    """Delete the generation folders under `folder` except `keep` (one name or several) and those
    the published manifest there keeps alive (`retained`)."""
    kept = set(keep) if isinstance(keep, list) else {keep}
    kept.update(retained(existing(folder, options)))
    for name in generation_names(folder, options):
        if name not in kept:
            storage.remove_tree(storage.join(folder, name), options)


def publish(folder: str, manifest: dict, options: storage.StorageOptions, old: dict | None) -> None:
    """Write the manifest (this makes the new generation visible), naming the generation it replaces
    as `previous_generation`; then delete every other one, among them the one the old manifest had
    kept alive: it has now been out of print for a whole publish."""
    previous = (old or {}).get("generation")
    if previous and previous != manifest["generation"]:
        manifest["previous_generation"] = previous
    storage.write_json(storage.join(folder, MANIFEST), manifest, options)
    if previous:
        clear_unpublished_generations(folder, options, keep=retained(manifest))
