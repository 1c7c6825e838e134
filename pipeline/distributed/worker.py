"""The Ray Train worker: a thin driver of `pipeline.training.fit` (DESIGN.md, "One loop, two drivers").

Each worker runs the Ray-free `TrainingSession` on its Ray Data shard with the model under DDP
(gloo on CPU, NCCL on GPU); with `data.augment_on` on the device, the shard's batches arrive
as uint8 images and the worker augments them on its own device. DDP is rebuilt at the stage switch: stage 1 trains everything but
the stage-2 head bank, stage 2 only that bank, and parameters outside the trainable set have
requires_grad=False, so gradient sync neither waits for unused heads nor spends work on frozen
ones. Every worker reports each epoch to Ray Train; rank 0 evaluates, logs to MLflow and
writes the checkpoints.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data.readers.batch_augment import BatchAugment, FinishedBatches, augmented_batches
from pipeline.data.readers.device_decode import decoded_batches
from pipeline.data.readers.ray_reader import as_nchw, quiet_progress
from pipeline.distributed.capacity import cluster_summary, guard_stalls, wait_for_capacity
from pipeline.evaluation.metrics import SCALAR_RESULTS
from pipeline.seeding import epoch_seed
from pipeline.tracking import lineage, runs
from pipeline.training.fit import EpochEnd, fit
from pipeline.training.session import TrainingSession

# The worker loop logs instead of printing: Ray Train V2 routes a worker's print() both to its
# logger and, because Ray wraps the worker's stdout, to that stdout too, so every line reached
# the driver twice. Its root logger (INFO, console + the run's app log file) shows each once.
log = logging.getLogger(__name__)

# Ray Data shuffles a worker's rows within a local buffer of decoded images (the shards'
# training rows are stored shuffled already, and their order is reshuffled per epoch): 1,024
# CIFAR images are small, but at 224 px each is 0.6 MB as float32, so the buffer is also
# capped by bytes.
LOCAL_SHUFFLE_ROWS = 1024
LOCAL_SHUFFLE_BYTES = 256 * 2**20


def local_shuffle_rows(image_size: int, batch_size: int, bytes_per_value: int = 4) -> int:
    """Rows of the local shuffle buffer for RGB images of `image_size` (float32: 4 bytes a
    value, uint8: 1): at most LOCAL_SHUFFLE_ROWS and LOCAL_SHUFFLE_BYTES, at least one batch."""
    image_bytes = 3 * bytes_per_value * image_size * image_size
    return max(batch_size, min(LOCAL_SHUFFLE_ROWS, LOCAL_SHUFFLE_BYTES // image_bytes))


def _ddp_wrapper(device: torch.device):
    def wrap(model: nn.Module) -> nn.Module:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    return wrap


def _reduce_train_stats(
    stats: dict[str, float], device: torch.device, loss_parts: tuple[str, ...]
) -> dict[str, float]:
    """Sample-weighted means of the loss parts over all workers; images/s of the whole group;
    the largest input waits (a worker short of data holds the others up at the all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    n = stats["samples"]
    sums = torch.tensor(
        [n, *(stats[k] * n for k in loss_parts)], dtype=torch.float64, device=device
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
    out.update({k: float(sums[i + 1]) / max(total, 1) for i, k in enumerate(loss_parts)})
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
        yield as_nchw(batch["image"]), batch["label"]


def encoded_batches(iterator, batch_size: int, **kwargs):
    """(encoded images, labels, sample ids) batches: what `device_decode` decodes."""
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy", **kwargs):
        yield list(batch["image"]), torch.from_numpy(batch["label"]), list(batch["sample_id"])


def announce_first_batch(batches, say: Callable[[str], None] = log.info):
    """Say when the first batch reaches the training step (start-up latency: bench.sweep_startup
    reads the line)."""
    for i, batch in enumerate(batches):
        if i == 0:
            say(f"[shike] first training batch at unix time {time.time():.3f}")
        yield batch


class EvalBatches:
    """The batches of an evaluation split, read once from `read()` (Ray Data) and then kept in
    memory when they fit in `max_bytes`.

    Evaluation splits are neither augmented nor sharded, so every epoch's pass sees the same
    batches; re-running the Ray Data pipeline for each epoch's val pass costs seconds of
    start-up, more than a CIFAR epoch takes on a GPU.
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    quiet_progress()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    lead = rank == 0  # evaluates, logs to MLflow, writes the checkpoints
    if lead:  # at every (re)start: a group restarted after a node loss must not starve its input
        wait_for_capacity(
            cfg.cluster, bool(ray.get_gpu_ids()), "at worker-group start", log.warning
        )
    device = ray.train.torch.get_device()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    session = _start_session(
        cfg, loop_config["class_counts"], device, lead, loop_config["data_identity"]
    )
    recorder = None
    if lead:
        logger = runs.RunLogger(uri, run_id)
        recorder = runs.EpochRecorder(
            logger, loop_config["class_counts"], loop_config["class_names"]
        )
    train_batches = TrainBatches(
        cfg, rank, world, device, session.epoch, loop_config["decode_on_device"]
    )

    def split_batches(name: str) -> Iterable[tuple[Tensor, Tensor]] | None:
        if not lead or name not in loop_config["eval_splits"]:
            return None
        batches = EvalBatches.of_split(name)
        augment = train_batches.augment  # uint8 evaluation crops: normalised on the device
        return batches if augment is None else FinishedBatches(batches, augment, device)

    # The lead worker's machine: CPU, memory, disk, network (and GPUs) as `system/...` metrics.
    with lineage.system_metrics(uri, run_id, enabled=lead):
        fit(
            session,
            train_batches,
            val_batches=split_batches("val"),
            test_batches=split_batches("test"),
            reduce=lambda stats: _reduce_train_stats(stats, device, session.objective.part_names),
            on_epoch_end=lambda end: report_epoch(
                end, session, recorder, ray.train.report, ray.train.Checkpoint, lead
            ),
            log=(lambda line: log.info("[shike] %s", line)) if lead else (lambda line: None),
        )


def _start_session(
    cfg: Config, class_counts: list[int], device: torch.device, lead: bool, data: dict
) -> TrainingSession:
    """The worker's `TrainingSession` under DDP, fresh or from Ray Train's latest checkpoint
    (which must have been trained on the same `data`)."""
    session = TrainingSession(
        cfg, class_counts, device, wrap=_ddp_wrapper(device), data_identity=data
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        session.start(None)
        return session
    with checkpoint.as_directory() as directory:
        session.start(directory)
    if lead:
        log.info("[shike] resumed from checkpoint at epoch %d", session.epoch)
    return session


class TrainBatches:
    """An epoch's training batches of this worker's Ray Data shard: the recipe's global batch
    split over the workers, shuffled in a local buffer seeded per (seed, epoch, rank), guarded
    against stalls, and augmented on the device when `data.augment_on` says so."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world: int,
        device: torch.device,
        first_epoch: int,
        encoded: bool = False,
    ) -> None:
        self.cfg, self.rank, self.device, self.first_epoch = cfg, rank, device, first_epoch
        self.encoded = encoded  # data.decode_on: Ray Data delivers the images encoded
        self.shard = ray.train.get_dataset_shard("train")
        self.batch_size = max(1, cfg.optim.batch_size // world)
        on_device = cfg.data.augments_on_device  # Ray Data delivers uint8 images, augmented here
        self.augment = BatchAugment(cfg.data.augment) if on_device else None
        self.shuffle_rows = local_shuffle_rows(
            cfg.data.image_size, self.batch_size, bytes_per_value=1 if on_device else 4
        )

    def __call__(self, epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        seed = epoch_seed(self.cfg.train.seed, epoch) + self.rank
        read = encoded_batches if self.encoded else _torch_batches
        batches = read(
            self.shard,
            self.batch_size,
            local_shuffle_buffer_size=self.shuffle_rows,
            local_shuffle_seed=seed,
        )
        # Ray Data left without CPUs (a lost node) would keep this worker waiting for its own
        # no-progress limit: the stall guard fails it after cluster.stall_timeout_s instead.
        batches = guard_stalls(
            batches,
            self.cfg.cluster.stall_timeout_s,
            f"epoch {epoch + 1} on rank {self.rank}",
            cluster_summary,
        )
        if self.encoded:  # each image's crop: a function of (run seed, epoch, sample id)
            image_seed = epoch_seed(self.cfg.train.seed, epoch)
            batches = decoded_batches(batches, image_seed, self.cfg.data.image_size, self.device)
        if self.augment is not None:
            batches = augmented_batches(batches, self.augment, seed, self.device)
        if self.rank == 0 and epoch == self.first_epoch:
            batches = announce_first_batch(batches)
        return batches


def report_epoch(
    end: EpochEnd,
    session: TrainingSession,
    recorder: runs.EpochRecorder | None,
    report: Callable[..., None],
    checkpoint_type: type,
    lead: bool = True,
) -> None:
    """Log the turn to MLflow (`recorder`: the lead worker's) and `report` it (Ray Train's or
    Tune's), with a `checkpoint_type` checkpoint when one is due, written by the lead worker
    (the others report none)."""
    if recorder is not None:
        recorder.record(end)
    metrics = end.metrics()
    if end.val is not None:
        # A result the split leaves undefined (a diverged model's ECE, a group without images)
        # is not logged, but reported as NaN: Tune refuses a result without the sweep's metric,
        # and the sweep ranks a NaN last.
        metrics = {f"val/{k}": math.nan for k in SCALAR_RESULTS} | metrics
    if not end.checkpoint_due:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if lead:
            session.save(tmp)
        report(metrics, checkpoint=checkpoint_type.from_directory(tmp) if lead else None)
