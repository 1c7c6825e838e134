"""URIs -> pyarrow filesystems: `file:///abs/path`, a bare local path, or `s3://bucket/prefix`.

    fs, path = resolve("s3://datasets/cifar100-lt", S3Options(endpoint_url="http://minio:9000"))
    fs, path = resolve("/data/cifar100-lt")          # LocalFileSystem, absolute path

S3 settings: explicit `S3Options` first, then the standard AWS environment/config chain
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`, credentials
from env vars, shared files, profiles, instance roles: read by the AWS SDK inside pyarrow). The
endpoint is always passed explicitly (`S3FileSystem(endpoint_override=...)`), with path-style
addressing by default and connect/request timeouts plus a bounded retry count, so an
unreachable endpoint fails in seconds. Credentials are never logged nor put in error messages.

boto3 is used only where pyarrow cannot go: buckets (`create_bucket`) and conditional writes
(`s3_client`, the run lease of pipeline/distributed/run_lease.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from pipeline.credentials import credential_env_values

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


class StorageError(Exception):
    """The object store or filesystem could not be reached or refused the operation.

    One line, naming the URI and the cause; never a credential. Data, checkpoints and leases
    all raise it, so the jobs catch it beside their own errors."""


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings; None falls back to the AWS environment/config chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 (MinIO, moto, Ceph, R2, ...)
    region: str | None = None
    virtual_addressing: bool = False  # False: path-style (bucket in the path), what MinIO wants
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3  # total tries per request (AWS standard retry strategy)

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def resolved_region(self) -> str | None:
        return (
            self.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or None
        )


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of an s3:// URI."""
    rest = uri[len("s3://") :].strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket: s3://bucket/prefix")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise StorageError(f"{uri}: '{bucket}' is not a valid S3 bucket name")
    return bucket, key.strip("/")


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """("http", "host:port") from "http://host:port"; a bare host:port means https."""
    if "://" not in endpoint:
        return "https", endpoint.rstrip("/")
    u = urlparse(endpoint)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise StorageError(f"S3 endpoint '{endpoint}' must look like http(s)://host[:port]")
    return u.scheme, (u.netloc + u.path).rstrip("/")


def s3_filesystem(s3: S3Options | None = None, bucket: str | None = None) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    s3 = s3 or S3Options()
    kwargs: dict[str, object] = {
        "connect_timeout": float(s3.connect_timeout_s),
        "request_timeout": float(s3.request_timeout_s),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(s3.max_attempts)),
        "force_virtual_addressing": bool(s3.virtual_addressing),
    }
    endpoint = s3.resolved_endpoint()
    if endpoint:
        scheme, host = _endpoint_parts(endpoint)
        kwargs["scheme"] = scheme
        kwargs["endpoint_override"] = host
    region = s3.resolved_region()
    if region is None and not endpoint and bucket:
        try:  # real AWS: the bucket's own region (a HEAD request); best effort
            region = pafs.resolve_s3_region(bucket)
        except Exception:
            region = None
    if region:
        kwargs["region"] = region
    try:
        return pafs.S3FileSystem(**kwargs)
    except Exception as exc:
        raise StorageError(f"cannot configure S3 access: {scrub(str(exc))}") from None


def resolve(uri: str | os.PathLike, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `file:///abs`, a bare local path or `s3://bucket/prefix`.

    Local paths become absolute; S3 paths are "bucket/prefix" without a trailing slash. Nothing
    is contacted here except, on real AWS with no region configured, the bucket's region lookup.
    """
    import pyarrow.fs as pafs

    text = os.fspath(uri)
    if not text:
        raise StorageError("empty storage URI")
    if is_s3(text):
        bucket, key = split_s3(text)
        return s3_filesystem(s3, bucket), f"{bucket}/{key}" if key else bucket
    if text.startswith("file:"):
        u = urlparse(text)
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise StorageError(f"{text}: a file URI must be absolute: file:///abs/path")
        return pafs.LocalFileSystem(), os.path.normpath(unquote(u.path))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", text):
        raise StorageError(
            f"{text}: unsupported URI scheme; use file:///abs/path, a local path or s3://bucket/prefix"
        )
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def join(base: str, *parts: str) -> str:
    """Join a filesystem path (as returned by `resolve`) with relative parts using '/'."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}" if out else p
    return out


def display(fs: pafs.FileSystem, path: str) -> str:
    """A user-facing name for a filesystem path: s3://bucket/key or the local path."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def scrub(message: str) -> str:
    """Remove any credential value we know of from a message (belt and braces: pyarrow and
    botocore messages do not normally contain them)."""
    for _name, value in credential_env_values():
        message = message.replace(value, "***")
    return message


def endpoint_of(fs: pafs.FileSystem) -> str | None:
    """The endpoint an S3FileSystem talks to ("http://host:port"), None for AWS's default."""
    if fs.type_name != "s3":
        return None
    try:  # pyarrow exposes its settings only through pickling support
        opts = fs.__reduce__()[1][0]
        host = opts.get("endpoint_override") or ""
        return f"{opts.get('scheme') or 'https'}://{host}" if host else None
    except Exception:
        return S3Options().resolved_endpoint()


def _endpoint_note(fs: pafs.FileSystem) -> str:
    if fs.type_name != "s3":
        return ""
    return f" (endpoint {endpoint_of(fs) or 'AWS default'})"


def storage_error(exc: BaseException, fs: pafs.FileSystem, path: str, action: str) -> StorageError:
    """A one-line StorageError for a failed filesystem call, classified, with no credentials."""
    text = scrub(str(exc))
    where = display(fs, path)
    if fs.type_name == "s3":
        if any(
            k in text
            for k in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "timed out", "Timeout")
        ):
            return StorageError(
                f"cannot reach the S3 endpoint{_endpoint_note(fs)} while trying to {action} {where}: {text}"
            )
        if any(
            k in text
            for k in (
                "ACCESS_DENIED",
                "INVALID_ACCESS_KEY_ID",
                "SIGNATURE_DOES_NOT_MATCH",
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "EXPIRED_TOKEN",
                "InvalidToken",
            )
        ):
            return StorageError(
                f"access denied while trying to {action} {where}{_endpoint_note(fs)}: check the S3 "
                f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and "
                f"permissions [{text}]"
            )
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            bucket = path.split("/", 1)[0]
            return StorageError(
                f"bucket '{bucket}' does not exist{_endpoint_note(fs)} (needed to {action} {where})"
            )
    return StorageError(f"cannot {action} {where}: {text}")


# --------------------------------------------------------------------------------------
# small I/O helpers with clear errors


def file_size(fs: pafs.FileSystem, path: str) -> int | None:
    """Size in bytes, or None when the file does not exist."""
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise storage_error(exc, fs, path, "look up") from None
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.File:
        raise StorageError(f"{display(fs, path)} is not a file")
    return int(info.size)


def read_buffer(fs: pafs.FileSystem, path: str) -> pa.Buffer:
    """The whole file in memory of Arrow's allocator; FileNotFoundError when it does not exist,
    StorageError otherwise. What large files read again and again (shards) should use: Arrow's
    pool reuses its memory from one file to the next, while a new `bytes` of a 31 MB shard
    page-faults every page in again (bench/HISTORY.md, 2026-12-07 15:55)."""
    try:
        with fs.open_input_file(path) as f:
            return f.read_buffer(f.size())
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_error(exc, fs, path, "read") from None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file as `bytes` (a copy of `read_buffer`'s); the same errors."""
    return read_buffer(fs, path).to_pybytes()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers see the old file or the new one, never a part:
    locally through a temporary name + rename, on S3 through one PUT/multipart upload (which
    becomes visible only when complete)."""
    try:
        if fs.type_name == "local":
            parent = path.rsplit("/", 1)[0]
            fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                fs.move(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    fs.delete_file(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise storage_error(exc, fs, path, "write") from None


def check_access(fs: pafs.FileSystem, path: str, action: str = "access") -> None:
    """One cheap request (a HEAD/list) so that an unreachable endpoint or bad credentials
    fail before any work is done."""
    import pyarrow.fs as pafs

    try:
        fs.get_file_info(join(path, "manifest.json"))
        if fs.type_name == "s3":
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(
                    f"bucket '{bucket}' does not exist{_endpoint_note(fs)} (needed to {action} {display(fs, path)})"
                )
    except OSError as exc:
        raise storage_error(exc, fs, path, action) from None


def s3_client(s3: S3Options | None = None):
    """A boto3 S3 client with the same endpoint, region, addressing, timeouts and retries as
    `resolve`'s filesystems (for what pyarrow cannot do: buckets, conditional writes)."""
    import boto3
    import botocore.config

    s3 = s3 or S3Options()
    cfg = botocore.config.Config(
        connect_timeout=s3.connect_timeout_s,
        read_timeout=s3.request_timeout_s,
        retries={"max_attempts": s3.max_attempts, "mode": "standard"},
        s3={"addressing_style": "virtual" if s3.virtual_addressing else "path"},
    )
    return boto3.client(
        "s3", endpoint_url=s3.resolved_endpoint(), region_name=s3.resolved_region(), config=cfg
    )


def create_bucket(uri: str, s3: S3Options | None = None) -> None:
    """Create the bucket of an s3:// URI if it does not exist (boto3; for tests and setup)."""

    import botocore.exceptions

    bucket, _ = split_s3(str(uri))
    s3 = s3 or S3Options()
    region = s3.resolved_region()
    client = s3_client(s3)
    try:
        client.head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"cannot check bucket '{bucket}': {scrub(str(exc))}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"cannot check bucket '{bucket}': {scrub(str(exc))}") from None
    try:
        kwargs: dict[str, object] = {"Bucket": bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        client.create_bucket(**kwargs)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise StorageError(f"cannot create bucket '{bucket}': {scrub(str(exc))}") from None
