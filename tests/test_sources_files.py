"""The loose-files source (data.source.kind: files), img2dataset's `files` layout: {key}.jpg|png|webp
beside {key}.txt (+ {key}.json) in shard folders, from a local folder and from a real S3-compatible
server, with the same bad-sample accounting as the tar and Parquet sources."""

import json
from pathlib import Path

import pytest
from conftest import upload_dir
from corpus import bad_samples, good_samples, image_bytes
from test_prepare import check_prepared, corpus_config, read_output

from tessera import storage
from tessera.data import sources
from tessera.data.prepare import run_prepare

pytestmark = pytest.mark.integration


def write_files_corpus(folder: Path) -> tuple[set[str], dict[str, int]]:
    """Good samples and every bad kind as loose files in two img2dataset shard folders, with the
    files img2dataset writes beside them (not samples). Returns the good keys as prepare writes
    them and the exact skip counts."""
    good = good_samples(20)
    bad, expected = bad_samples()
    # An image under an extension no reader knows is not an image: its caption is an orphan.
    bad.append(("bad-svg", {"svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "txt": b"a vector drawing"}))
    expected = dict(expected, missing_image=expected["missing_image"] + 1)
    for shard, samples in (("00000", good[:10] + bad), ("00001", good[10:])):
        for key, files in samples:
            for ext, data in files.items():
                (folder / shard).mkdir(parents=True, exist_ok=True)
                (folder / shard / f"{key}.{ext}").write_bytes(data)
        (folder / f"{shard}_stats.json").write_text('{"count": 10}')
        (folder / f"{shard}.parquet").write_bytes(b"PAR1 img2dataset's per-shard metadata table")
    (folder / "README.md").write_text("not a sample")
    keys = {f"00000_{k}" for k, _ in good[:10]} | {f"00001_{k}" for k, _ in good[10:]}
    return keys, expected


def test_loose_files_pair_by_key(tmp_path):
    """Keys are paths below the root up to the last dot, so dotted names pair up; img2dataset's
    stats files and anything without an image or caption are not samples."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.txt", "a.json", "photo.v2.png", "photo.v2.txt", "sub/a.webp", "sub/a.txt",
                 "00000_stats.json", "lonely.txt", "pic.GIF"):
        (root / name).write_bytes(b"x")
    files = storage.list_files(str(root), suffixes=sources.LOOSE_SUFFIXES)
    grouped = {key: sorted(exts) for key, exts in sources.group_loose_files(str(root), files, None)}
    assert grouped == {"a": ["jpg", "json", "txt"], "photo.v2": ["png", "txt"], "sub/a": ["txt", "webp"],
                       "lonely": ["txt"], "pic": ["gif"]}
    # Two roots (comma-separated): each file's key is relative to its own root.
    for name in ("d1/x/k.png", "d1/x/k.txt", "d2/k.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    both = f"{tmp_path / 'd1'},{tmp_path / 'd2'}"
    grouped = sources.group_loose_files(both, storage.list_files(both, suffixes=sources.LOOSE_SUFFIXES), None)
    assert [(k, sorted(e)) for k, e in grouped] == [("x/k", ["png", "txt"]), ("k", ["png"])]


def test_a_file_gone_after_listing_is_counted_not_fatal(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"k{i}.png").write_bytes(image_bytes("PNG", seed=i))
        (root / f"k{i}.txt").write_text(f"caption {i}")
    samples = sources.group_loose_files(str(root), storage.list_files(str(root)), None)
    (root / "k1.png").unlink()
    [table] = list(sources.read_loose_files(samples, 5, None))
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["k0", "k1", "k2"]
    assert [r["reason"] for r in rows] == [None, "unreadable_file", None]
    assert json.loads(rows[1]["meta"])["file"].endswith("k1.png")
    assert rows[2]["caption"] == b"caption 2" and rows[2]["image"] == (root / "k2.png").read_bytes()
    assert [r["order"] >> 32 for r in rows] == [5, 5, 5] and json.loads(rows[0]["meta"])["source"] == "k0.png"


def test_files_source_from_a_local_folder(ray_cluster, tmp_path):
    good, expected = write_files_corpus(tmp_path / "in")
    manifest = run_prepare(corpus_config(str(tmp_path / "in"), str(tmp_path / "out"), "files"))
    check_prepared(str(tmp_path / "out"), manifest, good, expected, per_shard=7)
    assert manifest["source"]["kind"] == "files"
    meta = json.loads(read_output(str(tmp_path / "out"), manifest)["train"][0][1]["json"])
    assert meta["source"].startswith("0000") and meta["source_meta"]["url"].startswith("http://example.invalid/")


def test_files_source_from_s3(ray_cluster, tmp_path, bucket, s3_client):
    good, expected = write_files_corpus(tmp_path / "in")
    upload_dir(s3_client, tmp_path / "in", bucket, "raw/files")
    out = f"s3://{bucket}/prepared-files"
    manifest = run_prepare(corpus_config(f"s3://{bucket}/raw/files", out, "files"))
    check_prepared(out, manifest, good, expected, per_shard=7)


def test_files_source_with_no_samples_fails_before_work(tmp_path):
    from tessera.config import load_config
    from tessera.data.prepare import _Prepare, preflight

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000_stats.json").write_text("{}")
    cfg = load_config("debug", ["data.source.kind=files", f"data.source.uri={tmp_path / 'in'}",
                                f"run.root_uri={tmp_path / 'run'}"])
    with pytest.raises(storage.StorageError, match="no images or captions among its 1 files"):
        _Prepare(cfg, preflight(cfg), None)
    (tmp_path / "empty").mkdir()
    cfg = load_config("debug", ["data.source.kind=files", f"data.source.uri={tmp_path / 'empty'}",
                                f"run.root_uri={tmp_path / 'run'}"])
    with pytest.raises(storage.StorageError, match="no input files with suffix .jpg"):
        preflight(cfg)
