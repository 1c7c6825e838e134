"""What the jobs print: the project's own lines; Ray's and MLflow's own logging at WARNING.

By default a job's console shows where it runs, the "[shike] ..." lines the training loop logs
on rank 0 (one per epoch, with its ETA), the results and where to find them: INFO chatter from
Ray and MLflow would bury them. Warnings and errors of every library still show, so nothing that
needs the user is hidden (e.g. the Train controller's "PreemptionWatcher ... max_restarts > 0"
error line of Ray 2.60; MLflow's printed "Created version ..." lines stay too). `--verbose` (or
SHIKE_VERBOSE=1) leaves Ray and MLflow at their own levels, and shows Ray Tune's trial tables
(pipeline.distributed.tune). Each source of chatter has its own setting, noted where it is set:
QUIET_ENV, QUIET_LOGGERS, TRAIN_REPORT_MODULE, DROPPED_NOTICES, `quiet_ray_worker`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.data.readers.ray_progress import RAY_DATA_BARS_OFF_NOTICE

VERBOSE_ENV = "SHIKE_VERBOSE"

# Environment of the job's processes (this one and, through runtime_env, every Ray worker) in
# the default, quiet mode. A variable the user has set keeps the user's value. Ray Data logs
# "Starting execution", the plan and "execution finished" of every dataset run at INFO on
# `ray.data`, in whichever process runs it (the driver, the split coordinator, the train
# workers), and sets that logger's level from RAY_DATA_LOG_LEVEL each time it configures
# logging. MLflow logs at INFO on `mlflow` and draws a progress bar for artifact downloads.
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# Loggers set to WARNING in this process (quiet mode). `ray` is reset to INFO when Ray is first
# imported, so `setup_console` imports it first. Ray Train's own start-up and checkpoint lines
# (`ray.train`, in its controller and worker actors) take `train_log_level()`; Ray core's
# "Started a local Ray instance ..." (`ray`, driver) takes `ray.init(logging_level=...)`.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic")

# ray/train/v2/_internal/execution/context.py, whose logger is named by this path. Every
# `ray.train.report` is logged there at INFO ("Reporting training result N: TrainingReport(...)"
# with all metrics, from each worker); Ray 2.60 names that logger by the file's path
# (`logging.getLogger(__file__)`), so its records reach the root logger, which Ray Train sets to
# INFO for the workers' own "[shike]" lines: that one logger is set to WARNING in each process.
TRAIN_REPORT_MODULE = ("train", "v2", "_internal", "execution", "context.py")
# MLflow's warning on each model logged in the pickle format, which pipeline.tracking.registry
# chose on purpose (its SERIALIZATION_FORMAT note).
PICKLE_NOTICE = "Saving pytorch model by Pickle or CloudPickle format"
# Ray's notice, on starting a local instance, that it enabled token authentication (which stays on).
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
# Accepted notices dropped in quiet mode: {logger name: message prefix}.
DROPPED_NOTICES = {
    "mlflow.pytorch": PICKLE_NOTICE,
    "ray._private.authentication.authentication_token_setup": TOKEN_AUTH_NOTICE,
}

# What setup_console put into os.environ that the user had not set: the job's Ray workers get the
# same (ray_init_kwargs); a variable the user set reaches them through the user's own environment.
_set_here: dict[str, str] = {}
_quiet = False  # setup_console ran, not verbose
_saved_levels: dict[str, int] = {}  # the loggers' own levels, restored by a verbose setup


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix` (one known, accepted notice)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def setup_console(verbose: bool = False) -> bool:
    """Set this process's console for a job; whether it is verbose (`verbose` or
    SHIKE_VERBOSE=1). Call it before the job's first Ray / MLflow call. Imports Ray."""
    global _quiet
    verbose = verbose or is_verbose()
    wanted = {VERBOSE_ENV: "1" if verbose else "0"} | ({} if verbose else QUIET_ENV)
    for key, value in wanted.items():
        if key not in os.environ or key in _set_here:
            os.environ[key] = _set_here[key] = value
    if verbose:  # an earlier call in this process may have set the quiet values
        for key in QUIET_ENV.keys() & _set_here.keys():
            del os.environ[key], _set_here[key]
    _quiet = not verbose
    import ray  # noqa: F401  (its first import sets the `ray` logger to INFO)

    for logger in [*map(logging.getLogger, QUIET_LOGGERS), train_report_logger()]:
        name = logger.name
        if _quiet:
            _saved_levels.setdefault(name, logger.level)
            logger.setLevel(logging.WARNING)
        elif name in _saved_levels:
            logger.setLevel(_saved_levels.pop(name))
    for name, notice in DROPPED_NOTICES.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropMessage)]:
            logger.removeFilter(old)
        if _quiet:
            logger.addFilter(_DropMessage(notice))
    return verbose


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for the job's `ray.init`: the console settings for every Ray worker of
    the job, on any node (a runtime_env, which Ray merges with that of `ray job submit`). Empty
    when setup_console has not run."""
    runtime_env: dict[str, Any] = {"env_vars": dict(_set_here)} if _set_here else {}
    kwargs: dict[str, Any] = {}
    if _quiet:
        runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_ray_worker"
        kwargs["logging_level"] = logging.WARNING  # the driver's `ray` logger ("Started a ...")
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    return kwargs


def train_report_logger() -> logging.Logger:
    """The logger of Ray Train's "Reporting training result N: TrainingReport(...)" lines,
    named by its module's file path (without importing that module)."""
    import ray

    return logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *TRAIN_REPORT_MODULE))


def quiet_ray_worker() -> None:
    """Runs in every Ray worker process of the job at start-up (quiet mode only). Ray Data's
    progress bars are off (pipeline.data.readers.ray_reader.quiet_progress); its one-time notice
    that they are off is marked as given here, in whichever worker runs a dataset."""
    from ray.util.debug import log_once

    log_once(RAY_DATA_BARS_OFF_NOTICE)  # the bars are off on purpose: no notice
    train_report_logger().setLevel(logging.WARNING)


def train_log_level() -> str:
    """Ray Train's console level for `RunConfig(logging_config=LoggingConfig(log_level=...))`."""
    return "INFO" if is_verbose() else "WARNING"


def ray_target() -> str:
    """Where `ray.init()` will connect, in words."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        return f"the Ray cluster at {address}"
    return "a local Ray instance"


def say(line: str) -> None:
    """One line of the job's own console output."""
    print(f"[shike] {line}", flush=True)
