"""One active launch per run name: a lease on the run's checkpoint storage.

Two launches of one `--run-name` at once (a double `ray job submit`, a KubeRay retry racing a
slow driver) would both train into the same checkpoints and the same MLflow run. The driver
takes the run's lease before Ray starts and holds it until it ends:

- a local (or shared POSIX) folder: an exclusive `flock` on `<storage>/<run>/.shike-lease`,
  which the kernel drops when the holder dies, however it dies;
- S3: the object `<prefix>/<run>/.shike-lease`, created with `If-None-Match: *` and refreshed
  every `ttl_s / 4` with `If-Match` on its ETag. A lease whose heartbeat is older than `ttl_s`,
  or whose holder is a dead process on this host, is stale; it is taken over with `If-Match` on
  the stale ETag, so of two launches that both find it stale exactly one wins.

The lease holds its owner (host, pid, launch id, start and heartbeat times, command), so a
refused launch names it. A lease that still names an owner when it is acquired was left by a
launch that died without releasing it: `RunLease.took_over` is that owner.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.storage import S3Options, StorageError, is_s3, s3_client, scrub, split_s3

LEASE_NAME = ".shike-lease"
DEFAULT_TTL_S = 60.0

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live launch holds the run's lease; the message names it."""

    def __init__(self, run_name: str, owner: dict[str, Any]) -> None:
        self.owner = owner
        super().__init__(
            f"run '{run_name}' is already being trained by {describe(owner)}: one launch per "
            "run name (wait for it to end or stop it, or pick another --run-name)"
        )


def describe(owner: dict[str, Any]) -> str:
    """`pid 4242 on host-a (launch 3f2c9a1b07de, started 2026-12-06 02:10:11 UTC)`."""
    if not owner:
        return "another launch (its record is being written)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("started", 0)))
    text = f"pid {owner.get('pid')} on {owner.get('host')} (launch {owner.get('launch_id')}, "
    text += f"started {started}"
    if "heartbeat" in owner:
        text += f", last seen {max(0, time.time() - owner['heartbeat']):.0f} s ago"
    return text + ")"


def new_owner(command: str | None = None) -> dict[str, Any]:
    now = time.time()
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "launch_id": uuid.uuid4().hex[:12],
        "started": now,
    }
    if command:
        owner["command"] = command
    return owner


def _dead_here(owner: dict[str, Any]) -> bool:
    """Whether `owner` is a process of this host that no longer runs."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class RunLease(abc.ABC):
    """A held lease; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, location: str, owner: dict[str, Any], took_over: dict | None) -> None:
        self.location = location
        self.owner = owner
        self.took_over = took_over

    @abc.abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _FolderLease(RunLease):
    def __init__(self, path: Path, fd: int, owner: dict, took_over: dict | None) -> None:
        super().__init__(str(path), owner, took_over)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, run_name: str, owner: dict) -> _FolderLease:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LEASE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd, retries=10)  # the holder writes it right after locking
            os.close(fd)
            raise LeaseHeldError(run_name, holder) from None
        previous = _read_record(fd)  # left by a holder that died without releasing
        data = json.dumps(owner).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return cls(path, fd, owner, previous or None)

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lease: released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_record(fd: int, retries: int = 0) -> dict[str, Any]:
    for attempt in range(retries + 1):
        raw = os.pread(fd, 1 << 16, 0)
        if raw:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                pass  # caught mid-write
        if attempt < retries:
            time.sleep(0.05)
    return {}


class _S3Lease(RunLease):
    def __init__(self, client, bucket: str, key: str, owner: dict, etag: str, took_over, ttl_s):
        super().__init__(f"s3://{bucket}/{key}", owner, took_over)
        self._client, self._bucket, self._key, self._etag = client, bucket, key, etag
        self.lost = False  # another launch took it over (this one looked dead to it)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._heartbeat, args=(ttl_s / 4,), name="shike-lease", daemon=True
        )
        self._thread.start()

    @classmethod
    def acquire(cls, uri: str, run_name: str, owner: dict, ttl_s: float, s3: S3Options | None):
        client = s3_client(s3)
        bucket, prefix = split_s3(uri)
        key = "/".join(p for p in (prefix, run_name, LEASE_NAME) if p)
        for _ in range(3):  # the holder may release between our two requests: try again
            owner["heartbeat"] = time.time()
            etag = _put(client, bucket, key, owner, IfNoneMatch="*")
            if etag is not None:
                return cls(client, bucket, key, owner, etag, None, ttl_s)
            holder, held_etag = _get(client, bucket, key)
            if holder is None:
                continue
            stale = time.time() - float(holder.get("heartbeat", 0)) > ttl_s or _dead_here(holder)
            if not stale:
                raise LeaseHeldError(run_name, holder)
            etag = _put(client, bucket, key, owner, IfMatch=held_etag)
            if etag is not None:
                return cls(client, bucket, key, owner, etag, holder, ttl_s)
        holder, _ = _get(client, bucket, key)
        raise LeaseHeldError(run_name, holder or {})

    def _heartbeat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.owner["heartbeat"] = time.time()
            try:
                etag = _put(self._client, self._bucket, self._key, self.owner, IfMatch=self._etag)
            except Exception as exc:  # a network blip: the next beat tries again
                log.warning("[shike] run lease %s not refreshed: %s", self.location, exc)
                continue
            if etag is None:
                self.lost = True
                log.error("[shike] run lease %s was taken over by another launch", self.location)
                return
            self._etag = etag

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        if not self.lost:
            with contextlib.suppress(Exception):  # a lease left behind goes stale in ttl_s
                self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag)


def _put(client, bucket: str, key: str, record: dict, **condition: str) -> str | None:
    """PUT `record` under `condition`; its ETag, or None when the condition failed."""
    from botocore.exceptions import ClientError

    try:
        reply = client.put_object(
            Bucket=bucket, Key=key, Body=json.dumps(record).encode(), **condition
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return None
        if code in ("NoSuchKey", "404") and "IfMatch" in condition:  # released meanwhile
            return None
        raise StorageError(f"run lease s3://{bucket}/{key}: {scrub(str(exc))}") from None
    return reply["ETag"]


def _get(client, bucket: str, key: str) -> tuple[dict | None, str | None]:
    from botocore.exceptions import ClientError

    try:
        reply = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise StorageError(f"run lease s3://{bucket}/{key}: {scrub(str(exc))}") from None
    try:
        return json.loads(reply["Body"].read()), reply["ETag"]
    except json.JSONDecodeError:
        return {}, reply["ETag"]


def acquire(
    storage_path: str,
    run_name: str,
    *,
    command: str | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    s3: S3Options | None = None,
) -> RunLease:
    """The lease of run `run_name` under `storage_path` (a folder or s3://bucket/prefix), for
    this process; `LeaseHeldError` when a live launch holds it."""
    owner = new_owner(command)
    if is_s3(storage_path):
        return _S3Lease.acquire(storage_path, run_name, owner, ttl_s, s3)
    folder = Path(storage_path).expanduser().resolve() / run_name
    return _FolderLease.acquire(folder, run_name, owner)
