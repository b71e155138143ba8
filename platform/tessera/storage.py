"""URIs -> pyarrow filesystems, listing, and atomic writes.

Every input and output in tessera is a URI: a local path or file://, s3:// (AWS or any
S3-compatible endpoint), or gs://. Credentials are never passed in here: pyarrow resolves them on
each process from the standard variables or the instance's role, so a filesystem handed to a Ray
task carries nothing secret and nothing secret reaches a log or a manifest.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

OBJECT_STORE_SCHEMES = ("s3", "gs")
MIB = 1 << 20
S3_MAX_PARTS = 10_000
S3_PART_UPLOADS = 8  # parts in flight at once: ~8 × the part size of memory beside the object
# pyarrow's GCS client raises ArrowInvalid (a ValueError) for permanent HTTP errors, OSError for the rest.
_STORE_ERRORS = (OSError, pa.ArrowException)


class StorageError(OSError):
    """An input or output location cannot be used; the message names the URI."""


@dataclass(frozen=True)
class StorageOptions:
    """The non-secret knobs for object stores (see config.StorageConfig)."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    multipart_part_mib: int = 64
    gcs_endpoint_url: str | None = None

    @classmethod
    def from_config(cls, cfg: Any | None) -> StorageOptions:
        if cfg is None:
            return cls()
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def scheme_of(uri: str) -> str:
    parts = urlsplit(uri)
    # A Windows drive letter or a relative path has no scheme worth the name.
    return parts.scheme if len(parts.scheme) > 1 else ""


def absolute(uri: str) -> str:
    """A relative local path made absolute against this process's working directory.

    Ray Train workers and Data tasks do not run in the driver's directory, so a relative path
    must be pinned where the user typed it, before the config leaves the driver."""
    if scheme_of(uri) or not uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _endpoint(opts: StorageOptions) -> str | None:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _split_endpoint(endpoint: str) -> dict[str, str]:
    """pyarrow's endpoint_override/scheme from a URL or a bare host:port (https)."""
    ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    return dict(endpoint_override=ep.netloc, scheme=ep.scheme or "https")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, opts: StorageOptions) -> pafs.FileSystem:
    if scheme in ("", "file"):
        return pafs.LocalFileSystem()
    if scheme == "s3":
        kwargs: dict[str, Any] = dict(
            anonymous=opts.anonymous,
            connect_timeout=opts.connect_timeout_s,
            request_timeout=opts.request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        endpoint = _endpoint(opts)
        if endpoint:
            kwargs.update(_split_endpoint(endpoint))
        region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    if scheme == "gs":
        # STORAGE_EMULATOR_HOST: the variable Google's own client libraries read for an emulator.
        endpoint = opts.gcs_endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        return pafs.GcsFileSystem(anonymous=opts.anonymous, **(_split_endpoint(endpoint) if endpoint else {}))
    raise StorageError(f"unsupported URI scheme {scheme!r}: use a local path, file://, s3:// or gs://")


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it)."""
    opts = options or StorageOptions()
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        path = urlsplit(uri).path if scheme == "file" else uri
        return _filesystem("", opts), str(Path(path).expanduser().resolve())
    parts = urlsplit(uri)
    if not parts.netloc:
        raise StorageError(f"{uri}: missing bucket name")
    if "@" in parts.netloc:
        # Never echo the URI: it holds a secret.
        raise StorageError(f"{scheme}://…@{parts.netloc.rsplit('@', 1)[1]}: "
                           "credentials in URIs are not supported "
                           "(they would end up in manifests and logs); "
                           "use the AWS_* / GOOGLE_* variables or an instance role")
    return _filesystem(scheme, opts), f"{parts.netloc}{parts.path}".rstrip("/")


def to_uri(uri_like: str, path: str) -> str:
    """The URI of `path` (a filesystem path from resolve/list) in the same store as `uri_like`."""
    scheme = scheme_of(uri_like)
    return f"{scheme}://{path}" if scheme in OBJECT_STORE_SCHEMES else path


def _explain(uri: str, err: BaseException) -> str:
    text = str(err)
    low = text.lower()
    if ("nosuchbucket" in low or "bucket does not exist" in low
            or "the specified bucket does not exist" in low):
        return f"{uri}: bucket does not exist"
    if any(s in low for s in ("curl", "connect", "resolve host", "timed out", "timeout", "unreachable")):
        return f"{uri}: cannot reach the object store ({text.splitlines()[0][:200]})"
    if "accessdenied" in low or "access denied" in low or "forbidden" in low or "403" in low:
        return f"{uri}: access denied (check credentials / instance role)"
    return f"{uri}: {text.splitlines()[0][:300] if text else type(err).__name__}"


def file_info(uri: str, options: StorageOptions | None = None) -> pafs.FileInfo:
    fs, path = resolve(uri, options)
    try:
        return fs.get_file_info(path)
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    return file_info(uri, options).type != pafs.FileType.NotFound


def list_files(uri: str, options: StorageOptions | None = None, *,
               suffixes: tuple[str, ...] = ()) -> list[str]:
    """Sorted URIs of the files under a folder/prefix (recursive), or [uri] for a single file;
    comma-separated URIs are listed in turn."""
    if "," in uri:
        return [f for part in uri.split(",") if part.strip()
                for f in list_files(part.strip(), options, suffixes=suffixes)]
    fs, path = resolve(uri, options)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.NotFound:
            infos = []
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not Path(i.path).name.startswith(".")
        and (not suffixes or i.path.lower().endswith(tuple(s.lower() for s in suffixes)))
    ]
    return [to_uri(uri, p) for p in sorted(files)]


def require_inputs(uri: str, options: StorageOptions | None = None, *,
                   suffixes: tuple[str, ...] = ()) -> list[str]:
    """list_files, but an empty result is an error naming what was looked for, raised before any
    work starts."""
    files = list_files(uri, options, suffixes=suffixes)
    if not files:
        want = f" with suffix {' / '.join(suffixes)}" if suffixes else ""
        raise StorageError(f"{uri}: no input files{want} found (missing prefix or empty folder)")
    return files


def require_writable(uri: str, options: StorageOptions | None = None) -> None:
    """Check an output location before work starts: the bucket exists and is reachable, or the
    local folder can be created."""
    fs, path = resolve(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{uri}: cannot create output folder ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"{uri}: output folder is not writable")
        return
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    data = read_bytes(uri, options)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{uri}: not valid JSON ({e})") from None


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write atomically: the object/file is either absent or complete under its final name, and
    whatever was there before stays until the new one is complete.

    Local files go to a temporary name in the same folder and are renamed over the target.
    S3: one PutObject up to the part size; above it a multipart upload whose parts go up in
    parallel and which is completed only once every part is in, or aborted on any failure (the
    object never appears and no parts are left stored). GCS: one resumable upload, handed the
    whole buffer in one write; it declares the object's size on finalising, so the object appears
    only when every byte arrived.
    """
    opts = options or StorageOptions()
    fs, path = resolve(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    if scheme_of(uri) == "s3":
        # boto3, not pyarrow's S3 stream: that one completes its multipart upload on close even
        # when the code writing to it failed, so it would publish a partial object; and it has no abort.
        bucket, _, key = path.partition("/")
        client = _s3_client(opts)
        try:
            if len(data) <= opts.multipart_part_mib * MIB:
                client.put_object(Bucket=bucket, Key=key, Body=data)
            else:
                _multipart_put(client, bucket, key, data, part_bytes=opts.multipart_part_mib * MIB)
        except Exception as e:  # botocore raises many unrelated types
            raise StorageError(_explain(uri, e)) from None
        return
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None


def _multipart_put(client, bucket: str, key: str, data: bytes, *, part_bytes: int) -> None:
    """Upload `data` in parts of `part_bytes` (more when 10,000 parts would not hold it), up to
    S3_PART_UPLOADS at once; any failure aborts the upload, so S3 drops the parts sent."""
    from concurrent.futures import ThreadPoolExecutor

    size = max(part_bytes, -(-len(data) // S3_MAX_PARTS))
    view = memoryview(data)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

    def put(number: int) -> dict:
        # bytes(): botocore takes bytes or a file, not a memoryview; one part copied at a time.
        body = bytes(view[(number - 1) * size:number * size])
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                  Body=body)["ETag"]
        return {"PartNumber": number, "ETag": etag}

    pool = ThreadPoolExecutor(S3_PART_UPLOADS)
    try:
        futures = [pool.submit(put, n) for n in range(1, -(-len(data) // size) + 1)]
        parts = [f.result() for f in futures]
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        # Parts not started never start; those in flight finish first, since a part that lands
        # after the abort would stay stored.
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):  # the first error is the one to report
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    finally:
        pool.shutdown()


@functools.lru_cache(maxsize=4)
def _s3_client(opts: StorageOptions):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    cfg = Config(
        connect_timeout=opts.connect_timeout_s,
        read_timeout=opts.request_timeout_s,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version=UNSIGNED if opts.anonymous else None,
    )
    endpoint = _endpoint(opts)
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n", options)


def remove_tree(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a folder/prefix and everything under it; nothing there is not an error."""
    fs, path = resolve(uri, options)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except _STORE_ERRORS as e:
        raise StorageError(_explain(uri, e)) from None


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
