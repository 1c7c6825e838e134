"""SHIKE on Ray Train V2, the driver side: the TorchTrainer, the tracked run, registration.

The driver owns the MLflow run (one per run name: relaunching with the same name resumes from
the latest checkpoint and continues the same MLflow run) and registers the model when training
finished; the per-worker loop is pipeline.distributed.worker.
"""

from __future__ import annotations

import copy
import os
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
from torch import nn

from pipeline import registry, tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config
from pipeline.data.ray_reader import training_datasets
from pipeline.data.shards import Manifest
from pipeline.data.storage import is_s3, resolve
from pipeline.data.transforms import normalization
from pipeline.distributed import console
from pipeline.distributed.worker import train_loop_per_worker
from pipeline.models import build_model
from pipeline.session import NonFiniteLossError


class TrainingJobError(RuntimeError):
    """The training job could not start or did not finish; the message says why."""


@dataclass
class TrainingOutcome:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str
    model_version: str | None


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
        # so the logged metrics are exact (an equal split would drop up to world-1 rows).
        dataset_config=DataConfig(
            datasets_to_split=["train"],
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
    *,
    extra_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    eval_splits: tuple[str, ...] = ("val", "test"),
):
    """Datasets from the manifest, the run's MLflow run (created or resumed by run name; config,
    manifest and the splits read as dataset inputs logged) and the per-worker loop config:
    (manifest, datasets, logger, loop_config)."""
    manifest, datasets = training_datasets(
        cfg.data.uri,
        cfg.data.augment,
        cfg.train.seed,
        image_size=cfg.data.image_size,
        train_uint8=cfg.data.augments_on_device,
    )
    for split in set(datasets) - {"train", *eval_splits}:
        del datasets[split]
    tags = {
        **tracking.standard_tags(cfg, manifest_hash=tracking.manifest_hash(manifest)),
        **(extra_tags or {}),
    }
    run_id = tracking.start_or_resume_run(
        uri, cfg.tracking.experiment, run_name, tags, parent_run_id=parent_run_id
    )
    logger = tracking.RunLogger(uri, run_id)
    logger.log_config(cfg)
    logger.log_manifest(manifest.to_dict())
    # The splits this run reads, as MLflow dataset inputs (a resumed run logs none twice).
    logger.log_datasets(manifest, [split for split in ("train", *eval_splits) if split in datasets])
    loop_config = {
        "config": cfg.to_dict(),
        "class_counts": list(manifest.class_counts),
        "class_names": list(manifest.class_names),
        "tracking_uri": uri,
        "run_id": run_id,
        "eval_splits": [name for name in eval_splits if name in datasets],
    }
    return manifest, datasets, logger, loop_config


ENGINE_ONLY_GRAPHS = (
    "train.cuda_graphs is supported by the Ray-free engine only (python -m pipeline.engine)"
)


def run_training_job(
    cfg: Config, run_name: str | None = None, register: bool | None = None
) -> TrainingOutcome:
    """Validate, connect, train on Ray, record in MLflow and register the model.

    Relaunching with the same run name resumes from the latest checkpoint in
    cluster.storage_path (Ray Train V2) and continues the same MLflow run.
    """
    run_name = run_name or cfg.name
    if not cfg.data.uri:
        raise TrainingJobError(
            "data.uri is not set: prepare the dataset with jobs/prepare_data.py and pass "
            "--set data.uri=<its output URI>"
        )
    if cfg.train.cuda_graphs:
        raise TrainingJobError(ENGINE_ONLY_GRAPHS)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_server(uri)  # before any worker starts

    if not ray.is_initialized():
        ray.init(log_to_driver=True, **console.ray_init_kwargs())
    manifest, datasets, logger, loop_config = open_tracked_run(cfg, run_name, uri)
    run_id = logger.run_id
    trainer = build_trainer(cfg, run_name, datasets, loop_config)
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: report, keep the checkpoints
        logger.finish("FAILED")
        cause = _root_cause(exc)
        raise TrainingJobError(f"training run '{run_name}' failed: {cause}") from None
    if result.checkpoint is None:
        logger.finish("FAILED")
        raise TrainingJobError(f"training run '{run_name}' ended without a checkpoint")

    version = None
    if register if register is not None else cfg.tracking.register_model:
        scores = {k: v for k, v in result.metrics.items() if k.startswith(("val/", "test/"))}
        version = register_trained_model(
            result.checkpoint, cfg, manifest, run_id=run_id, metrics=scores, tracking_uri=uri
        )
    logger.finish("FINISHED")
    return TrainingOutcome(run_name, run_id, dict(result.metrics), result.checkpoint.path, version)


def register_trained_model(
    checkpoint: ray.train.Checkpoint,
    cfg: Config,
    manifest: Manifest,
    *,
    run_id: str,
    metrics: dict[str, Any],
    tracking_uri: str,
) -> str:
    """Log the checkpoint's model in its MLflow run and register it (alias `candidate`); the
    version. Its signature takes the images the model was trained on: the dataset's own size
    (CIFAR-style), else data.image_size (ImageNet-style datasets, whose sizes vary: callers
    resize and centre-crop first, `transforms.evaluation_crop`). The version's description
    states the recipe, the data and the test scores in `metrics` (`registry.version_description`).
    Used by jobs.train and jobs.tune."""
    model = load_trained_model(checkpoint, cfg, manifest.num_classes)
    mean, std = normalization(cfg.data.augment)
    image_size = manifest.image_shape[0] if manifest.image.fixed_size else cfg.data.image_size
    version = registry.log_and_register(
        run_id,
        model,
        list(manifest.class_names),
        registry.model_name_for(cfg),
        mean=mean,
        std=std,
        image_size=image_size,
        metrics={k.replace("/", "_"): v for k, v in metrics.items()},
        tracking_uri=tracking_uri,
        description=registry.version_description(
            cfg, manifest, metrics, run_name=tracking.run_name_of(tracking_uri, run_id)
        ),
    )
    return str(version.version)


def load_trained_model(
    checkpoint: ray.train.Checkpoint, cfg: Config, num_classes: int
) -> nn.Module:
    """The trained model of a Ray checkpoint, in its final stage, on CPU."""
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, expected_recipe=cfg.recipe())
    model = build_model(cfg.model, num_classes)
    model.load_state_dict(state["model"])
    model.set_stage(int(state["stage"]))
    return model.eval()


def _root_cause(exc: BaseException) -> str:
    """The innermost error message (Ray wraps worker errors several times)."""
    text = str(exc)
    for marker in (NonFiniteLossError.__name__,):
        if marker in text:
            line = next((ln for ln in text.splitlines() if marker in ln), text)
            return line.strip() + " (the last good checkpoint is kept)"
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return (
        f"{type(seen).__name__}: {str(seen).strip().splitlines()[-1] if str(seen).strip() else ''}"
    )
