"""The Ray-free streaming reader: a manifest split's shards of source images (varying sizes,
`image.encoding` "source") -> batches of (NCHW images at image_size, int64 labels), never the
whole split in memory: uint8 crops (in channels-last memory, `collate_crops`) for a training
device that finishes the augmentation (`data.augment_on`, the default), else normalised
float. Imports neither Ray nor MLflow.

    loader = make_stream_loader(manifest, "train", cfg.data, batch_size=256, train=True)
    for epoch in ...:
        loader.dataset.set_seed(epoch_seed(run_seed, epoch))
        for images, labels in loader: ...

One epoch of a training split:
1. the shards are put in an order drawn from the epoch seed; with W loader workers, worker k
   takes shards k, k+W, k+2W, ... of that order (W = 0 reads in the main process, as one
   worker);
2. a worker reads one shard at a time and checks it against the manifest (size, schema, rows,
   and its sha256 the first time the loader reads it: an IntegrityError naming the file)
   before using any of its rows;
3. it walks the shard's rows in a seeded random order through a shuffle buffer of
   `buffer_size` encoded rows that mixes neighbouring shards;
4. it decodes each image (pipeline.data.codec) and applies the train transform (the uint8
   crop + flip, or the whole preset) with torch's generator seeded by
   `augmentation_seed(epoch seed, sample id)`, and batches the results.

What an epoch depends on: each image's pixels on (run seed, epoch, sample id) only, whatever
the worker count or reader (the Ray Data path draws the same); which rows share a batch and
the batches' order on (run seed, epoch) and the worker count W, because shards are dealt to
workers, each worker shuffles and batches its own rows (so up to W batches are partial), and
the DataLoader takes one batch from each worker in turn. W = 0 and W = 1 give the same batches.

Evaluation splits: shards in manifest order, rows in stored order, the evaluation transform
(resize + centre crop); `per_class` keeps the first N images of each class (`data.test_per_class`).

Memory per worker, whatever the dataset's size: one shard at a time (its bytes while they are
verified, its parsed table while its rows are walked), `buffer_size` encoded images, and the
DataLoader's prefetched batches (2 per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import DataError, IntegrityError
from pipeline.data.longtail import select_balanced
from pipeline.data.manifest import TRAIN_ROW_ORDER, Manifest
from pipeline.data.readers.transforms import (
    Decode,
    DecodeGeometry,
    build_transform,
    require_resizing_preset,
)
from pipeline.data.shards import read_shard
from pipeline.seeding import augmentation_seed
from pipeline.storage import display, join, storage_error

# Encoded rows a worker's shuffle buffer holds (about 110 MB of ImageNet JPEGs): enough to mix
# the end of one shard with the start of the next; within a shard every row order is possible.
SHUFFLE_BUFFER_ROWS = 1024

Row = tuple[bytes, int, str, str]  # encoded image, label, sample id, the shard's name


def balanced_rows(manifest: Manifest, split: str, per_class: int) -> list[np.ndarray]:
    """Per shard of `split` (manifest order), the row indices of the first `per_class` images
    of each class counted over the whole split: the selection `select_balanced` makes on the
    in-memory path. Reads only the label column; the rows are verified when streamed."""
    fs, labels = manifest.filesystem, []
    for path in manifest.shard_paths(split):
        try:
            table = pq.read_table(path, columns=["label"], filesystem=fs)
        except FileNotFoundError:
            raise IntegrityError(
                f"shard {display(fs, path)} listed in the manifest is missing"
            ) from None
        except pa.ArrowInvalid as exc:
            raise IntegrityError(
                f"shard {display(fs, path)} is not a readable Parquet file ({exc})"
            ) from None
        except OSError as exc:
            raise storage_error(exc, fs, path, "read") from None
        labels.append(table.column("label").to_numpy())
    sizes = [len(part) for part in labels]
    all_labels = np.concatenate(labels) if labels else np.empty(0, np.int64)
    keep = select_balanced(
        all_labels, per_class, num_classes=manifest.num_classes, allow_empty=True
    )
    starts = np.cumsum([0, *sizes])
    return [
        keep[(keep >= lo) & (keep < hi)] - lo
        for lo, hi in zip(starts[:-1], starts[1:], strict=True)
    ]


def _shuffled(rows: Iterator[Row], size: int, rng: np.random.Generator) -> Iterator[Row]:
    """Rows in a random order drawn through a buffer of `size` rows."""
    buffer: list[Row] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """(image, label) of one split, streamed shard by shard (see the module doc), each image
    through `decode` (`transforms.Decode`); with no `decode`, (encoded image, label, sample id).

    `seed` is the epoch seed (`pipeline.seeding.epoch_seed`); `set_seed` before each epoch.
    `keep_rows` (per shard, row indices) restricts an evaluation split (`balanced_rows`).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        decode: Decode | None,
        *,
        train: bool,
        seed: int = 0,
        buffer_size: int = SHUFFLE_BUFFER_ROWS,
        keep_rows: list[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.shards = manifest.split_info(split).shards
        self.decode = decode
        self.train = train
        self.seed = seed
        self.buffer_size = buffer_size
        self.keep_rows = keep_rows
        # Which shards a worker has hashed, in memory every epoch's workers share: each shard's
        # bytes are hashed once per loader (a run), as the Ray Data path verifies a split once
        # before its run, not every epoch.
        self._hashed = torch.zeros(len(self.shards), dtype=torch.bool).share_memory_()

    @property
    def num_rows(self) -> int:
        """Images one pass yields."""
        if self.keep_rows is None:
            return sum(shard.num_rows for shard in self.shards)
        return sum(len(rows) for rows in self.keep_rows)

    def set_seed(self, seed: int) -> None:
        """The next epoch's seed; the loader's workers are started per epoch and see it."""
        self.seed = seed

    def _shard_rows(self, index: int, rng: np.random.Generator | None) -> Iterator[Row]:
        shard = self.shards[index]
        table = read_shard(self.manifest, shard, hashed=bool(self._hashed[index]))
        self._hashed[index] = True
        where = display(self.manifest.filesystem, join(self.manifest.root, shard.path))
        labels = table.column("label").to_numpy()
        if labels.size and (labels.min() < 0 or labels.max() >= self.manifest.num_classes):
            raise IntegrityError(
                f"shard {where} holds labels outside 0..{self.manifest.num_classes - 1}"
            )
        images, ids = table.column("image"), table.column("sample_id").to_pylist()
        rows = np.arange(len(labels)) if self.keep_rows is None else self.keep_rows[index]
        if rng is not None:
            rows = rng.permutation(rows)
        for i in rows.tolist():
            yield images[i].as_py(), int(labels[i]), ids[i], where

    def _rows(self) -> Iterator[Row]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.train:
            for index in range(worker, len(self.shards), workers):
                yield from self._shard_rows(index, None)
            return
        order = np.random.default_rng(self.seed).permutation(len(self.shards))
        rng = np.random.default_rng([self.seed, worker, workers])
        rows = (row for i in order[worker::workers] for row in self._shard_rows(int(i), rng))
        yield from _shuffled(rows, self.buffer_size, rng)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | tuple[bytes, int, str]]:
        if self.decode is None:  # encoded: the training device decodes (device_decode)
            for blob, label, sample_id, _ in self._rows():
                yield blob, label, sample_id
            return
        # A loader worker's RNG is its own; in the main process, leave the caller's RNG intact.
        in_worker = get_worker_info() is not None
        for blob, label, sample_id, where in self._rows():
            what = f"{sample_id} in {where}"
            if not self.train:
                yield self.decode(blob, what), label
                continue
            seed = augmentation_seed(self.seed, sample_id)
            with nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
                pixels = self.decode(blob, what, seed)
            yield pixels, label  # outside fork_rng: the consumer runs with its own RNG state


def collate_crops(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of uint8 crops (`DecodeGeometry`) as (N, 3, H, W) images in channels-last
    memory, and int64 labels. The decoder writes each image's pixels interleaved (H, W, 3), and
    batching them so is a copy; planar NCHW memory would take a transposition of every image
    here. The training device makes the batch contiguous (`batch_augment.BatchAugment`)."""
    images, labels = default_collate([(image.permute(1, 2, 0), label) for image, label in samples])
    return images.permute(0, 3, 1, 2), labels


def make_stream_loader(
    manifest: Manifest,
    split: str,
    cfg: DataConfig,
    batch_size: int,
    train: bool,
    seed: int = 0,
    pin_memory: bool = False,
    per_class: int | None = None,
    buffer_size: int = SHUFFLE_BUFFER_ROWS,
    encoded: bool = False,
) -> DataLoader:
    """A DataLoader of (NCHW image_size x image_size, int64 labels) over one split of a
    "source" dataset, decoded and cropped in `cfg.loader_workers` workers: uint8
    (`collate_crops`) when the training device finishes the augmentation
    (`cfg.augments_on_device`: the preset's colour ops and normalisation,
    pipeline.data.readers.batch_augment), else the whole preset here, normalised float.
    `encoded`: (encoded images, int64 labels, sample ids) batches of the rows as stored, for a
    training device that decodes them (`device_decode`).

    For training, `seed` is the epoch seed; one loader serves a whole run when
    `loader.dataset.set_seed(epoch_seed(run seed, epoch))` is called before each epoch. Its
    workers are not persistent: they start with each epoch's iteration, which is how the new
    seed reaches them (negligible against an epoch of a large dataset).
    """
    require_resizing_preset(cfg.augment, manifest.uri or manifest.dataset)
    if train and manifest.train_row_order != TRAIN_ROW_ORDER:
        # Shards are read whole and dealt to workers: a split stored class by class gives each
        # worker a few classes at a time, which no streaming shuffle can mix.
        raise DataError(
            f"{manifest.uri}: the training rows are stored in {manifest.train_row_order!r} "
            f"order; streaming needs them in {TRAIN_ROW_ORDER!r} order (prepare the dataset "
            f"again with jobs/prepare_data.py)"
        )
    keep_rows = balanced_rows(manifest, split, per_class) if per_class is not None else None
    if encoded:
        decode = None
    elif cfg.augments_on_device:
        decode = DecodeGeometry(train, cfg.image_size)
    else:
        decode = Decode(build_transform(cfg.augment, train=train, image_size=cfg.image_size))
    dataset = ShardStream(
        manifest,
        split,
        decode,
        train=train,
        seed=seed,
        buffer_size=buffer_size,
        keep_rows=keep_rows,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_crops if isinstance(decode, DecodeGeometry) else None,
        num_workers=cfg.loader_workers,
        pin_memory=pin_memory,
        # Workers' base seeds come from here, not from the caller's global RNG (they are
        # unused: every image's augmentation is seeded by its sample id).
        generator=torch.Generator().manual_seed(seed),
    )
