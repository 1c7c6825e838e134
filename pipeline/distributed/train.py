"""SHIKE on Ray Train V2: the per-worker loop, the TorchTrainer, and the driver.

Each worker runs the Ray-free `TrainingSession` of pipeline.engine on its Ray Data shard, with
the model under DDP (gloo on CPU, NCCL on GPU). DDP is rebuilt at the stage switch: stage 1
trains everything but the stage-2 head bank, stage 2 only that bank, and parameters outside the
trainable set have requires_grad=False, so gradient sync neither waits for unused heads nor
spends work on frozen ones. Rank 0 evaluates, logs to MLflow and writes checkpoints; the
driver owns the MLflow run (one per run name) and registers the model when training finished.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import Tensor, nn

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.ray_reader import quiet_progress
from pipeline.data.storage import is_s3, resolve
from pipeline.engine import (
    NonFiniteLossError,
    TrainingSession,
    epoch_seed,
    format_duration,
    format_epoch_line,
    format_results,
)
from pipeline.metrics import EvalCounts

# The worker loop logs instead of printing: Ray Train V2 routes a worker's print() both to its
# logger and, because Ray wraps the worker's stdout, to that stdout too, so every line reached
# the driver twice. Its root logger (INFO, console + the run's app log file) shows each once.
log = logging.getLogger(__name__)

TRAIN_KEYS = ("loss", "loss_ce", "loss_dkt", "loss_md")
LOCAL_SHUFFLE_BUFFER = 1024


class TrainingJobError(RuntimeError):
    """The training job could not start or did not finish; the message says why."""


# ----------------------------------------------------------------------------- worker side


def _ddp_wrapper(device: torch.device):
    def wrap(model: nn.Module) -> nn.Module:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    return wrap


def _reduce_train_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sample-weighted means over all workers; images/s of the whole group; the largest input
    waits (a worker short of data holds the others up at the gradient all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    n = stats["samples"]
    sums = torch.tensor(
        [n, *(stats[k] * n for k in TRAIN_KEYS)], dtype=torch.float64, device=device
    )
    dist.all_reduce(sums)
    largest = torch.tensor(
        [stats["seconds"], stats["input_wait"], stats["input_start_s"]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    total = float(sums[0])
    out = dict(stats)
    out.update({k: float(sums[i + 1]) / max(total, 1) for i, k in enumerate(TRAIN_KEYS)})
    out.update(
        samples=total,
        seconds=float(largest[0]),
        images_per_s=total / max(float(largest[0]), 1e-9),
        input_wait=float(largest[1]),
        input_start_s=float(largest[2]),
    )
    return out


def _torch_batches(iterator, batch_size: int, **kwargs):
    for batch in iterator.iter_torch_batches(batch_size=batch_size, **kwargs):
        yield batch["image"], batch["label"]


def _announce_first(batches):
    """Log when the first batch reaches the training step (start-up latency, bench/)."""
    for i, batch in enumerate(batches):
        if i == 0:
            log.info("[shike] first training batch at unix time %.3f", time.time())
        yield batch


class EvalBatches:
    """The batches of an evaluation split, read once from `read()` (Ray Data) and then kept in
    memory when they fit in `max_bytes`.

    Evaluation splits are neither augmented nor sharded, so every epoch's pass sees the same
    batches; re-running the Ray Data pipeline for each epoch's val pass costs seconds of
    start-up (7 s an epoch on 2 cores for 36 images), far more than a CIFAR epoch on a GPU.
    """

    def __init__(
        self, read: Callable[[], Iterable[tuple[Tensor, Tensor]]], max_bytes: int = 512 * 2**20
    ) -> None:
        self.read = read
        self.max_bytes = max_bytes
        self._kept: list[tuple[Tensor, Tensor]] | None = None

    @classmethod
    def of_split(cls, name: str) -> EvalBatches:
        return cls(lambda: _torch_batches(ray.train.get_dataset_shard(name), 256))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[tuple[Tensor, Tensor]] | None = []
        size = 0
        for images, labels in self.read():
            size += images.nbytes + labels.nbytes
            if size > self.max_bytes:
                kept = None  # too big to keep: read through Ray Data every time
            elif kept is not None:
                kept.append((images, labels))
            yield images, labels
        self._kept = kept


def _evaluate_split(
    session: TrainingSession, batches: EvalBatches
) -> tuple[dict, EvalCounts, dict]:
    """Results, counts, and the results after post-hoc logit adjustment."""
    counts, adjusted = session.evaluate(batches, adjust=True)
    return (
        counts.compute(class_counts=session.class_counts),
        counts,
        adjusted.compute(class_counts=session.class_counts),
    )


def _namespaced(split: str, results: dict[str, Any]) -> dict[str, float]:
    keys = ("acc", "top5", "acc_many", "acc_medium", "acc_few", "ece")
    return {f"{split}/{k}": float(results[k]) for k in keys if results.get(k) == results.get(k)}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    class_counts: list[int] = loop_config["class_counts"]
    class_names: list[str] = loop_config["class_names"]
    eval_splits: list[str] = loop_config["eval_splits"]
    quiet_progress()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    session = TrainingSession(cfg, class_counts, device, wrap=_ddp_wrapper(device))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            session.restore(directory)
        if rank == 0:
            log.info("[shike] resumed from checkpoint at epoch %d", session.epoch)

    logger = (
        tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"])
        if rank == 0
        else None
    )
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = EvalBatches.of_split("val")
    per_worker_batch = max(1, cfg.optim.batch_size // world)  # keep the recipe's global batch
    epochs = cfg.optim.epochs
    started, first_epoch = time.perf_counter(), session.epoch

    def epoch_batches(epoch: int):
        batches = _torch_batches(
            train_shard,
            per_worker_batch,
            local_shuffle_buffer_size=LOCAL_SHUFFLE_BUFFER,
            local_shuffle_seed=epoch_seed(cfg.train.seed, epoch) + rank,
        )
        if rank == 0 and epoch == first_epoch:
            batches = _announce_first(batches)
        return batches

    while True:
        ran_epoch = not session.finished
        metrics: dict[str, Any] = {}
        if ran_epoch:
            stats = _reduce_train_stats(session.run_epoch(epoch_batches), device)
            metrics = {f"train/{k}": stats[k] for k in TRAIN_KEYS}
            metrics.update(
                {
                    "train/lr": stats["lr"],
                    "train/images_per_s": stats["images_per_s"],
                    "train/input_wait": stats["input_wait"],
                    "train/input_start_s": stats["input_start_s"],
                    "stage": stats["stage"],
                }
            )
        metrics["epoch"] = session.epoch  # epochs completed
        final = session.finished
        val = None
        if (
            rank == 0
            and "val" in eval_splits
            and (final or session.epoch % cfg.train.eval_every == 0)
        ):
            val, val_counts, val_adjusted = _evaluate_split(session, val_batches)
            metrics.update(_namespaced("val", val))
            # Sweep score: stage-2 accuracy is what counts; during stage 1 the post-hoc
            # logit-adjusted accuracy anticipates it (balanced-softmax re-training ~ tau*log prior).
            metrics["val/acc_la"] = val_adjusted["acc"]
            metrics["val/score"] = val["acc"] if session.stage == 2 else val_adjusted["acc"]
            if final:
                # per-epoch val/* scalars are logged with their step below; only the artifacts here
                logger.log_evaluation(
                    "val", val, class_counts, class_names, counts=val_counts, scalars=False
                )
        if rank == 0 and final and "test" in eval_splits:
            test, test_counts, _ = _evaluate_split(session, EvalBatches.of_split("test"))
            metrics.update(_namespaced("test", test))
            logger.log_evaluation("test", test, class_counts, class_names, counts=test_counts)
            log.info("[shike] %s", format_results("test", test))
        if rank == 0 and ran_epoch:
            done = session.epoch - first_epoch
            eta = (time.perf_counter() - started) / done * (epochs - session.epoch)
            log.info("[shike] %s", format_epoch_line(stats, epochs, val, eta))
            per_epoch = {k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))}
            logger.log_metrics(per_epoch, step=session.epoch - 1)
        if final or (ran_epoch and session.epoch % cfg.train.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    session.save(tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        if final:
            if rank == 0:
                log.info("[shike] wall time %s", format_duration(time.perf_counter() - started))
            return


# ----------------------------------------------------------------------------- driver side


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
        ),
        datasets=datasets,
        # Only the training split is sharded across workers; rank 0 evaluates val/test whole,
        # so the logged metrics are exact (an equal split would drop up to world-1 rows).
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options={"train": _ordered_ingest_options()}
        ),
    )


def _ordered_ingest_options() -> ExecutionOptions:
    """Ray Train's default ingest options with the output order pinned (`preserve_order`).

    Unpinned, Ray Data hands blocks on in the order their tasks finish, so the same seed would
    feed a worker a different sequence of rows each run; pinned, a one-worker run's batches are
    a function of its seed (with several workers, which rank gets which block still depends on
    timing: Ray's streaming split hands blocks to whichever worker asks first).
    """
    options = DataConfig.default_ingest_options()
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
    """Datasets from the manifest, the run's MLflow run (created or resumed by run name, config
    and manifest logged) and the per-worker loop config: (manifest, datasets, logger, loop_config)."""
    from pipeline.data.ray_reader import training_datasets

    manifest, datasets = training_datasets(cfg.data.uri, cfg.data.augment, cfg.train.seed)
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
    from pipeline import registry
    from pipeline.data.transforms import CIFAR_MEAN, CIFAR_STD

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
        ray.init(log_to_driver=True)
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
        model = load_trained_model(result.checkpoint, cfg, len(manifest.class_names))
        tags = {
            k.replace("/", "_"): v
            for k, v in result.metrics.items()
            if k.startswith(("val/", "test/"))
        }
        mv = registry.log_and_register(
            run_id,
            model,
            list(manifest.class_names),
            registry.model_name_for(cfg),
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            image_size=manifest.image_shape[0],
            metrics=tags,
            tracking_uri=uri,
        )
        version = str(mv.version)
    logger.finish("FINISHED")
    return TrainingOutcome(run_name, run_id, dict(result.metrics), result.checkpoint.path, version)


def load_trained_model(
    checkpoint: ray.train.Checkpoint, cfg: Config, num_classes: int
) -> nn.Module:
    """The trained model of a Ray checkpoint, in its final stage, on CPU."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.models import build_model

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
