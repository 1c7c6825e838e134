"""The checks every launch makes before Ray starts, written once for training runs and sweeps:
the data is set and sound, the recipe can run on Ray, the tracking server answers, and this
launch holds the run name's lease. Each failure is one line, raised as the caller's error type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.data.integrity import verify_dataset
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.distributed import run_lease
from pipeline.tracking.store import check_tracking_server, resolve_tracking_uri
from pipeline.training.session import ENGINE_ONLY_GRAPHS


@dataclass
class Launch:
    """What a launch that passed its checks works with."""

    manifest: Manifest  # cfg.data.uri's, read and verified once
    tracking_uri: str
    lease: run_lease.RunLease


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
    # The manifest's checksum, and its class counts against the labels in the shards: wrong
    # counts would train wrong class priors.
    manifest = verify_dataset(read_manifest(cfg.data.uri))
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_server(uri)
    try:
        lease = run_lease.acquire(cfg.cluster.storage_path, name, command=command)
    except run_lease.LeaseHeldError as exc:
        raise error(str(exc)) from None
    with lease:
        yield Launch(manifest, uri, lease)
