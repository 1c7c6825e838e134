"""What MLflow shows of a run besides its params and metrics: the data it read, as dataset
inputs ("Datasets" in the UI), and the machine it ran on, as system metrics.

    client.log_inputs(run_id, datasets=dataset_inputs(manifest, ["train", "val"]))
    with system_metrics(uri, run_id):           # system/cpu_utilization_percentage, ...
        train()

`tracking.RunLogger.log_datasets` logs the inputs once per run; the Ray Train lead worker runs
its training inside `system_metrics`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.tracking.store import checked_value

_log = logging.getLogger(__name__)

# ---- dataset inputs --------------------------------------------------------------------------

# MLflow's `mlflow.data.context` input tag for each split (what `mlflow.log_input` users set).
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}

# Arrow column types of the shards (`Manifest.columns`) as MLflow column types.
_ARROW_TO_MLFLOW = {
    "binary": DataType.binary,
    "large_binary": DataType.binary,
    "string": DataType.string,
    "large_string": DataType.string,
    "int64": DataType.long,
    "int32": DataType.integer,
    "double": DataType.double,
    "float": DataType.float,
    "bool": DataType.boolean,
}


def imbalance_label(factor: float) -> str:
    """`if100`, `if12p5`: an imbalance factor as model and dataset names carry it (no dot)."""
    factor = float(factor)
    return "if" + (str(int(factor)) if factor.is_integer() else f"{factor:g}".replace(".", "p"))


def dataset_name(manifest: Any, split: str) -> str:
    """`cifar10-lt-if100-train`: the dataset, its imbalance factor when the long-tailed subset
    was drawn by us (CIFAR-style), and the split; `imagenet-lt-val` for the benchmarks that
    ship their own long-tailed lists."""
    base = str(manifest.dataset).replace("_", "-")
    if getattr(manifest, "selection", None) is not None:
        base += f"-lt-{imbalance_label(manifest.imbalance_factor)}"
    return f"{base}-{split}"


def _source_type(uri: str) -> str:
    """MLflow's source type for a dataset URI: its scheme ("s3", "gs", ...), "local" for files."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return "local" if scheme in ("", "file") else scheme


def dataset_location(manifest: Any) -> str:
    """The URI of a prepared dataset's folder, from where `read_manifest` found it:
    `s3://bucket/prefix`, or `file:///abs/path` for a local folder (even when it was given as a
    relative path)."""
    fs = getattr(manifest, "filesystem", None)
    root = getattr(manifest, "root", "") or ""
    if fs is not None and root:
        kind = getattr(fs, "type_name", "local")
        if kind == "local" and os.path.isabs(root):
            return Path(root).as_uri()
        return f"{kind}://{root}"
    uri = str(getattr(manifest, "uri", "") or "")
    if not uri or "://" in uri:
        return uri
    return Path(uri).resolve().as_uri()


def _dataset_schema(manifest: Any) -> str | None:
    specs = []
    for column in getattr(manifest, "columns", None) or []:
        kind = _ARROW_TO_MLFLOW.get(str(column.type))
        if kind is None:
            return None  # a type MLflow has no name for: no schema rather than a wrong one
        specs.append(ColSpec(kind, column.name))
    return json.dumps({"mlflow_colspec": Schema(specs).to_dict()}) if specs else None


def split_digest(manifest: Any, split: str) -> str:
    """MLflow's digest of one split: 16 hex of the sha256 of its shards' checksums, in order.
    A function of the split's bytes only, so two datasets sharing a split (the same val images
    under two imbalance factors) share its digest, and no two splits of one dataset do (unless
    one lists the other's very shards, `split_aliases`)."""
    shards = manifest.splits[split].shards
    blob = "\n".join(f"{s.sha256} {s.num_rows}" for s in shards)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_inputs(
    manifest: Any, splits: Sequence[str], *, uri: str | None = None
) -> list[DatasetInput]:
    """MLflow dataset inputs for `splits` of a prepared dataset (a `Manifest`): name
    `dataset_name`, digest `split_digest` (from the split's shards' checksums), source the
    dataset folder's URI (`uri`, default `dataset_location`; passwords masked, credentials
    refused), the shards' column schema, a profile of the split (rows, classes, per-class
    counts, shards) and the input tag `mlflow.data.context` (training / validation / testing)."""
    location = dataset_location(manifest) if uri is None else uri
    schema = _dataset_schema(manifest)
    aliases = getattr(manifest, "split_aliases", None) or {}
    out = []
    for split in splits:
        info = manifest.splits[split]
        name = dataset_name(manifest, split)
        source = checked_value("dataset source", name, location)
        profile: dict[str, Any] = {
            "num_rows": int(info.num_rows),
            "num_classes": len(info.class_counts),
            "class_counts": [int(c) for c in info.class_counts],
            "num_shards": len(info.shards),
        }
        if split in aliases:
            profile["same_shards_as"] = aliases[split]
        dataset = Dataset(
            name=name,
            digest=split_digest(manifest, split),
            source_type=_source_type(location),
            source=json.dumps({"uri": source}),
            schema=schema,
            profile=json.dumps(profile, separators=(",", ":")),
        )
        context = SPLIT_CONTEXTS.get(split, split)
        out.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


# ---- system metrics --------------------------------------------------------------------------

# Seconds between samples (MLflow's own default is 10 s); $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
# overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0


def _system_metrics_disabled() -> bool:
    value = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    return value in ("false", "0", "no", "off")


def _gpu_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch, or a broken CUDA setup: nothing to say about GPUs
        return False


@contextlib.contextmanager
def system_metrics(
    uri: str, run_id: str, *, interval_s: float | None = None, enabled: bool = True
) -> Iterator[bool]:
    """Log this machine's system metrics into run `run_id` while the block runs: MLflow's
    `SystemMetricsMonitor` (a daemon thread) samples CPU, memory, disk and network, and the GPUs
    when `pynvml` (nvidia-ml-py) is installed, every `interval_s` seconds
    ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else `interval_s`, else 5 s), as `system/...`
    metrics continuing the run's earlier steps (a resumed run appends). The block's last,
    partial window is logged when it ends, whether it ends normally or by an exception, so even
    a short block leaves one point.

    Yields whether monitoring runs: not when `enabled` is false (e.g. on all but one worker) or
    $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false, nor without `psutil` (one log line says
    so). MLflow's own INFO lines are kept quiet.
    """
    monitor = _system_metrics_monitor(uri, run_id, interval_s) if enabled else None
    if monitor is None:
        yield False
        return
    monitor.start()
    try:
        yield True
    finally:
        monitor.finish()
        try:  # the last window (MLflow's loop drops it when stopped mid-interval)
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:
            _log.warning("[shike] last system metrics sample not logged: %s", exc)


def _system_metrics_monitor(uri: str, run_id: str, interval_s: float | None) -> Any:
    """An MLflow `SystemMetricsMonitor` for the run, not started; None when disabled or
    unavailable."""
    if _system_metrics_disabled():
        return None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its INFO lines
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil is missing
        _log.info("[shike] system metrics not logged: %s", exc)
        return None
    try:
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s or SYSTEM_METRICS_INTERVAL_S,
            resume_logging=True,
            tracking_uri=uri,
        )
    except Exception as exc:  # the monitors could not read this machine: train anyway
        _log.warning("[shike] system metrics not logged: %s", exc)
        return None
    kinds = {type(m).__name__ for m in monitor.monitors}
    if not kinds & {"GPUMonitor", "ROCMMonitor"} and _gpu_visible():
        _log.info("[shike] GPU system metrics not logged: install nvidia-ml-py (pynvml)")
    return monitor
