"""Ray Data datasets over prepared shards (the per-worker input of Ray Train).

Reads the shards a manifest vouches for (verified first: sha256, rows, schema) with an explicit
pyarrow filesystem and column projection, decodes the images and applies the transforms (the
same `build_transform` the Ray-free readers use; each image's random transform seeded from the
run's seed, the epoch and its sample id), and shuffles files per epoch plus a seeded local
buffer in the consumer. Two kinds of dataset:
- fixed-size PNG shards (CIFAR): `read_parquet`, then decoded as one array in `map_batches`,
  the CIFAR presets at the stored size;
- "source" shards (the large benchmarks' original JPEGs, sizes varying): read and decoded in
  one task per shard (`SourceShardsDatasource`), each image on its own (pipeline.data.codec),
  brought to `image_size` by an ImageNet-style preset, so Ray Train workers get fixed-size
  batches either way.
For a training step that finishes the augmentation on its own device (`data.augment_on`), the
batches are uint8, (H, W, 3) as decoded (`as_nchw` gives the NCHW view): PNG images as stored,
source images cropped and flipped (evaluation splits: the evaluation crop); otherwise
normalised float (3, H, W).
Ray is imported here and in distributed/ only.

Torch, torchvision and the transforms are imported inside the functions that decode (they run
in Ray Data's tasks), not with this module: Ray Train's controller, its DatasetManager and Ray
Data's SplitCoordinator unpickle these datasets, so import this module, at every launch, and
never decode; torch and torchvision would add seconds of CPU to each of those processes' start
(bench/HISTORY.md).

Importing this module also paces Ray Data's executor loop, which otherwise spins while
backpressure holds its tasks (`_pace_the_scheduling_loop`); every process that runs an
executor over these datasets imports it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.data import DataError
from pipeline.data.manifest import TRAIN_ROW_ORDER, Manifest
from pipeline.data.readers.ray_progress import RAY_DATA_BARS_OFF_NOTICE
from pipeline.data.shards import shard_files, verify_split
from pipeline.seeding import augmentation_seed, epoch_seed

if TYPE_CHECKING:
    import torch

    from pipeline.data.readers.transforms import Decode

COLUMNS = ["image", "label", "sample_id"]  # the id keys each image's augmentation seed
# Rows per `map_batches` call of PNG (CIFAR) shards, decoded as one array.
PNG_TASK_ROWS = 256
# Rows per output block of a source read task. Each block leaves the task as soon as it is
# made, so the first batch waits for 64 decodes, not a shard's; 64 crops at 224 px are 9.6 MB
# (uint8) or 38 MB (float32), well under Ray Data's 128 MiB target block size.
SOURCE_TASK_ROWS = 64
# Blocks a source read task may yield before the executor takes them: at Ray Data's default
# of 2 a task waited for the executor a fifth of the time; 8 blocks of 64 crops are 77 MB of
# uint8 (300 MB as float32) in the object store per task.
SOURCE_GENERATOR_BUFFER = 8
# The shortest round of Ray Data's executor loop (`_pace_the_scheduling_loop`): a read task
# yields a block every tenth of a second or more, so the loop still takes each as it comes.
EXECUTOR_STEP_S = 0.02


def _pace_the_scheduling_loop() -> None:
    """Give Ray Data's executor loop a floor of EXECUTOR_STEP_S per round.

    Ray Data 2.60's scheduling loop waits in `ray.wait` (timeout 0.1 s) for its running tasks,
    but a read task held back by backpressure (the split read ahead, the trainers busy with
    their steps) has outputs ready that the executor may not take yet, so `ray.wait` returns at
    once and the loop goes round again: the SplitCoordinator of a 2-worker job spun at half a
    core for most of an epoch, taken from training (bench/HISTORY.md). A round that took less
    than the floor sleeps the rest of it.
    """
    from ray.data._internal.execution import streaming_executor

    executor = streaming_executor.StreamingExecutor
    step = executor._scheduling_loop_step
    if getattr(step, "paced", False):
        return

    @functools.wraps(step)
    def paced_step(self, topology) -> bool:
        start = time.perf_counter()
        go_on = step(self, topology)
        rest = EXECUTOR_STEP_S - (time.perf_counter() - start)
        if go_on and rest > 0:
            time.sleep(rest)
        return go_on

    paced_step.paced = True
    executor._scheduling_loop_step = paced_step


_pace_the_scheduling_loop()


def _execution_index() -> int:
    """How many executions (epochs) of this dataset finished before the running one.

    Read inside a Ray Data task from the DataContext that Ray hands to every task; Ray's own
    seeded `random()` expression and `FileShuffleConfig(reseed_after_execution=True)` key on
    the same counter. It counts from the dataset's creation (Ray Train works on a copy made at
    each start of its worker group), so a run resumed or restarted from a checkpoint draws its
    epochs' seeds afresh from 0: still a function of (seed, restart epoch).
    """
    return ray.data.DataContext.get_current()._execution_idx


def _decode_sources(
    blobs: np.ndarray,
    sample_ids: np.ndarray,
    decode: Decode,
    seeds: list[int] | None,
    channels_last: bool,
) -> torch.Tensor:
    """Source images of any size, one by one, through `decode` (seeded per image when `seeds`
    are given), stacked (N, 3, H, W), or (N, H, W, 3) with `channels_last`: uint8 crops are
    decoded with their pixels interleaved, and stacking them so is a copy where planar NCHW
    would transpose each image."""
    import torch

    out = [
        decode(blob, f"sample {sample_id}", None if seeds is None else seeds[i])
        for i, (blob, sample_id) in enumerate(zip(blobs, sample_ids, strict=True))
    ]
    return torch.stack([image.permute(1, 2, 0) for image in out] if channels_last else out)


def as_nchw(images: torch.Tensor) -> torch.Tensor:
    """A torch batch's "image" column as (N, 3, H, W). uint8 images travel as decoded,
    (N, H, W, 3), and become an NCHW view in channels-last memory, as the streaming loader's
    (`stream_reader.collate_crops`); float images are NCHW already."""
    import torch

    return images.permute(0, 3, 1, 2) if images.dtype == torch.uint8 else images


def decode_and_transform(
    batch: dict[str, np.ndarray],
    augment: str,
    train: bool,
    seed: int | None = None,
    with_ids: bool = False,
    image_size: int | None = None,
    uint8: bool = False,
) -> dict[str, np.ndarray]:
    """Encoded images -> a NCHW batch: PNGs of one size as stored (image_size None), source
    images of any size at `image_size`. Normalised float, or with `uint8` (source images) the
    preset's geometry alone, as uint8 (N, H, W, 3), for a training device that does the rest.
    The train transform is random per image: seeded per image and epoch from `seed`
    (pipeline.seeding), unseeded without."""
    from pipeline.data.codec import decode_images
    from pipeline.data.readers.transforms import (
        Decode,
        DecodeGeometry,
        apply_to_batch,
        build_transform,
    )

    seeds = None
    if train and seed is not None:
        epoch = epoch_seed(seed, _execution_index())
        seeds = [augmentation_seed(epoch, sample_id) for sample_id in batch["sample_id"]]
    if image_size is None:
        images = decode_images(list(batch["image"]), "shard rows")
        pixels = apply_to_batch(build_transform(augment, train=train), images, seeds)
    else:
        decode = (
            DecodeGeometry(train, image_size)
            if uint8
            else Decode(build_transform(augment, train=train, image_size=image_size))
        )
        pixels = _decode_sources(batch["image"], batch["sample_id"], decode, seeds, uint8)
    out = {"image": pixels.numpy(), "label": batch["label"].astype(np.int64)}
    if with_ids:
        out["sample_id"] = batch["sample_id"]
    return out


def decode_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encoded PNGs -> uint8 (N, H, W, 3) batch as decoded (`as_nchw`), for a training step
    that augments on its own device (`data.augment_on`, pipeline.data.readers.batch_augment)."""
    from pipeline.data.codec import decode_images

    images = decode_images(list(batch["image"]), "shard rows")
    return {"image": images, "label": batch["label"].astype(np.int64)}


class SourceShardsDatasource(Datasource):
    """A split of source images (the large benchmarks' JPEGs) as one Ray Data read operator:
    one task per shard reads its rows and decodes + crops them (`decode_and_transform`), block
    by block of `rows` images.

    Why not `read_parquet` + `map_batches`: the read and the decode then run as two operators
    that Ray Data does not fuse, and it splits the CPUs between them, so on a small node
    under one decode task ran at a time (bench.decode_speed, BENCHMARKS.md). As one operator,
    every CPU Ray Data may use decodes.

    A training split reads its shards in an order drawn from (seed, execution index): each
    epoch reshuffles them, as `FileShuffleConfig(reseed_after_execution=True)` does for the
    PNG datasets; task i reads the i-th shard of that order. With `decode` None the rows leave
    encoded, as stored, for a training device that decodes them (`device_decode`).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        rows: int,
        shuffle_seed: int | None,
        decode: dict | None,
    ):
        super().__init__()
        self._fs, self._paths = shard_files(manifest, split)
        self._rows_per_shard = [s.num_rows for s in manifest.split_info(split).shards]
        self.rows, self._shuffle_seed, self._decode = rows, shuffle_seed, decode

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # decoded crops: not known from the encoded bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [
            ReadTask(
                lambda i=i: self._read(i),
                BlockMetadata(
                    num_rows=self._rows_per_shard[i],
                    size_bytes=None,
                    input_files=None,
                    exec_stats=None,
                ),
            )
            for i in range(len(self._paths))
        ]

    def _read(self, task: int) -> Iterator:
        shard = task
        if self._shuffle_seed is not None:
            order = np.random.default_rng([self._shuffle_seed, _execution_index()])
            shard = int(order.permutation(len(self._paths))[task])
        with self._fs.open_input_file(self._paths[shard]) as f:
            for rows in pq.ParquetFile(f).iter_batches(batch_size=self.rows, columns=COLUMNS):
                if self._decode is None:  # encoded: the training device decodes
                    yield pa.Table.from_batches([rows])
                    continue
                batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in COLUMNS}
                yield BlockAccessor.batch_to_block(decode_and_transform(batch, **self._decode))


@contextmanager
def _data_context(**settings) -> Iterator[None]:
    """Plan the datasets made inside with these DataContext `settings`: each Dataset keeps the
    context current at its creation, so they stay with it, and the caller's are restored."""
    ctx = ray.data.DataContext.get_current()
    before = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(ctx, name, value)


# Why PNG shards are read with Ray Data's V1 Parquet reader (the default before Ray 2.60): the
# V2 reader reads a shard as one block, which `map_batches` then augments in one task that
# emits its output only at the end, and every execution (every epoch) waits for it; its file
# listing also stalls on every execution. V1 hands the shard on in blocks of a few hundred
# rows, so the augmentation runs in many tasks and batches reach the trainer as they are made
# (the first-batch wait with each reader: bench/HISTORY.md, the V1 reader fix of commit 68c1531).
PARQUET_READER_V1 = {"use_datasource_v2": False}


def _require_resizing(manifest: Manifest, image_size: int | None, augment: str) -> None:
    """Source images vary in size: a dataset of them needs an image_size and a preset that
    brings them to it."""
    from pipeline.data.readers.transforms import require_resizing_preset

    if image_size is None:
        raise ValueError(f"{manifest.uri}: images of varying size need an image_size")
    require_resizing_preset(augment, manifest.uri)


def split_dataset(
    manifest: Manifest,
    split: str,
    *,
    augment: str = "shike",
    train: bool = False,
    seed: int | None = 0,
    verify: bool = True,
    batch_size: int | None = None,
    with_ids: bool = False,
    image_size: int | None = None,
    uint8: bool = False,
    encoded: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of one split: rows {"image": float32 (3,H,W), "label": int64} (plus the
    source's "sample_id" with `with_ids`). H = W = `image_size` for a "source" dataset (which
    needs it, and an ImageNet-style `augment`); PNG datasets keep their stored size.
    `encoded` (source datasets): the rows as stored, {"image": encoded bytes, "label",
    "sample_id"}, for a training device that decodes them (`device_decode`).
    `batch_size`: rows per decode call of PNG shards, per output block of a source read task
    (None: PNG_TASK_ROWS / SOURCE_TASK_ROWS).
    `uint8`: uint8 images (H, W, 3), as decoded, for a consumer that finishes the augmentation
    on its own device (pipeline.data.readers.batch_augment; `as_nchw` makes a batch NCHW): PNG
    images as stored, source images with the preset's geometry (crop + flip, or the evaluation
    crop) at `image_size`.

    Training splits reshuffle the shard order on every execution (each epoch) and augment each
    image from `seed` (None: unseeded). With the output order pinned (`preserve_order`), an
    epoch's rows and pixels are then a function of (seed, epoch) alone.
    """
    source = manifest.image.encoding == "source"
    if source:
        _require_resizing(manifest, image_size, augment)
    elif encoded:
        raise ValueError(f"{manifest.uri}: only source images travel encoded")
    if verify:
        verify_split(manifest, split)
    decode = {"augment": augment, "train": train, "seed": seed, "with_ids": with_ids}
    if source:
        shards = SourceShardsDatasource(
            manifest,
            split,
            batch_size or SOURCE_TASK_ROWS,
            seed if train else None,
            None if encoded else {**decode, "image_size": image_size, "uint8": uint8},
        )
        # A target block size just under what a task yields at a time, so that each block
        # leaves as soon as it is made; at the default (128 MiB) a task's blocks are merged
        # and the whole shard leaves when the task ends. No per-operator resource reservation:
        # by default Ray Data splits the CPUs and object store memory into operators' reserved
        # shares and a shared pool and holds a new task back while a share is used up; with
        # one operator the split only left the cores idle between tasks (a quarter of a pass
        # on 2 CPUs, half that without it: bench/HISTORY.md).
        if encoded:  # the encoded bytes of `rows` images: the split's average size
            info = manifest.split_info(split).shards
            yielded = (
                shards.rows * sum(s.bytes for s in info) // max(1, sum(s.num_rows for s in info))
            )
        else:
            yielded = shards.rows * 3 * image_size**2 * (1 if uint8 else 4)
        with _data_context(
            target_max_block_size=int(0.75 * yielded),
            op_resource_reservation_enabled=False,
            _max_num_blocks_in_streaming_gen_buffer=SOURCE_GENERATOR_BUFFER,
        ):
            # as many blocks as read tasks: asked for more, Ray Data splits each task's output
            return ray.data.read_datasource(shards, override_num_blocks=shards.num_shards)
    fs, paths = shard_files(manifest, split)
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if train else None
    with _data_context(**PARQUET_READER_V1):
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle)
        ds = ds.select_columns(COLUMNS)
        if uint8:
            return ds.map_batches(decode_only, batch_size=batch_size or PNG_TASK_ROWS)
        return ds.map_batches(
            decode_and_transform,
            fn_kwargs=decode,
            batch_size=batch_size or PNG_TASK_ROWS,
            batch_format="numpy",
        )


def quiet_progress() -> None:
    """Ray Data's per-operator progress bars print several lines per epoch and split; the
    training loop prints its own one line per epoch instead."""
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    # Ray Data warns once per process that the bars are off ("Progress bars disabled. To
    # enable, ..."): they are off on purpose, so that notice is marked as given.
    log_once(RAY_DATA_BARS_OFF_NOTICE)


def training_datasets(
    manifest: Manifest,
    augment: str,
    seed: int,
    image_size: int | None = None,
    uint8: bool = False,
    encoded_train: bool = False,
) -> dict[str, ray.data.Dataset]:
    """{"train", "val", "test"} datasets for a TorchTrainer from a dataset's manifest (read
    and verified). `image_size` (data.image_size) is the side of the batches' images for
    "source" datasets.
    `uint8` (data.augment_on): the workers finish the augmentation on their own device, so the
    training split arrives as uint8 images (CIFAR: as decoded; source images: cropped and
    flipped), and a source dataset's evaluation splits as uint8 evaluation crops.
    `encoded_train` (data.decode_on): the training split's source images arrive encoded."""
    quiet_progress()
    if manifest.train_row_order != TRAIN_ROW_ORDER:
        # The streaming shuffle mixes only ~1,000 neighbouring rows: class-ordered rows would
        # give whole epochs of one-class batches.
        raise DataError(
            f"{manifest.uri}: the training rows of this dataset are stored class by class "
            f"(prepared by an earlier version), which Ray Data's local shuffle cannot mix; run "
            f"jobs/prepare_data.py again with the same arguments to rewrite them in "
            f"{TRAIN_ROW_ORDER} order (the Ray-free engine reads either)"
        )
    common = {"augment": augment, "image_size": image_size}
    train = split_dataset(
        manifest, "train", train=True, seed=seed, uint8=uint8, encoded=encoded_train, **common
    )
    # Evaluation crops of source images are uint8 too; CIFAR evaluation splits stay float.
    eval_uint8 = uint8 and manifest.image.encoding == "source"
    datasets = {"train": train}
    for split in ("val", "test"):
        if split in manifest.splits and manifest.splits[split].num_rows:
            datasets[split] = split_dataset(
                manifest, split, train=False, uint8=eval_uint8, **common
            )
    return datasets
