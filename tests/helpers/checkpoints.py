"""The checkpoint a training run's storage holds, read by the pipeline's own reader."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import build_config
from pipeline.distributed.run_storage import KeptCheckpoint, latest_checkpoint


def registered_checkpoint(storage: Path, run_name: str) -> KeptCheckpoint | None:
    """The newest checkpoint the Train controller registered for `run_name` under `storage`
    (its `checkpoint_manager_snapshot.json`, what a restarted worker group or a relaunched driver
    resumes from); None before the first registration or while the snapshot is being written."""
    return latest_checkpoint(build_config(values={"cluster.storage_path": str(storage)}), run_name)
