"""What a run's checkpoint storage holds: the checkpoints Ray Train registered, and the rest.

Ray Train V2 keeps, in `<storage>/<run>/checkpoint_manager_snapshot.json`, the checkpoints its
controller registered; that is what a restarted worker group or a relaunched driver resumes
from. A worker writes its `checkpoint_<time>` folder before the controller registers it, so a
worker group that dies in between leaves a folder that nothing refers to and `num_to_keep`
never deletes (it counts registered checkpoints only). The driver removes such folders before
and after training (never during: a folder being written is not registered yet).

Beside them, `.shike-data.json` records the data the run name was first launched with
(`pipeline.data.manifest.data_identity`): every later launch of the name must read the same
data (`pipeline.distributed.preflight`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.config import Config
from pipeline.storage import StorageError, display, is_s3, resolve

SNAPSHOT = "checkpoint_manager_snapshot.json"
DATA_RECORD = ".shike-data.json"  # hidden, like the lease: not one of Ray's files


@dataclass(frozen=True)
class KeptCheckpoint:
    path: str  # as the user would write it (s3://... or a local path)
    epoch: int  # epochs completed when it was written


def _run_dir(cfg: Config, run_name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = resolve(cfg.cluster.storage_path)
    return fs, f"{root.rstrip('/')}/{run_name}"


def _read(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The file's bytes; None when there is none."""
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:  # pyarrow reports a missing S3 key as OSError on some versions
        if "not exist" in str(exc) or "NoSuchKey" in str(exc):
            return None
        raise


def _snapshot(fs: pafs.FileSystem, run_dir: str) -> dict | None:
    blob = _read(fs, f"{run_dir}/{SNAPSHOT}")
    try:
        return json.loads(blob) if blob is not None else None
    except json.JSONDecodeError:
        return None


def data_record(cfg: Config, run_name: str) -> dict | None:
    """The data the run name was first launched with (`write_data_record`); None for a new
    name, or one from before the record existed."""
    fs, run_dir = _run_dir(cfg, run_name)
    path = f"{run_dir}/{DATA_RECORD}"
    blob = _read(fs, path)
    if blob is None:
        return None
    try:
        record = json.loads(blob)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or "manifest_hash" not in record:
        # Written atomically, so only a hand edit gets here: refuse rather than guess the data.
        raise StorageError(
            f"{display(fs, path)} is not a data record (expected JSON with a manifest_hash): "
            "restore it, or delete it to record this launch's data"
        )
    return record


def write_data_record(cfg: Config, run_name: str, identity: dict) -> None:
    """Record `identity` as the run name's data. Call only while holding the run's lease."""
    fs, run_dir = _run_dir(cfg, run_name)
    path, blob = f"{run_dir}/{DATA_RECORD}", json.dumps(identity, indent=1).encode()
    if is_s3(cfg.cluster.storage_path):  # one PUT: readers see all of it or nothing
        with fs.open_output_stream(path) as stream:
            stream.write(blob)
        return
    fs.create_dir(run_dir, recursive=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # a crash mid-write leaves no half record behind
    with fs.open_output_stream(tmp) as stream:
        stream.write(blob)
    fs.move(tmp, path)


def latest_checkpoint(cfg: Config, run_name: str) -> KeptCheckpoint | None:
    """The newest checkpoint Ray Train registered for the run (what a relaunch resumes from)."""
    fs, run_dir = _run_dir(cfg, run_name)
    state = _snapshot(fs, run_dir)
    latest = (state or {}).get("latest_checkpoint_result")
    if not latest:
        return None
    base = cfg.cluster.storage_path.rstrip("/")
    if not is_s3(base):
        base = os.path.abspath(base)
    return KeptCheckpoint(
        path=f"{base}/{run_name}/{latest['checkpoint_dir_name']}",
        epoch=int(latest.get("metrics", {}).get("epoch", 0)),
    )


def remove_unregistered_checkpoints(cfg: Config, run_name: str) -> list[str]:
    """Delete the run's checkpoint folders that Ray Train did not register; their names.
    Call only while no worker group of the run is alive."""
    fs, run_dir = _run_dir(cfg, run_name)
    try:
        entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return []
    state = _snapshot(fs, run_dir) or {}
    registered = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
    orphans = [
        e.base_name
        for e in entries
        if e.type == pafs.FileType.Directory
        and e.base_name.startswith("checkpoint_")
        and e.base_name not in registered
    ]
    for name in orphans:
        fs.delete_dir(f"{run_dir}/{name}")
    return orphans
