"""The jobs' console (pipeline.distributed.console): Ray's and MLflow's loggers at WARNING by
default, their own levels with --verbose, and the same settings handed to the Ray workers."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline.distributed import console

LOGGERS = (*console.QUIET_LOGGERS, "mlflow.pytorch")


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """setup_console changes os.environ, logger levels and the module's own state: undo all."""
    for key in (console.VERBOSE_ENV, *console.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(console, "_set_here", {})
    monkeypatch.setattr(console, "_quiet", False)
    monkeypatch.setattr(console, "_saved_levels", {})
    import ray  # noqa: F401  (its import sets the `ray` logger's level once: before the snapshot)

    loggers = [*map(logging.getLogger, LOGGERS), console.train_report_logger()]
    saved = [(lg, lg.level, list(lg.filters)) for lg in loggers]
    yield
    for lg, level, filters in saved:
        lg.setLevel(level)
        lg.filters[:] = filters


def _level(name: str) -> int:
    return logging.getLogger(name).getEffectiveLevel()


def test_default_console_puts_ray_and_mlflow_at_warning():
    assert console.setup_console() is False
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow"):
        assert _level(name) == logging.WARNING, name
    assert console.train_report_logger().getEffectiveLevel() == logging.WARNING
    assert console.train_log_level() == "WARNING"
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    # errors and warnings still pass
    assert logging.getLogger("ray.data").isEnabledFor(logging.WARNING)
    assert logging.getLogger("mlflow").isEnabledFor(logging.ERROR)

    kwargs = console.ray_init_kwargs()
    assert kwargs["logging_level"] == logging.WARNING
    env = kwargs["runtime_env"]
    assert env["env_vars"] == {
        console.VERBOSE_ENV: "0",
        "RAY_DATA_LOG_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    assert env["worker_process_setup_hook"] == "pipeline.distributed.console.quiet_ray_worker"


def test_verbose_leaves_the_libraries_levels_and_hands_workers_nothing_quiet():
    before = {name: _level(name) for name in ("ray", "ray.data", "mlflow")}
    console.setup_console()
    assert console.setup_console(verbose=True) is True  # back from quiet, in the same process
    assert {name: _level(name) for name in before} == before
    assert _level("ray") == logging.INFO
    assert console.train_log_level() == "INFO"
    assert "RAY_DATA_LOG_LEVEL" not in os.environ
    assert console.ray_init_kwargs() == {"runtime_env": {"env_vars": {console.VERBOSE_ENV: "1"}}}


def test_verbose_from_the_environment(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.setup_console() is True
    # the user's own variable reaches the workers through the user's environment
    assert console.ray_init_kwargs() == {}


def test_a_variable_the_user_set_keeps_its_value_and_is_not_handed_on(monkeypatch):
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    console.setup_console()
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"
    # `ray job submit --runtime-env-json` with the same key would conflict with ray.init's
    assert "RAY_DATA_LOG_LEVEL" not in console.ray_init_kwargs()["runtime_env"]["env_vars"]


def test_without_setup_ray_init_is_unchanged():
    assert console.ray_init_kwargs() == {}


def test_the_train_report_logger_is_the_one_ray_train_logs_its_reports_on():
    # Ray 2.60 names it by file path; if Ray renames it, the quiet console would show the
    # "Reporting training result N: TrainingReport(...)" lines again.
    from ray.train.v2._internal.execution import context

    assert console.train_report_logger() is context.logger


def test_worker_hook_quiets_the_reports_and_the_bars_off_notice():
    from ray.util.debug import log_once

    console.quiet_ray_worker()
    assert console.train_report_logger().level == logging.WARNING
    assert not log_once(console.RAY_DATA_BARS_OFF_NOTICE)  # already given: never printed


@pytest.mark.parametrize("name", sorted(console.DROPPED_NOTICES))
def test_only_the_known_notices_are_dropped(name):
    """MLflow's pickle notice and Ray's token-auth notice; any other warning of theirs shows."""
    console.setup_console()
    logger = logging.getLogger(name)

    def passes(msg: str) -> bool:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)
        return all(f.filter(record) for f in logger.filters)

    assert not passes(console.DROPPED_NOTICES[name] + " ... more text")
    assert passes("any other warning")


@pytest.mark.parametrize("job", ["train", "tune", "evaluate", "promote"])
def test_every_job_takes_verbose(job):
    import importlib

    parser = importlib.import_module(f"jobs.{job}").build_parser()
    action = next(a for a in parser._actions if "--verbose" in a.option_strings)
    assert action.default is False and action.const is True
