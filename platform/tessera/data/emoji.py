"""The built-in real dataset (data.source.kind: emoji): Google's Noto emoji images (Apache-2.0),
captioned with their lower-cased Unicode names, from the npm package emoji-datasource-google
(its data and code: MIT).

    package tarball (`npm pack`, or emoji.tarball_uri) ─fetch_shards─▶ {source.uri}/emoji-NNNNNN.tar
                                                                        + source.json (written last)

The shards hold img2dataset-style samples ({key}.png, {key}.txt, {key}.json), so prepare reads them
as any webdataset source. fetch_shards runs on the driver as prepare's first step and does nothing
when source.json records the same package checksum and settings, so it is paid once, never by a
later stage.

Captions: the package's `name` lower-cased ("grinning face", "red apple"). Skin-tone variants (323
names, 1,875 images) are kept as images of their own, captioned as CLDR names them ("thumbs up sign:
medium skin tone"): they double the data, and each is a pairing of a shape seen in other tones with
a tone seen on other shapes, the compositional case a held-out caption should test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tessera import published, storage
from tessera.config import ConfigError, EmojiConfig
from tessera.data.tar import write_tar

log = logging.getLogger("tessera.emoji")

MARKER = "source.json"
MARKER_KIND = "tessera.emoji_source"
FORMAT = 1  # bump when the shards' contents change for the same package and settings
SHARD = "emoji-{:06d}.tar"
DATA = "package/emoji.json"
PACKAGE_JSON = "package/package.json"
# The only size the package has (its sheets aside); prepare resizes to data.resolution.
IMAGE_DIR = "package/img/google/64/"
TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
NPM_TIMEOUT_S = 600


def caption(name: str, tones: list[str] = ()) -> str:
    """The lower-cased name, with its skin tones as CLDR writes them: "thumbs up sign: medium skin
    tone"; after a name that has a qualifier already, ", tone" ("kiss: man, man, light skin tone");
    two equal tones (both people alike) once."""
    text = " ".join(name.split()).lower()
    said = [TONES[t] for t in tones]
    said = [t for i, t in enumerate(said) if t not in said[:i]]
    if not said:
        return text
    return f"{text}{', ' if ':' in text else ': '}{', '.join(said)}"


def read_package(data: bytes, where: str) -> tuple[dict, list[dict], dict[str, bytes]]:
    """(package.json, emoji.json, {image file name: PNG bytes}) in one streaming pass: a .tgz has no
    index, and seeking back in it would decompress it again from the start."""
    meta, entries, images = None, None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                if member.name in (DATA, PACKAGE_JSON) or (member.name.startswith(IMAGE_DIR)
                                                           and member.name.endswith(".png")):
                    body = tf.extractfile(member).read()
                    if member.name == DATA:
                        entries = json.loads(body)
                    elif member.name == PACKAGE_JSON:
                        meta = json.loads(body)
                    else:
                        images[member.name[len(IMAGE_DIR):]] = body
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
        raise storage.StorageError(f"{where}: not a readable package tarball ({e})") from None
    if not isinstance(entries, list) or not images:
        raise ConfigError(f"{where}: not an emoji-datasource-google package: it needs {DATA} and "
                          f"{IMAGE_DIR}*.png")
    return meta or {}, entries, images


def samples_of(entries: list[dict], images: dict[str, bytes], *, skin_tones: bool,
               package: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[str]]:
    """(key, {png, txt, json}) per image in the package's order, each name then its skin tones;
    and the image files that emoji.json names but the tarball lacks."""
    out, missing = [], []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            continue
        variants = [((), e)]
        if skin_tones:
            for k, v in sorted((e.get("skin_variations") or {}).items()):
                codes = tuple(k.upper().split("-"))
                if set(codes) <= TONES.keys():  # a modifier without a name here is left out
                    variants.append((codes, v))
        for tones, v in variants:
            image = v.get("image") or ""
            if not v.get("has_img_google", True):
                continue
            if image not in images:
                missing.append(image)
                continue
            meta = {"name": e["name"], "unified": v.get("unified"), "short_names": e.get("short_names"),
                    "category": e.get("category"), "subcategory": e.get("subcategory"), "package": package}
            if tones:
                meta["skin_tones"] = [TONES[t] for t in tones]
            files = {"png": images[image], "txt": caption(e["name"], tones).encode(),
                     "json": json.dumps(meta, sort_keys=True).encode()}
            out.append((image.rsplit(".", 1)[0], files))
    return out, missing


def npm_pack(package: str, folder: Path) -> Path:
    """The package tarball, as `npm pack` downloads it (npm checks its published checksum)."""
    cmd = ["npm", "pack", package, "--pack-destination", str(folder), "--json", "--ignore-scripts"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ConfigError("data.source.kind=emoji: npm is not installed. Install Node.js (npm), or fetch "
                          f"the tarball elsewhere (`npm pack {package}`) and set "
                          "data.source.emoji.tarball_uri to it") from None
    except subprocess.TimeoutExpired:
        raise storage.StorageError(f"npm pack {package}: no answer in {NPM_TIMEOUT_S} s") from None
    found = sorted(folder.glob("*.tgz"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise storage.StorageError(f"npm pack {package} failed (exit {done.returncode}): " + " | ".join(tail)
                                   + "; or set data.source.emoji.tarball_uri to the package tarball")
    return found[0]


def fetch_shards(uri: str, cfg: EmojiConfig, opts: storage.StorageOptions) -> dict:
    """Write the package's images as WebDataset shards under `uri`, source.json last; returns it.
    Nothing is done when source.json there records this package (by checksum) and these settings."""
    marker_uri = storage.join(uri, MARKER)
    settings = {"format": FORMAT, "skin_tones": cfg.skin_tones, "samples_per_shard": cfg.samples_per_shard}
    old = _read_marker(marker_uri, opts)
    current = old is not None and old.get("settings") == settings and _shards_there(uri, old, opts)
    # npm never changes a published version, so a marker from this package@version has its checksum.
    if current and cfg.tarball_uri is None and old.get("package") == cfg.package:
        log.info("emoji shards of %s already at %s", cfg.package, uri)
        return old
    with tempfile.TemporaryDirectory(prefix="tessera-emoji-") as tmp:
        source = cfg.tarball_uri or str(npm_pack(cfg.package, Path(tmp)))
        data = storage.read_bytes(source, opts)
    sha256 = hashlib.sha256(data).hexdigest()
    if current and old.get("sha256") == sha256:
        log.info("emoji shards of %s (sha256 %s) already at %s", source, sha256[:12], uri)
        return old
    meta, entries, images = read_package(data, source)
    package = f"{meta.get('name', '?')}@{meta.get('version', '?')}"
    samples, missing = samples_of(entries, images, skin_tones=cfg.skin_tones, package=package)
    if not samples:
        raise ConfigError(f"{source}: emoji.json names no image present in {IMAGE_DIR}")
    # A marker names complete shards only: drop it first, so a fetch that dies part-way is redone.
    _remove(marker_uri, opts)
    names, per = [], cfg.samples_per_shard
    for i in range(0, len(samples), per):
        names.append(SHARD.format(len(names)))
        storage.write_bytes(storage.join(uri, names[-1]), write_tar(samples[i:i + per]), opts)
    for stale in storage.list_files(uri, opts, suffixes=(".tar",)):
        name = stale.rsplit("/", 1)[-1]
        if name.startswith("emoji-") and name not in names:  # from a fetch with other settings
            _remove(stale, opts)
    marker = {**published.header(MARKER_KIND), "package": package, "sha256": sha256,
              "tarball": cfg.tarball_uri or f"npm pack {cfg.package}",
              "settings": settings, "samples": len(samples), "missing_images": missing, "shards": names,
              "license": "images: Apache-2.0 (Noto Emoji, Google); emoji data: MIT (emoji-datasource)"}
    storage.write_json(marker_uri, marker, opts)
    log.info("wrote %d emoji images of %s in %d shards to %s%s", len(samples), package, len(names), uri,
             f" ({len(missing)} listed images missing)" if missing else "")
    return marker


def _read_marker(uri: str, opts: storage.StorageOptions) -> dict | None:
    try:
        return storage.read_json(uri, opts) if storage.exists(uri, opts) else None
    except storage.StorageError:
        return None  # unreadable: fetch again


def _shards_there(uri: str, marker: dict, opts: storage.StorageOptions) -> bool:
    listed = {u.rsplit("/", 1)[-1] for u in storage.list_files(uri, opts, suffixes=(".tar",))}
    return bool(marker.get("shards")) and set(marker["shards"]) <= listed


def _remove(uri: str, opts: storage.StorageOptions) -> None:
    fs, path = storage.resolve(uri, opts)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
