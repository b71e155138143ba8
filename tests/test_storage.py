import os

import pytest

from tessera import storage
from tessera.storage import StorageError, StorageOptions


def test_local_paths_and_file_uris(tmp_path):
    target = tmp_path / "a" / "b.json"
    storage.write_json(f"file://{target}", {"x": 1})
    assert storage.read_json(str(target)) == {"x": 1}
    assert storage.exists(str(target)) and not storage.exists(str(tmp_path / "nope"))
    storage.write_bytes(str(tmp_path / "a" / "c.tar"), b"x")
    assert storage.list_files(str(tmp_path), suffixes=(".tar",)) == [str(tmp_path / "a" / "c.tar")]
    assert storage.join("s3://b/p/", "/x", "y") == "s3://b/p/x/y"


def test_local_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "shard.tar"
    storage.write_bytes(str(target), b"old complete contents")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"new contents that never finish")
    monkeypatch.undo()
    assert target.read_bytes() == b"old complete contents"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]  # no temporary left behind


def test_credentials_in_uri_are_refused_without_echoing_them():
    with pytest.raises(StorageError) as e:
        storage.resolve("s3://AKIAKEY:s3cr3t@bucket/data")
    assert "s3cr3t" not in str(e.value) and "credentials in URIs" in str(e.value)


def test_missing_local_input_is_one_clear_error(tmp_path):
    with pytest.raises(StorageError, match=r"no input files with suffix \.tar found"):
        storage.require_inputs(str(tmp_path / "missing"), suffixes=(".tar",))


@pytest.mark.integration
def test_s3_roundtrip_listing_and_atomic_put(s3_server, bucket, s3_client):
    uri = f"s3://{bucket}/data/manifest.json"
    storage.require_writable(f"s3://{bucket}/data")
    storage.write_json(uri, {"ok": True})
    storage.write_bytes(f"s3://{bucket}/data/train/shard-000000.tar", b"t" * 10)
    # What was written is visible to a plain S3 client over HTTP, exactly as on AWS.
    body = s3_client.get_object(Bucket=bucket, Key="data/manifest.json")["Body"].read()
    assert b'"ok": true' in body
    assert storage.read_json(uri) == {"ok": True}
    assert storage.list_files(f"s3://{bucket}/data", suffixes=(".tar",)) == [f"s3://{bucket}/data/train/shard-000000.tar"]
    fs, path = storage.resolve(uri)
    assert type(fs).__name__ == "S3FileSystem" and path == f"{bucket}/data/manifest.json"


@pytest.mark.integration
def test_s3_errors_name_the_uri(s3_server, bucket):
    with pytest.raises(StorageError, match=r"no input files .* found"):
        storage.require_inputs(f"s3://{bucket}/no/such/prefix", suffixes=(".tar",))
    with pytest.raises(StorageError, match="does not exist"):
        storage.require_writable("s3://tessera-no-such-bucket/out")
    with pytest.raises(StorageError, match="tessera-no-such-bucket"):
        storage.require_inputs("s3://tessera-no-such-bucket/in")


@pytest.mark.integration
def test_unreachable_endpoint_fails_fast(s3_server):
    from conftest import free_port

    opts = StorageOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1,
                          request_timeout_s=2)
    with pytest.raises(StorageError, match="s3://some-bucket/x"):
        storage.require_inputs("s3://some-bucket/x", opts)
    with pytest.raises(StorageError, match="s3://some-bucket/out"):
        storage.require_writable("s3://some-bucket/out", opts)
