"""The built-in emoji data (data.source.kind: emoji): the fetch step that turns the npm package
emoji-datasource-google into WebDataset shards, once, then prepare on them. Tests build a small
tarball with the package's layout; one slow test runs the real `npm pack` where npm exists."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import upload_dir
from PIL import Image
from test_prepare import read_output

from tessera import storage
from tessera.config import ConfigError, EmojiConfig, load_config
from tessera.data import emoji
from tessera.data.heldout import in_fraction
from tessera.data.tar import TarReadResult, iter_tar_samples

THUMBS = {"1F3FB": "1f44d-1f3fb.png", "1F3FD": "1f44d-1f3fd.png"}
KISS = {"1F3FB-1F3FB": "1f48f-1f3fb.png", "1F3FB-1F3FF": "1f48f-1f3fb-1f3ff.png"}


def png(seed: int) -> bytes:
    rgba = np.random.default_rng(seed).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def entry(name: str, image: str, tones: dict[str, str] | None = None, **more) -> dict:
    e = {"name": name, "unified": image[:-4].upper(), "image": image, "short_names": [name.lower()[:8]],
         "category": "Test", "subcategory": "test", "has_img_google": True, **more}
    if tones:
        e["skin_variations"] = {k: {"unified": v[:-4].upper(), "image": v, "has_img_google": True}
                                for k, v in tones.items()}
    return e


def package_tarball(path: Path, *, version: str = "16.0.0", extra: int = 0) -> dict[str, bytes]:
    """A .tgz laid out as `npm pack emoji-datasource-google` writes it; returns its 64 px images."""
    entries = [entry("GRINNING FACE", "1f600.png"), entry("RED APPLE", "1f34e.png"),
               entry("THUMBS UP SIGN", "1f44d.png", THUMBS), entry("KISS: MAN, MAN", "1f48f.png", KISS),
               entry("NOT DRAWN HERE", "1f999.png"),  # listed, but the tarball lacks its image
               entry("NO GOOGLE IMAGE", "1f998.png", has_img_google=False)]
    entries += [entry(f"EXTRA SIGN {i}", f"2{i:03d}.png") for i in range(extra)]
    names = [e["image"] for e in entries[:4]] + list(THUMBS.values()) + list(KISS.values())
    names += [e["image"] for e in entries[6:]]
    images = {n: png(i) for i, n in enumerate(names)}
    members = {"package/package.json": json.dumps({"name": "emoji-datasource-google", "version": version}),
               "package/emoji.json": json.dumps(entries), "package/LICENSE": "MIT",
               "package/img/google/sheets/64.png": png(99), "package/img/google/64/1f998.png": png(98)}
    members.update({f"package/img/google/64/{n}": b for n, b in images.items()})
    with tarfile.open(path, "w:gz") as tf:
        for name, body in members.items():
            data = body.encode() if isinstance(body, str) else body
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return images


def read_shards(uri: str, marker: dict) -> list:
    out = []
    for name in marker["shards"]:
        result = TarReadResult()
        out += list(iter_tar_samples(io.BytesIO(storage.read_bytes(storage.join(uri, name))), result))
        assert not result.truncated
    return out


def test_captions_are_lowercased_unicode_names_with_cldr_skin_tones():
    assert emoji.caption("GRINNING FACE") == "grinning face"
    assert emoji.caption("THUMBS UP SIGN", ["1F3FD"]) == "thumbs up sign: medium skin tone"
    assert emoji.caption("KISS: MAN, MAN", ["1F3FB", "1F3FF"]) == \
        "kiss: man, man, light skin tone, dark skin tone"  # a qualified name: ", tone"
    assert emoji.caption("KISS", ["1F3FB", "1F3FB"]) == "kiss: light skin tone"  # both alike: said once


def test_fetch_writes_shards_once_per_package_and_settings(tmp_path):
    images = package_tarball(tmp_path / "pkg.tgz")
    out = str(tmp_path / "source")
    cfg = EmojiConfig(tarball_uri=str(tmp_path / "pkg.tgz"), samples_per_shard=3)
    marker = emoji.fetch_shards(out, cfg, None)
    samples = read_shards(out, marker)
    assert [s.key for s in samples] == ["1f600", "1f34e", "1f44d", "1f44d-1f3fb", "1f44d-1f3fd", "1f48f",
                                        "1f48f-1f3fb", "1f48f-1f3fb-1f3ff"]
    assert [s.files["txt"].decode() for s in samples][2:5] == [
        "thumbs up sign", "thumbs up sign: light skin tone", "thumbs up sign: medium skin tone"]
    assert samples[6].files["txt"] == b"kiss: man, man, light skin tone"
    assert all(s.files["png"] == images[f"{s.key}.png"] for s in samples)  # the package's bytes, as they are
    meta = json.loads(samples[4].files["json"])
    assert meta["skin_tones"] == ["medium skin tone"] and meta["name"] == "THUMBS UP SIGN"
    assert meta["package"] == "emoji-datasource-google@16.0.0" and meta["unified"] == "1F44D-1F3FD"
    assert marker["shards"] == ["emoji-000000.tar", "emoji-000001.tar", "emoji-000002.tar"]
    assert marker["samples"] == 8 and marker["missing_images"] == ["1f999.png"]
    assert json.loads((tmp_path / "source" / "source.json").read_text()) == marker

    # Again: the same checksum and settings -> nothing written.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "source").iterdir()}
    assert emoji.fetch_shards(out, cfg, None) == marker
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "source").iterdir()} == stamps

    # Other settings: rewritten, and a shard the new set does not have is removed.
    fewer = emoji.fetch_shards(out, cfg.model_copy(update={"skin_tones": False}), None)
    assert [s.key for s in read_shards(out, fewer)] == ["1f600", "1f34e", "1f44d", "1f48f"]
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == [
        "emoji-000000.tar", "emoji-000001.tar", "source.json"]

    # Another package (other bytes): rewritten.
    package_tarball(tmp_path / "pkg.tgz", version="16.0.1", extra=2)
    newer = emoji.fetch_shards(out, cfg, None)
    assert newer["sha256"] != marker["sha256"] and newer["package"] == "emoji-datasource-google@16.0.1"
    assert newer["samples"] == 10


def test_npm_is_needed_only_when_the_shards_are_not_there(tmp_path, monkeypatch):
    package_tarball(tmp_path / "pkg.tgz")
    out = str(tmp_path / "source")
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))  # no npm on this PATH
    with pytest.raises(ConfigError, match="npm is not installed.*data.source.emoji.tarball_uri"):
        emoji.fetch_shards(out, EmojiConfig(), None)
    # Shards written from the same package version: a pinned npm version never changes, so they are
    # current without asking npm.
    marker = emoji.fetch_shards(out, EmojiConfig(tarball_uri=str(tmp_path / "pkg.tgz")), None)
    assert emoji.fetch_shards(out, EmojiConfig(), None) == marker
    with pytest.raises(ConfigError, match="npm is not installed"):
        emoji.fetch_shards(out, EmojiConfig(skin_tones=False), None)


def test_a_wrong_tarball_is_named(tmp_path):
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball at all" * 50)
    with pytest.raises(storage.StorageError, match="junk.tgz: not a readable package tarball"):
        emoji.fetch_shards(str(tmp_path / "out"), EmojiConfig(tarball_uri=str(tmp_path / "junk.tgz")), None)
    with tarfile.open(tmp_path / "other.tgz", "w:gz") as tf:
        info = tarfile.TarInfo("package/package.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ConfigError, match="other.tgz: not an emoji-datasource-google package"):
        emoji.fetch_shards(str(tmp_path / "out"), EmojiConfig(tarball_uri=str(tmp_path / "other.tgz")), None)
    with pytest.raises(storage.StorageError, match="gone.tgz: not found"):
        emoji.fetch_shards(str(tmp_path / "out"), EmojiConfig(tarball_uri=str(tmp_path / "gone.tgz")), None)
    assert not (tmp_path / "out" / "source.json").exists()
    with pytest.raises(ConfigError, match="package: 'emoji-datasource-google@latest' must name an exact"):
        load_config("emoji", ["data.source.emoji.package=emoji-datasource-google@latest"])


def test_the_preset():
    cfg = load_config("emoji")
    assert cfg.data.source.kind == "emoji"
    assert cfg.data.source.emoji.package == "emoji-datasource-google@16.0.0"
    assert cfg.data.heldout.fraction == 0.1 and cfg.data.resolution in (32, 64)
    assert cfg.loader.text_len >= 21  # its longest caption, in tokens


@pytest.mark.integration
def test_fetch_then_prepare_on_s3(ray_cluster, tmp_path, bucket, s3_client):
    """The preset's path end to end on object storage: the tarball and the shards in the bucket,
    then the normal prepare, with a seeded share of the names held out."""
    (tmp_path / "pkg").mkdir()
    package_tarball(tmp_path / "pkg" / "emoji.tgz", extra=12)
    upload_dir(s3_client, tmp_path / "pkg", bucket, "pkg")
    cfg = load_config("emoji", [f"data.source.uri=s3://{bucket}/emoji", f"run.root_uri=s3://{bucket}/run",
                                f"data.source.emoji.tarball_uri=s3://{bucket}/pkg/emoji.tgz",
                                "data.source.emoji.samples_per_shard=8", "data.samples_per_shard=8",
                                "data.heldout.fraction=0.3", "data.val_fraction=0.2",
                                "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"])
    from tessera.data.prepare import run_prepare

    manifest = run_prepare(cfg)
    assert manifest["source"]["kind"] == "emoji" and manifest["source"]["num_files"] == 3
    assert manifest["kept_samples"] == 20 and not any(manifest["skipped"].values())
    out = read_output(cfg.paths.data, manifest)
    captions = {split: {f["txt"].decode() for _, f in rows} for split, rows in out.items()}
    everything = set().union(*captions.values())
    assert captions["heldout"] == {c for c in everything if in_fraction(c, fraction=0.3, seed=0)}
    assert captions["heldout"] and not captions["heldout"] & (captions["train"] | captions["val"])
    image = Image.open(io.BytesIO(out["train"][0][1]["png"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    meta = json.loads(out["train"][0][1]["json"])["source_meta"]
    assert meta["package"] == "emoji-datasource-google@16.0.0"
    names = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="emoji/")["Contents"]}
    assert names == {"emoji/source.json", "emoji/emoji-000000.tar", "emoji/emoji-000001.tar",
                     "emoji/emoji-000002.tar"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm (and the npm registry)")
def test_the_real_package(tmp_path):
    marker = emoji.fetch_shards(str(tmp_path / "source"), EmojiConfig(), None)
    assert marker["package"] == "emoji-datasource-google@16.0.0" and not marker["missing_images"]
    assert marker["samples"] == 3786 and len(marker["shards"]) == 4  # 1,911 names + 1,875 skin tones
    samples = read_shards(str(tmp_path / "source"), marker)
    assert {"grinning face", "red apple", "thumbs up sign: medium skin tone"} <= {
        s.files["txt"].decode() for s in samples}
    assert Image.open(io.BytesIO(samples[0].files["png"])).size == (64, 64)
