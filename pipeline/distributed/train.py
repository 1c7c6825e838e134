"""SHIKE on Ray Train V2, the driver side: the TorchTrainer, the tracked run, registration.

The driver owns the MLflow run (one per run name: relaunching with the same name resumes from
the latest checkpoint and continues the same MLflow run) and registers the model when training
finished; the per-worker loop is pipeline.distributed.worker.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.data import DataContext, ExecutionOptions
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from pipeline.config import Config, ConfigError
from pipeline.data.manifest import Manifest, data_identity
from pipeline.data.readers.device_decode import decodes_on_device
from pipeline.data.readers.ray_reader import training_datasets
from pipeline.distributed import console, run_lease, run_storage
from pipeline.distributed.capacity import CapacityError, wait_for_capacity
from pipeline.distributed.preflight import preflight
from pipeline.distributed.worker import train_loop_per_worker
from pipeline.storage import is_s3, resolve
from pipeline.tracking import runs
from pipeline.tracking.driver_guard import DriverGuard
from pipeline.tracking.registry import model_name_for, register_trained_model
from pipeline.training.session import NonFiniteLossError


class TrainingJobError(RuntimeError):
    """The training job could not start or did not finish; the message says why."""


class TrainingInterrupted(TrainingJobError):
    """Ctrl-C stopped the training job; the message says what was kept and how to resume."""


@dataclass
class TrainingOutcome:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str
    model_version: str | None
    model_name: str  # the registry name: from the dataset's manifest, as the launch set it


def _use_gpu(cfg: Config) -> bool:
    if cfg.cluster.use_gpu == "auto":
        return bool(ray.cluster_resources().get("GPU", 0))
    return cfg.cluster.use_gpu == "true"


def storage_location(cfg: Config, subdir: str | None = None):
    """(storage_path, storage_filesystem) for RunConfig; s3:// goes through our S3 settings."""
    if is_s3(cfg.cluster.storage_path):
        fs, path = resolve(cfg.cluster.storage_path)
        return (f"{path}/{subdir}" if subdir else path), fs
    path = os.path.abspath(cfg.cluster.storage_path)
    return (os.path.join(path, subdir) if subdir else path), None


def build_trainer(
    cfg: Config,
    run_name: str,
    datasets: dict,
    loop_config: dict[str, Any],
    callbacks: list | None = None,
    storage_subdir: str | None = None,
) -> TorchTrainer:
    storage_path, storage_fs = storage_location(cfg, storage_subdir)
    use_gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    for dataset in datasets.values():
        # Ray Data's own no-progress limit (default 1,800 s), bounded like the workers' stall
        # guard: it also covers rank 0's evaluation reads (pipeline.distributed.capacity).
        dataset.context.execution_no_progress_timeout_s = cfg.cluster.stall_timeout_s
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.cluster.num_to_keep),
            callbacks=callbacks,
            # `ray.train` logs each report (TrainingReport(...) with every metric) at INFO
            logging_config=LoggingConfig(log_level=console.train_log_level()),
        ),
        datasets=datasets,
        # Only the training split is sharded across workers; rank 0 evaluates val/test whole,
        # so the logged metrics are exact (an equal split would drop up to world-1 rows). One
        # worker reads the whole split: no streaming split, so no SplitCoordinator actor to
        # start (a Ray worker process at every launch) nor its hop for each block.
        dataset_config=DataConfig(
            datasets_to_split=["train"] if cfg.cluster.num_workers > 1 else [],
            execution_options={
                name: _ordered_ingest_options() if name == "train" else _ingest_options()
                for name in datasets
            },
        ),
    )


def _ingest_options() -> ExecutionOptions:
    """Ray Train's default ingest options: a copy of the DataContext's execution options.

    Ray Train's own `DataConfig.default_ingest_options()` (used for every dataset without
    options of its own) rebuilds them through the deprecated `exclude_resources` argument and
    warns in the driver and in the DatasetManager actor on each run; a copy never calls it.
    """
    return copy.deepcopy(DataContext.get_current().execution_options)


def _ordered_ingest_options() -> ExecutionOptions:
    """Ray Train's default ingest options with the output order pinned (`preserve_order`).

    Unpinned, Ray Data hands blocks on in the order their tasks finish, so the same seed would
    feed a worker a different sequence of rows each run; pinned, a one-worker run's batches are
    a function of its seed (with several workers, which rank gets which block still depends on
    timing: Ray's streaming split hands blocks to whichever worker asks first).
    """
    options = _ingest_options()
    options.preserve_order = True
    return options


def open_tracked_run(
    cfg: Config,
    run_name: str,
    uri: str,
    manifest: Manifest,
    *,
    extra_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    eval_splits: tuple[str, ...] = ("val", "test"),
    decode_on_device: bool = False,
):
    """Datasets from the manifest (cfg.data.uri's, already read), the run's MLflow run (created
    or resumed by run name; config, manifest and the splits read as dataset inputs logged) and
    the per-worker loop config: (datasets, logger, loop_config). `decode_on_device`: the
    training split travels encoded (`decodes_on_the_workers`)."""
    datasets = training_datasets(
        manifest,
        cfg.data.augment,
        cfg.train.seed,
        image_size=cfg.data.image_size,
        uint8=cfg.data.augments_on_device,
        encoded_train=decode_on_device,
    )
    for split in set(datasets) - {"train", *eval_splits}:
        del datasets[split]
    read = [split for split in ("train", *eval_splits) if split in datasets]
    logger = runs.open_run(
        cfg, run_name, uri, manifest, read, extra_tags=extra_tags, parent_run_id=parent_run_id
    )
    loop_config = {
        "config": cfg.to_dict(),
        "class_counts": list(manifest.class_counts),
        "class_names": list(manifest.class_names),
        "tracking_uri": uri,
        "run_id": logger.run_id,
        "eval_splits": read[1:],
        "data_identity": data_identity(manifest),  # what the checkpoints record
        "decode_on_device": decode_on_device,
    }
    return datasets, logger, loop_config


def decodes_on_the_workers(cfg: Config, manifest: Manifest) -> bool:
    """`data.decode_on` for this cluster: whether the workers decode the training split
    (`device_decode`); a TrainingJobError where "device" cannot be honoured."""
    try:
        return decodes_on_device(cfg.data, manifest.image.encoding, _use_gpu(cfg), manifest.uri)
    except ConfigError as exc:
        raise TrainingJobError(str(exc)) from None


def run_training_job(
    cfg: Config,
    run_name: str | None = None,
    register: bool | None = None,
    *,
    resume_command: str | None = None,
) -> TrainingOutcome:
    """Validate, take the run's lease, connect, train on Ray, record in MLflow and register
    the model.

    Relaunching with the same run name resumes from the latest checkpoint in
    cluster.storage_path (Ray Train V2) and continues the same MLflow run; a second launch
    while one runs is refused (`pipeline.distributed.run_lease`). `resume_command` is what error
    messages tell the operator to run to resume (default: a `python -m jobs.train` line).
    """
    run_name = run_name or cfg.name
    resume_command = (
        resume_command or f"python -m jobs.train --config <config> --run-name {run_name}"
    )
    try:
        return _run_training_job(cfg, run_name, register, resume_command)
    except KeyboardInterrupt:
        # Reached once the run is over: Ray Train stopped, the MLflow run ended KILLED, the
        # lease released. A stop the operator asked for, not a failure: one line, no traceback.
        raise TrainingInterrupted(interrupt_message(cfg, run_name, resume_command)) from None


def _run_training_job(
    cfg: Config, run_name: str, register: bool | None, resume_command: str
) -> TrainingOutcome:
    with preflight(cfg, run_name, TrainingJobError, command=resume_command) as launch:
        cfg = launch.config  # with the data settings of the manifest
        took_over = launch.lease.took_over
        if took_over:
            console.say(
                f"run '{run_name}': the launch before, {run_lease.describe(took_over)}, "
                "died without ending it; this launch takes it over and resumes"
            )
        if not ray.is_initialized():
            ray.init(log_to_driver=True, **console.ray_init_kwargs())
        on_device = decodes_on_the_workers(cfg, launch.manifest)
        launch.record_data()
        datasets, logger, loop_config = open_tracked_run(
            cfg, run_name, launch.tracking_uri, launch.manifest, decode_on_device=on_device
        )
        if took_over:
            logger.log_tags({TAG_TOOK_OVER: run_lease.describe(took_over)})
        guard = DriverGuard.start(logger.uri, logger.run_id, run_name, resume_command)
        try:
            return _train_and_register(
                cfg,
                run_name,
                launch.manifest,
                datasets,
                logger,
                loop_config,
                register,
                resume_command,
            )
        finally:
            guard.stop()


# The MLflow run was resumed by a launch that took the run over from one that had died.
TAG_TOOK_OVER = "shike.took_over_from"


def _train_and_register(
    cfg: Config,
    run_name: str,
    manifest: Manifest,
    datasets: dict,
    logger: runs.RunLogger,
    loop_config: dict[str, Any],
    register: bool | None,
    resume_command: str,
) -> TrainingOutcome:
    """Train, register and end the MLflow run: FINISHED, FAILED, or KILLED on Ctrl-C."""
    uri, run_id = logger.uri, logger.run_id
    status = "FAILED"
    removed = run_storage.remove_unregistered_checkpoints(cfg, run_name)
    if removed:
        console.say(
            f"removed {len(removed)} unregistered checkpoint folder(s): {', '.join(removed)}"
        )
    trainer = build_trainer(cfg, run_name, datasets, loop_config)
    try:
        try:  # workers + Ray Data's input must fit, or the run would wait for CPUs forever
            wait_for_capacity(cfg.cluster, _use_gpu(cfg), "before training", console.say)
        except CapacityError as exc:
            raise TrainingJobError(f"training run '{run_name}' cannot start: {exc}") from None
        try:
            result = _fit(trainer)
        except Exception as exc:  # TrainingFailedError and friends: report, keep the checkpoints
            raise TrainingJobError(
                failure_message(cfg, run_name, _root_cause(exc), resume_command)
            ) from None
        finally:
            run_storage.remove_unregistered_checkpoints(cfg, run_name)
        if result.checkpoint is None:
            raise TrainingJobError(f"training run '{run_name}' ended without a checkpoint")
        version = None
        if register if register is not None else cfg.tracking.register_model:
            scores = {k: v for k, v in result.metrics.items() if k.startswith(("val/", "test/"))}
            with result.checkpoint.as_directory() as directory:
                version = register_trained_model(
                    directory,
                    cfg,
                    manifest,
                    run_id=run_id,
                    run_name=run_name,
                    metrics=scores,
                    tracking_uri=uri,
                )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.finish(status)
    return TrainingOutcome(
        run_name, run_id, dict(result.metrics), result.checkpoint.path, version, model_name_for(cfg)
    )


def _fit(trainer: TorchTrainer):
    """`trainer.fit()`; a Ctrl-C during it raises KeyboardInterrupt, once Ray Train has stopped.

    In the main thread, Ray Train 2.60 installs its own SIGINT handler for the run: the first
    Ctrl-C aborts it (the controller shuts the worker group down, then exits) and then calls
    `sys.exit(0)`; as the handler runs inside the driver's `ray.get`, Ray turns that into
    SystemExit(1), which would end the driver with status 1, a FAILED run and no word. A third
    Ctrl-C calls `sys.exit(0)` at once. So a SystemExit out of fit() is a Ctrl-C. Ray leaves its
    handler installed, aiming at a controller that is gone (a Ctrl-C while the model is
    registered would then be swallowed or exit 0): the previous handler is put back.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _kept_checkpoint(cfg: Config, run_name: str) -> tuple[int, str]:
    """(epochs completed, what was kept) by the run's latest registered checkpoint."""
    kept = run_storage.latest_checkpoint(cfg, run_name)
    if kept is None:
        return 0, "no checkpoint was registered, so a relaunch starts over"
    return kept.epoch, f"the checkpoint of epoch {kept.epoch} is kept ({kept.path})"


def failure_message(cfg: Config, run_name: str, cause: str, resume_command: str) -> str:
    """`training run 'x' failed: <cause>` + what was kept + the command that resumes."""
    saved = _kept_checkpoint(cfg, run_name)[1]
    return f"training run '{run_name}' failed: {cause}; {saved}; resume with: {resume_command}"


def interrupt_message(cfg: Config, run_name: str, resume_command: str) -> str:
    """`training run 'x' interrupted at epoch N of M` + what was kept + the command that
    resumes (N: the epochs of the kept checkpoint, where a relaunch goes on from)."""
    epoch, saved = _kept_checkpoint(cfg, run_name)
    return (
        f"training run '{run_name}' interrupted at epoch {epoch} of {cfg.optim.epochs}; "
        f"{saved}; resume with: {resume_command}"
    )


def _root_cause(exc: BaseException) -> str:
    """One short line for why training failed. Ray wraps a worker's error several times and
    leads a dead worker's with its guesses (OOM, SIGSEGV, ...); a worker whose peer died fails
    too, in a collective (gloo: "Connection reset by peer"), which is not the cause."""
    text = str(exc)
    if NonFiniteLossError.__name__ in text:
        return next(ln.strip() for ln in text.splitlines() if NonFiniteLossError.__name__ in ln)
    failures: dict = getattr(exc, "worker_failures", None) or {}
    dead = sorted(rank for rank, err in failures.items() if _process_died(err))
    if dead or (not failures and _process_died(exc)):
        ranks = ", ".join(str(r) for r in dead) or "?"
        return (
            f"Train worker rank {ranks} died: its process ended (killed, out of memory or "
            "crashed; its node's raylet log says which)"
        )
    if failures:
        rank, err = min(failures.items())
        return f"Train worker rank {rank}: {_one_line(err)}"
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return _one_line(seen)


def _process_died(err: BaseException) -> bool:
    return isinstance(err, ray.exceptions.ActorDiedError) or "worker process has died" in str(err)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` of the user's exception inside Ray's wrappers."""
    err = getattr(err, "cause", None) or err  # RayTaskError keeps the user's exception
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = next((ln for ln in lines if not ln.startswith(("Traceback", "File "))), "")
    text = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
