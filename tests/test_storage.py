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


# --- all-or-nothing writes of large objects ----------------------------------------------------

MULTIPART = StorageOptions(multipart_part_mib=5)  # S3's smallest part: a 12 MiB object is 3 parts


def _object_keys(s3_client, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.integration
def test_s3_large_objects_go_up_in_parts(s3_server, bucket, s3_client):
    data = os.urandom(12 << 20)
    storage.write_bytes(f"s3://{bucket}/big.safetensors", data, MULTIPART)
    assert storage.read_bytes(f"s3://{bucket}/big.safetensors") == data
    # A multipart object's ETag ends in its part count; one PutObject's has no suffix.
    assert s3_client.head_object(Bucket=bucket, Key="big.safetensors")["ETag"].strip('"').endswith("-3")
    storage.write_bytes(f"s3://{bucket}/small.json", b"{}", MULTIPART)
    assert "-" not in s3_client.head_object(Bucket=bucket, Key="small.json")["ETag"]
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.integration
def test_s3_failed_part_aborts_the_upload_and_keeps_the_old_object(s3_server, bucket, s3_client):
    from botocore.exceptions import ConnectionClosedError

    uri = f"s3://{bucket}/export/prior.safetensors"
    storage.write_bytes(uri, b"the complete old export", MULTIPART)
    sent = []

    def lose_part_2(request, **_):  # a fault in the real client's send path, on every retry
        sent.append(request.url)
        if "partNumber=2" in request.url:
            raise ConnectionClosedError(endpoint_url=request.url)

    client = storage._s3_client(MULTIPART)
    client.meta.events.register("before-send.s3.UploadPart", lose_part_2)
    try:
        with pytest.raises(StorageError, match=rf"^{uri}: "):
            storage.write_bytes(uri, os.urandom(12 << 20), MULTIPART)
    finally:
        client.meta.events.unregister("before-send.s3.UploadPart", lose_part_2)
    assert any("partNumber=1" in u for u in sent)  # it was a multipart upload, part 1 went up
    assert storage.read_bytes(uri) == b"the complete old export"
    assert _object_keys(s3_client, bucket) == ["export/prior.safetensors"]
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted, no parts kept

    # A first write that fails leaves no object at all.
    client.meta.events.register("before-send.s3.UploadPart", lose_part_2)
    try:
        with pytest.raises(StorageError):
            storage.write_bytes(f"s3://{bucket}/new.bin", os.urandom(12 << 20), MULTIPART)
    finally:
        client.meta.events.unregister("before-send.s3.UploadPart", lose_part_2)
    assert _object_keys(s3_client, bucket) == ["export/prior.safetensors"]
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.fixture
def gcs():
    """A real GCS API emulator (gcp-storage-emulator) on 127.0.0.1, spoken to by pyarrow's GCS
    client over HTTP, with faults injected on the server side: `faults[object name] = (put, how)`
    makes that object's put-th upload request fail with HTTP 400 ("400") or a dropped connection
    ("drop")."""
    import threading
    from functools import partial
    from http.server import ThreadingHTTPServer

    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    store = Storage(use_memory_fs=True)
    buckets.create_bucket("tessera-gcs", store)
    faults: dict[str, tuple[int, str]] = {}
    puts: dict[str, int] = {}

    class FaultyHandler(RequestHandler):
        def do_PUT(self):
            from urllib.parse import parse_qs, urlsplit

            name = parse_qs(urlsplit(self.path).query).get("name", [""])[0]
            puts[name] = puts.get(name, 0) + 1
            if name in faults and faults[name][0] == puts[name]:
                if faults[name][1] == "drop":
                    self.close_connection = True
                    return
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_PUT()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(FaultyHandler, store))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = StorageOptions(gcs_endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", anonymous=True)
    yield opts, faults
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_gcs_round_trip_through_an_emulator(gcs):
    opts, _ = gcs
    data = os.urandom(20 << 20)
    storage.write_bytes("gs://tessera-gcs/run/export/prior.safetensors", data, opts)
    storage.write_json("gs://tessera-gcs/run/export/prior.json", {"kind": "tessera.prior"}, opts)
    assert storage.read_bytes("gs://tessera-gcs/run/export/prior.safetensors", opts) == data
    assert storage.read_json("gs://tessera-gcs/run/export/prior.json", opts) == {"kind": "tessera.prior"}
    assert storage.list_files("gs://tessera-gcs/run", opts) == [
        "gs://tessera-gcs/run/export/prior.json", "gs://tessera-gcs/run/export/prior.safetensors"]


@pytest.mark.integration
@pytest.mark.parametrize("put, how", [(1, "400"), (2, "400"), (1, "drop")],
                         ids=["data-rejected", "finalise-rejected", "connection-dropped"])
def test_gcs_failed_upload_publishes_nothing(gcs, put, how):
    """Upload request 1 carries the bytes, request 2 finalises the object with its size."""
    opts, faults = gcs
    uri = "gs://tessera-gcs/run/export/prior.safetensors"
    storage.write_bytes(uri, b"the complete old export", opts)
    faults["run/export/prior.safetensors"] = (1 + put, how)  # counting the old export's one request
    faults["run/new.bin"] = (put, how)
    new = os.urandom(12 << 20)
    for target in (uri, "gs://tessera-gcs/run/new.bin"):
        # A 400 is final; after a dropped connection the client asks how much arrived and
        # resends, which this emulator refuses, so it fails too.
        with pytest.raises(StorageError, match=rf"^{target}: "):
            storage.write_bytes(target, new, opts)
    assert storage.read_bytes(uri, opts) == b"the complete old export"
    assert not storage.exists("gs://tessera-gcs/run/new.bin", opts)
    assert storage.list_files("gs://tessera-gcs/run", opts) == [uri]


@pytest.mark.integration
def test_publish_keeps_the_replaced_generation_until_the_next_publish(s3_server, bucket):
    """As encode and generate use it: clear garbage at the start, write a generation, publish."""
    from tessera import published

    folder = f"s3://{bucket}/tokens"

    def run(gen: str) -> dict:
        old = published.existing(folder)
        published.clear_unpublished_generations(folder, StorageOptions(),
                                                keep=old["generation"] if old else None)
        storage.write_bytes(storage.join(folder, gen, "train", "shard-000000.parquet"), gen.encode())
        manifest = published.header("tessera.test", generation=gen)
        published.publish(folder, manifest, StorageOptions(), old)
        return manifest

    run("gen-a")
    storage.write_bytes(storage.join(folder, "gen-b0-crashed", "x"), b"garbage")
    assert run("gen-b")["previous_generation"] == "gen-a"
    assert published.generation_names(folder) == ["gen-a", "gen-b"]  # garbage gone, gen-a kept
    # A job reading gen-a (from the manifest it read before gen-b's publish) still finds its files,
    # also after another job has started (and cleared garbage) here.
    published.clear_unpublished_generations(folder, StorageOptions(), keep="gen-b")
    assert storage.read_bytes(storage.join(folder, "gen-a", "train", "shard-000000.parquet")) == b"gen-a"
    assert run("gen-c")["previous_generation"] == "gen-b"
    assert published.generation_names(folder) == ["gen-b", "gen-c"]
    assert published.existing(folder)["generation"] == "gen-c"
