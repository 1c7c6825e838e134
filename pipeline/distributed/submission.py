"""Durable outputs under `ray job submit --working-dir .`.

Ray runs a submitted job from its own copy of the working directory, under the head's temporary
folder (`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/`). A
relative path there (the defaults `./runs` and `sqlite:///<cwd>/mlflow.db`, a `.data/...`
dataset) names a place inside that copy: the MLflow store, the registered models' artifacts and
the checkpoints would be written into a folder the next `ray start`, or the next package hash
after a code edit, replaces; and a git-ignored dataset is not in the copy at all. A launch
from such a copy is refused with one line naming the settings to point elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.storage import is_s3

# The folders of the path Ray unpacks a job's working directory to.
RAY_COPY_PARTS = ("runtime_resources", "working_dir_files")


def ray_working_dir_copy(cwd: Path | None = None) -> Path | None:
    """The root of Ray's copy of a submitted job's working directory when `cwd` (default: the
    current directory) is in one, else None."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == RAY_COPY_PARTS:
            return Path(*parts[: i + 3])
    return None


def _local_path(uri: str) -> Path | None:
    """The local file a setting names (resolved from the current directory), None when it is
    not a local path (s3://, http(s)://, an in-memory database, ...)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        return Path(path).resolve() if path and path != ":memory:" else None
    if uri.startswith("file://"):
        return Path(uri[len("file://") :]).resolve()
    if is_s3(uri) or "://" in uri or uri.startswith(("sqlite:", "databricks")):
        return None
    return Path(uri).resolve()


def settings_inside_ray_copy(cfg: Config, tracking_uri: str, cwd: Path | None = None) -> str | None:
    """The one-line refusal of a launch from Ray's working-directory copy whose tracking store,
    checkpoint storage or dataset would be inside that copy; None when they all lie outside
    (or the launch is not from such a copy)."""
    copy = ray_working_dir_copy(cwd)
    if copy is None:
        return None
    settings = {
        "tracking.tracking_uri (or MLFLOW_TRACKING_URI)": tracking_uri,
        "cluster.storage_path": cfg.cluster.storage_path,
        "data.uri": cfg.data.uri or "",
    }
    inside = []
    for name, value in settings.items():
        path = _local_path(value) if value else None
        if path is not None and (path == copy or copy in path.parents):
            inside.append(name)
    if not inside:
        return None
    return (
        f"this job runs in Ray's temporary copy of the working directory ({copy}), which the "
        f"next `ray start` or code change replaces: {', '.join(inside)} must name a durable "
        "location outside it, an absolute path on storage every node shares or s3://..., "
        "e.g. `--set cluster.storage_path=/shared/runs`, or for MLflow "
        """`ray job submit --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://..."}}'`"""
    )
