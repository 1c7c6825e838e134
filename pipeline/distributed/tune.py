"""Sweeps with Ray Tune, tracked as MLflow parent/child runs.

Each trial (pipeline.distributed.trials) builds the trial's config, opens a child MLflow run
and trains: on the one device of its Tune actor when the sweep has one worker per trial
(`trial_workers`, 1 by default for CIFAR), else as a Ray Train run (Train V2 pattern) whose
reports reach Tune through `TuneReportCallback`. ASHA compares
`val/score`: the val accuracy after stage 2, and during stage 1 the val accuracy with post-hoc
logit adjustment, which anticipates what stage-2 balanced-softmax re-training will give (plain
stage-1 accuracy would favour head-class-biased configurations). The test split is never used
to choose. Relaunching a sweep with the same name resumes it.

Sweep YAML (configs/sweep_*.yaml):

    name: sweep-cifar10
    base_config: configs/cifar10_lt_if100.yaml
    overrides: [data.uri=s3://bucket/datasets/cifar10-lt-if100]
    metric: val/score
    num_samples: 8
    scheduler: {grace_period: 20, reduction_factor: 2}
    searcher: random            # or optuna
    trial_workers: 1            # one device per trial; 2+: a Ray Train run per trial
    reuse_actors: true          # a finished trial's actor runs the next (Ray Train trials:
                                # with scheduler none only)
    space:
      loss.dkt_weight: {choice: [3, 5, 10, 20, 30]}
      loss.tau: {uniform: [0.5, 1.5]}
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import Config, ConfigError, build_config
from pipeline.distributed import trials

if TYPE_CHECKING:
    from pipeline.distributed.preflight import Launch

# ----------------------------------------------------------------------------- the sweep file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: choice (list), grid (list), uniform/loguniform ([low, high]), randint."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice/grid/uniform/loguniform/randint (got {given or 'none'})"
            )
        return self

    def values_to_check(self) -> list[Any]:
        """Values that must all form a valid config (bounds for ranges)."""
        kind, value = next((k, v) for k, v in self.model_dump().items() if v is not None)
        return list(value)

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


class SchedulerSpec(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Strict):
    name: str
    base_config: str
    overrides: list[str] = []
    metric: str = "val/score"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    searcher: Literal["random", "optuna"] = "random"
    # Tune hands a finished trial's driver actor to the next trial instead of starting a new
    # process that imports Ray Train, torch and the pipeline again (bench/sweep_startup.py).
    # Ray Train trials: not with ASHA, as a trial it stops is still in trainer.fit(), which only
    # its driver's exit ends.
    reuse_actors: bool = True
    # Workers per trial. 1: the trial runs the training loop on one device inside its Tune
    # actor (no Ray Train worker group to start per trial); more: a Ray Train run per trial.
    # Unset: 1 for the CIFAR datasets, else the base config's cluster.num_workers.
    trial_workers: int | None = Field(None, ge=1)
    seed: int | None = 0
    space: dict[str, Distribution]

    def workers_per_trial(self, base: Config) -> int:
        if self.trial_workers is not None:
            return self.trial_workers
        return 1 if base.data.dataset in ("cifar10", "cifar100") else base.cluster.num_workers

    def expected_trials(self) -> int:
        """Trials a complete sweep has: num_samples per combination of the grid values."""
        return self.num_samples * math.prod(len(d.grid) for d in self.space.values() if d.grid)


class SweepError(ValueError):
    """A bad sweep file or a sweep that could not run; the message names the culprit."""


class SweepInterrupted(SweepError):
    """The sweep was stopped (Ctrl-C) before every trial ended; its state is saved."""


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Config]:
    """Parse a sweep YAML and check every search-space parameter against the config schema."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        spec = SweepSpec.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise SweepError(f"{path}: '{loc}': {err['msg']}") from None
    base_path = Path(spec.base_config)
    if not base_path.is_file() and (path.parent.parent / base_path).is_file():
        base_path = path.parent.parent / base_path  # relative to the repository root
    try:
        from pipeline.config import load_config

        base = load_config(base_path, [*spec.overrides, *(overrides or [])])
    except ConfigError as exc:
        raise SweepError(f"{path}: base config: {exc}") from None
    for key, dist in spec.space.items():
        for value in dist.values_to_check():
            try:
                build_config(base.to_dict(), values={key: value})
            except ConfigError as exc:
                raise SweepError(f"{path}: search space parameter '{key}': {exc}") from None
    return spec, base


def _gpus_for_trials(base: Config) -> float:
    """GPUs of the cluster the trials may use (none when cluster.use_gpu is false)."""
    import ray

    return 0 if base.cluster.use_gpu == "false" else ray.cluster_resources().get("GPU", 0)


def max_concurrent(spec: SweepSpec, base: Config) -> int:
    """Trials that fit the cluster at once: CPUs (or GPUs) / what one trial's workers ask."""
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    workers, gpus = base.cluster.num_workers, _gpus_for_trials(base)
    if gpus:
        return max(1, int(gpus // workers))
    per_trial = workers * base.cluster.cpus_per_worker
    if workers > 1:
        per_trial += 1  # Ray Data's tasks beside the Train workers
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def _trial_resources(base: Config) -> dict[str, float]:
    """What a trial's Tune actor asks: the device and CPUs it trains on (one-device trials),
    or nothing but a slot (a Ray Train trial's actor only waits for its workers)."""
    if base.cluster.num_workers > 1:
        return {"cpu": 0, "memory": 1}
    resources = {"cpu": base.cluster.cpus_per_worker}
    if _gpus_for_trials(base):
        resources["gpu"] = 1
    return resources


def _fit_noting_interrupt(tuner) -> tuple[Any, bool]:
    """(tuner.fit(), whether Tune caught a SIGINT).

    Tune swaps in its own SIGINT handler for the run; on the first Ctrl-C it puts the previous
    handler back, otherwise it leaves its own installed. Which one is installed afterwards
    therefore tells whether the run was interrupted; the previous handler is restored either
    way, so that Ctrl-C works again while the best model is registered.
    """
    import signal
    import threading

    tune_catches = (
        threading.current_thread() is threading.main_thread()
        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    )
    previous = signal.getsignal(signal.SIGINT)
    grid = tuner.fit()
    if not tune_catches:
        return grid, False
    interrupted = signal.getsignal(signal.SIGINT) is previous
    signal.signal(signal.SIGINT, previous)
    return grid, interrupted


def check_state_api(timeout_s: float = 15) -> None:
    """Refuse a Ray cluster whose State API (served by the dashboard) does not answer.

    When a trial ends, Tune stops its driver and with it the trial's Ray Train controller; the
    worker group's placement group is then released by Train's PlacementGroupCleaner, which
    asks the State API whether the controller is still alive. Without it the CPUs/GPUs of
    every finished trial stay reserved, and the next trials wait for them forever.
    """
    import ray
    from ray.util.state import list_actors

    # The cluster this driver is connected to: without an address the State API guesses one,
    # and refuses to when the machine runs several Ray instances.
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    try:
        list_actors(address=address, limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except Exception:
        raise SweepError(
            "Ray's State API does not answer (is the Ray dashboard running?): Ray Train needs "
            "it to free finished trials' resources, so the sweep would stall. Start Ray with "
            "its dashboard (the default of `ray start` and `ray.init()` with ray[default])"
        ) from None


def run_sweep(
    spec: SweepSpec, base: Config, name: str | None = None, register: bool = True
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary with the best trial and its model version.
    One launch per sweep name at a time (`pipeline.distributed.run_lease`, as for training runs)."""
    from pipeline.distributed.preflight import preflight

    name = name or spec.name
    workers = spec.workers_per_trial(base)
    if workers != base.cluster.num_workers:  # what each trial runs with, and its runs log
        base = build_config(base.to_dict(), values={"cluster.num_workers": workers})
    with preflight(base, name, SweepError) as launch:
        return _sweep(spec, launch.config, name, register, launch)  # the manifest's data settings


def _sweep(
    spec: SweepSpec, base: Config, name: str, register: bool, launch: Launch
) -> dict[str, Any]:
    import ray

    from pipeline.distributed import console

    if not ray.is_initialized():
        ray.init(**console.ray_init_kwargs())
    if base.cluster.num_workers > 1:  # Ray Train trials (one-device trials start no Train run)
        check_state_api()
    launch.record_data()
    uri, epochs = launch.tracking_uri, base.optim.epochs
    parent = _open_parent_run(spec, uri, base.tracking.experiment, name)
    grid, interrupted = _fit_noting_interrupt(_build_tuner(spec, base, name, parent, launch))
    # Ctrl-C makes Tune save its state and return early: the trials it stopped look like
    # finished ones and those not yet generated are missing. Nothing is chosen from that.
    if interrupted or len(grid) < spec.expected_trials():
        parent.finish("KILLED")
        raise SweepInterrupted(
            f"sweep '{name}' was interrupted ({len(grid)} of {spec.expected_trials()} trials "
            "started); relaunch it with the same name to resume"
        )
    rows = _trial_rows(grid, spec, epochs)
    _close_children(uri, base.tracking.experiment, name, rows, epochs)
    best = best_trial(rows, spec.metric, spec.mode, epochs)
    if best is None:
        parent.finish("FAILED")
        raise SweepError(f"sweep '{name}': every trial failed")
    summary = {
        "name": name,
        "parent_run_id": parent.run_id,
        "trials": rows,
        "best": best,
        "trial_epochs_run": sum(r["epochs_run"] for r in rows),
        "trial_epochs_full": len(rows) * epochs,
    }
    _log_summary(parent, spec.metric, summary)
    if register and best["checkpoint_path"]:
        summary["model_version"] = _register_best(spec, base, name, best, launch)
    parent.finish("FINISHED")
    return summary


def _open_parent_run(spec: SweepSpec, uri: str, experiment: str, name: str):
    """The sweep's parent MLflow run (resumed by sweep name), with the sweep file attached."""
    from pipeline.tracking import runs

    tags = {"shike.sweep": name, "shike.kind": "sweep"}
    parent = runs.RunLogger(uri, runs.start_or_resume_run(uri, experiment, name, tags))
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    parent.client.log_text(parent.run_id, text, "sweep.yaml")
    return parent


def _scheduler(spec: SweepSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.type != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _build_tuner(spec: SweepSpec, base: Config, name: str, parent, launch: Launch):
    """A new Tuner for the sweep, or the saved one when this sweep name ran before."""
    from ray import tune

    from pipeline.distributed import console
    from pipeline.distributed.train import storage_location

    one_device = base.cluster.num_workers == 1
    trainable = tune.with_parameters(
        trials.device_trial if one_device else trials.train_trial,
        base=base.to_dict(),
        sweep=spec.model_dump(mode="json") | {"name": name},
        context={
            "tracking_uri": launch.tracking_uri,
            "parent_run_id": parent.run_id,
            "manifest": launch.manifest,
        },
    )
    trainable = tune.with_resources(trainable, _trial_resources(base))
    storage_path, storage_fs = storage_location(base)
    experiment_path = (
        os.path.join(storage_path, name) if storage_fs is None else f"{storage_path}/{name}"
    )
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
        return tune.Tuner.restore(
            experiment_path, trainable, resume_errored=True, storage_filesystem=storage_fs
        )
    search_alg = None
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in spec.space.items()},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=max_concurrent(spec, base),
            scheduler=_scheduler(spec, base.optim.epochs),
            search_alg=search_alg,
            # A one-device trial that ASHA stops ends at its next report, freeing its actor; a
            # Ray Train trial it stops is still in trainer.fit(), which only its actor's exit ends.
            reuse_actors=spec.reuse_actors and (one_device or spec.scheduler.type == "none"),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # One-device trials' checkpoints (a Ray Train trial keeps its own, and as many)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=base.cluster.num_to_keep),
            # Tune's trial tables: only with --verbose (the trials log their epochs)
            verbose=None if console.is_verbose() else 0,
        ),
    )


def _trial_rows(grid, spec: SweepSpec, epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its parameters, how far it ran, its scores, error and checkpoint."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        iterations = int(metrics.get("training_iteration", 0))
        rows.append(
            {
                "trial_id": metrics.get("trial_id", ""),
                **{k: result.config.get(k) for k in spec.space},
                "epochs_run": iterations,
                "stopped_early": iterations < epochs and result.error is None,
                spec.metric: metrics.get(spec.metric, float("nan")),
                "val/acc": metrics.get("val/acc", float("nan")),
                "error": "" if result.error is None else type(result.error).__name__,
                # a Ray Train trial reports its run's checkpoint path; Tune keeps a one-device one's
                "checkpoint_path": metrics.get("checkpoint_path")
                or (result.checkpoint.path if result.checkpoint else ""),
            }
        )
    return rows


def best_trial(
    rows: list[dict[str, Any]], metric: str, mode: str, epochs: int
) -> dict[str, Any] | None:
    """The best trial among those that ran all `epochs` (else among those without an error) by
    `metric` in `mode` ("max" or "min"); a missing or NaN metric ranks last in both modes.
    None when every trial failed."""
    finished = [r for r in rows if r["epochs_run"] == epochs and not r["error"]]
    candidates = finished or [r for r in rows if not r["error"]]
    if not candidates:
        return None
    from pipeline.tracking.runs import finite_float

    sign = 1 if mode == "max" else -1

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        value = finite_float(row[metric])
        return (value is not None, sign * value if value is not None else 0.0)

    return max(candidates, key=rank)


def _log_summary(parent, metric: str, summary: dict[str, Any]) -> None:
    from pipeline.tracking.runs import finite_float

    best = summary["best"]
    score = finite_float(best[metric])
    parent.log_metrics(
        {
            f"best/{metric}": score if score is not None else float("nan"),
            "trial_epochs_run": summary["trial_epochs_run"],
            "trial_epochs_full": summary["trial_epochs_full"],
        }
    )
    parent.client.log_text(parent.run_id, _csv(summary["trials"]), "sweep_summary.csv")
    parent.log_tags({"shike.best_trial": best["trial_id"]})


def _register_best(spec: SweepSpec, base: Config, name: str, best: dict, launch: Launch) -> str:
    """Register the best trial's model from its own child run (what `jobs.train` registers)."""
    import ray.train

    from pipeline.distributed.train import storage_location
    from pipeline.tracking import runs
    from pipeline.tracking.registry import register_trained_model

    cfg = trials.trial_config(base.to_dict(), {k: best[k] for k in spec.space})
    run_name = f"{name}-{best['trial_id']}"
    trial_run = runs.find_runs(launch.tracking_uri, cfg.tracking.experiment, run_name)
    _, storage_fs = storage_location(base)
    checkpoint = ray.train.Checkpoint(best["checkpoint_path"], filesystem=storage_fs)
    with checkpoint.as_directory() as directory:
        return register_trained_model(
            directory,
            cfg,
            launch.manifest,
            run_id=trial_run[0].info.run_id,
            run_name=run_name,
            metrics={"val/acc": best["val/acc"]},
            tracking_uri=launch.tracking_uri,
        )


def _close_children(uri: str, experiment: str, sweep: str, rows: list[dict], epochs: int) -> None:
    """Trials stopped by ASHA never reach `finish`: mark their child runs KILLED."""
    from pipeline.tracking import runs

    for row in rows:
        for run in runs.find_runs(uri, experiment, f"{sweep}-{row['trial_id']}"):
            if run.info.status == "RUNNING":
                status = (
                    "FAILED"
                    if row["error"]
                    else ("KILLED" if row["epochs_run"] < epochs else "FINISHED")
                )
                runs.RunLogger(uri, run.info.run_id).finish(status)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
