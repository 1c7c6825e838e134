"""What a run's checkpoint storage holds: the checkpoints Ray Train registered, and the rest.

Ray Train V2 keeps, in `<storage>/<run>/checkpoint_manager_snapshot.json`, the checkpoints its
controller registered; that is what a restarted worker group or a relaunched driver resumes
from. A worker writes its `checkpoint_<time>` folder before the controller registers it, so a
worker group that dies in between leaves a folder that nothing refers to and `num_to_keep`
never deletes (it counts registered checkpoints only). The driver removes such folders before
and after training (never during: a folder being written is not registered yet).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.config import Config
from pipeline.storage import is_s3, resolve

SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class KeptCheckpoint:
    path: str  # as the user would write it (s3://... or a local path)
    epoch: int  # epochs completed when it was written


def _run_dir(cfg: Config, run_name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = resolve(cfg.cluster.storage_path)
    return fs, f"{root.rstrip('/')}/{run_name}"


def _snapshot(fs: pafs.FileSystem, run_dir: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{run_dir}/{SNAPSHOT}") as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as exc:  # pyarrow reports a missing S3 key as OSError on some versions
        if "not exist" in str(exc) or "NoSuchKey" in str(exc):
            return None
        raise


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
