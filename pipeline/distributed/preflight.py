"""The checks every launch makes before Ray starts, written once for training runs and sweeps:
the data is set and sound, the outputs are not written into Ray's temporary copy of a submitted
job's working directory, the recipe can run on Ray, the tracking server answers, this launch
holds the run name's lease, and it reads the data the name was started with. Each failure is
one line, raised as the caller's error type, before anything is written to the MLflow run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, ConfigError, build_config
from pipeline.data.integrity import verify_dataset
from pipeline.data.manifest import (
    Manifest,
    data_identity,
    data_refusal,
    data_settings,
    read_manifest,
    same_data,
)
from pipeline.data.readers.device_decode import decodes_on_device
from pipeline.distributed import console, run_lease, run_storage
from pipeline.distributed.submission import settings_inside_ray_copy
from pipeline.tracking.store import check_tracking_server, resolve_tracking_uri
from pipeline.training.session import ENGINE_ONLY_GRAPHS


@dataclass
class Launch:
    """What a launch that passed its checks works with."""

    config: Config  # the launch's, with the data settings the manifest records
    manifest: Manifest  # cfg.data.uri's, read and verified once
    tracking_uri: str
    lease: run_lease.RunLease
    data: dict[str, Any]  # the manifest's `data_identity`: what checkpoints record
    name: str  # the run's (or sweep's) name
    unrecorded: bool  # the name has no data record yet (`record_data`)

    def record_data(self) -> None:
        """Record the data as the name's, once the launch starts its run: a launch refused
        after the preflight (no State API, too small a cluster) leaves no record behind."""
        if self.unrecorded:
            run_storage.write_data_record(self.config, self.name, self.data)
            self.unrecorded = False


@contextlib.contextmanager
def preflight(
    cfg: Config, name: str, error: type[Exception], *, command: str | None = None
) -> Iterator[Launch]:
    """Check `cfg` for a launch of run (or sweep) `name` and hold its lease while the block
    runs. `error`: the exception type a failed check raises (the caller's, so its job prints
    one line); `command`: what the lease tells a second launch is running."""
    if not cfg.data.uri:
        raise error(
            "data.uri is not set: prepare the dataset with jobs/prepare_data.py and pass "
            "--set data.uri=<its output URI>"
        )
    if cfg.train.cuda_graphs:
        raise error(ENGINE_ONLY_GRAPHS)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    inside_ray_copy = settings_inside_ray_copy(cfg, uri)  # under `ray job submit --working-dir`
    if inside_ray_copy:
        raise error(inside_ray_copy)
    # The manifest's checksum, and its class counts against the labels in the shards: wrong
    # counts would train wrong class priors.
    manifest = verify_dataset(read_manifest(cfg.data.uri))
    cfg = _with_data_settings(cfg, manifest, error)
    try:  # data.decode_on=device where the config rules it out (GPUs off, PNG images)
        decodes_on_device(
            cfg.data, manifest.image.encoding, cfg.cluster.use_gpu != "false", cfg.data.uri
        )
    except ConfigError as exc:
        raise error(str(exc)) from None
    check_tracking_server(uri)
    try:
        lease = run_lease.acquire(cfg.cluster.storage_path, name, command=command)
    except run_lease.LeaseHeldError as exc:
        raise error(str(exc)) from None
    with lease:
        data = data_identity(manifest)
        recorded = _same_data_as_before(cfg, name, data, error)
        yield Launch(cfg, manifest, uri, lease, data, name, unrecorded=not recorded)


def _same_data_as_before(
    cfg: Config, name: str, data: dict[str, Any], error: type[Exception]
) -> bool:
    """Whether the name has a data record; refused when it records other data (issue 35: a
    relaunch with another dataset resumed the old checkpoint and logged its splits into the
    old MLflow run). Checked under the lease, so two first launches cannot both record."""
    recorded = run_storage.data_record(cfg, name)
    if recorded is not None and not same_data(recorded, data):
        raise error(data_refusal(f"run '{name}' was started on", recorded, data))
    return recorded is not None


def _with_data_settings(cfg: Config, manifest: Manifest, error: type[Exception]) -> Config:
    """`cfg` with the data settings (dataset, imbalance factor, n_max, ...) the manifest
    records: what the run logs, checks on resume and names its model by is the data it reads.
    The config's values, which only `prepare_data` acts on, are replaced; a note says which."""
    settings = data_settings(manifest)
    flat = cfg.flat()
    differ = {k: v for k, v in settings.items() if flat.get(k) != v}
    if not differ:
        return cfg
    try:
        updated = build_config(cfg.to_dict(), values=settings)
    except ConfigError as exc:
        raise error(f"the dataset at {cfg.data.uri}: {exc}") from None
    given = [f"{k} {v} (config: {flat[k]})" for k, v in differ.items() if flat.get(k) is not None]
    if given:  # values the config file states that this data does not have
        console.say(f"data settings from the dataset's manifest: {', '.join(given)}")
    return updated
