"""An MLflow environment isolated from the developer's: no tracking URI or experiment from the
environment, no telemetry or progress bars, and a scratch working directory that must stay empty
(nothing may fall back to ./mlruns or ./mlflow.db)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
_UNSET = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


@contextlib.contextmanager
def isolated_mlflow_env(cwd: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _ENV.items():
            mp.setenv(key, value)
        for key in _UNSET:
            mp.delenv(key, raising=False)
        mp.chdir(cwd)
        yield
    assert list(cwd.iterdir()) == [], "something was written to the working directory"
