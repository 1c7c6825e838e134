"""The MLflow store this process talks to: which one, whether it answers, and what may be
written to it.

Tracking URIs: the config value, else $MLFLOW_TRACKING_URI, else the embedded default
`sqlite:///<cwd>/mlflow.db`. For every SQLite store the experiment's artifact location is
pinned to `<folder of the .db file>/mlartifacts/<experiment>` (`sqlite_artifact_root`), so the
default keeps artifacts in `<cwd>/mlartifacts` and a store in a temporary folder keeps its
artifacts there too, never in the process's working directory. Against an `mlflow server`
(http/https) the server decides (`--artifacts-destination`, proxied with `--serve-artifacts`).

Credentials never reach MLflow: every param and tag key and value (run or model version) goes
through `checked_key` / `checked_value`, which refuse keys that look like secrets and values
containing a credential from the environment, and mask passwords inside URIs.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from pipeline.credentials import credential_env_values, looks_secret, redact_uri

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"


class TrackingError(RuntimeError):
    """A tracking problem, with a one-line message (names the URI / run / key involved)."""


# ---- which store -----------------------------------------------------------------------------


def resolve_tracking_uri(configured: str | None) -> str:
    """The config value, else $MLFLOW_TRACKING_URI, else `sqlite:///<abs cwd>/mlflow.db`."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB_NAME}"


def sqlite_artifact_root(uri: str) -> Path | None:
    """`<folder of the .db file>/mlartifacts` for a SQLite tracking URI; None for other stores
    (and for an in-memory SQLite database)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        return None  # sqlite:// (in memory) or a form we do not interpret
    path = rest[3:].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    # sqlite:////abs/x.db -> "/abs/x.db"; sqlite:///rel/x.db -> "rel/x.db" (relative to cwd).
    return Path(path).expanduser().resolve().parent / ARTIFACTS_DIR_NAME


# ---- does it answer --------------------------------------------------------------------------


# A server that answered this recently is not probed again: one job's steps (open the run,
# resolve a version, register) each guard their first MLflow call, and should reach the
# server's /health once between them, not once each.
HEALTHY_FOR_S = 60.0
_answered_at: dict[str, float] = {}


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, within `timeout_s`, when an http(s) tracking server does not answer.

    MLflow's own client retries an unreachable server with back-off for minutes; this probe
    (GET <uri>/health) turns that into one clear error. SQLite / file stores: no-op. A server
    that answered within `HEALTHY_FOR_S` is taken as up.
    """
    if not uri.startswith(("http://", "https://")):
        return
    if time.monotonic() - _answered_at.get(uri, -math.inf) < HEALTHY_FOR_S:
        return
    _probe_health(uri, timeout_s)
    _answered_at[uri] = time.monotonic()


def _probe_health(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    # Userinfo in the URL would be sent by urllib as part of the host: strip it for the probe.
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
                outcome["status"] = resp.status
        except urllib.error.HTTPError as exc:  # the server answered, with an error status
            outcome["status"] = exc.code
        except Exception as exc:  # connection refused, DNS failure, socket timeout, TLS
            outcome["error"] = exc

    # A thread bounds the whole probe (name resolution included, which urllib does not time).
    worker = threading.Thread(target=probe, daemon=True, name="mlflow-health-probe")
    worker.start()
    worker.join(timeout_s)
    shown = redact_uri(uri)
    if worker.is_alive():
        raise TrackingError(f"MLflow tracking server {shown} did not answer within {timeout_s:g} s")
    if "error" in outcome:
        exc = outcome["error"]
        reason = getattr(exc, "reason", None) or exc
        raise TrackingError(f"MLflow tracking server {shown} is unreachable: {reason}")
    status = outcome.get("status", 0)
    if status >= 500:
        raise TrackingError(
            f"MLflow tracking server {shown} is unhealthy: HTTP {status} on /health"
        )


# ---- MLflow's process globals ----------------------------------------------------------------


@contextlib.contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking and registry URIs at `uri` for the block.

    Needed only for MLflow's fluent helpers (model logging, `models:/` loading) which read the
    globals; the previous values (and the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables
    that `set_tracking_uri` exports) are restored afterwards. Not for concurrent threads.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = saved_tracking
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- what may be written ---------------------------------------------------------------------


def checked_key(kind: str, key: str) -> str:
    """`key`, unless it names a credential (then a TrackingError naming `kind` and `key`)."""
    if looks_secret(key):
        raise TrackingError(
            f"refusing to log {kind} '{key}' to MLflow: the name looks like a credential"
        )
    return key


def checked_value(kind: str, key: str, value: str) -> str:
    """`value` with URI passwords masked; a TrackingError when it contains a credential from
    the environment."""
    for var, secret in credential_env_values():
        if secret in value:
            raise TrackingError(
                f"refusing to log {kind} '{key}' to MLflow: its value contains ${var}"
            )
    return redact_uri(value)


def checked_tags(tags: Mapping[str, Any], kind: str = "tag") -> dict[str, str]:
    """`tags` as strings, each key and value checked; None values are left out."""
    return {
        checked_key(kind, key): checked_value(kind, key, str(value))
        for key, value in tags.items()
        if value is not None
    }
