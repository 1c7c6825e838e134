"""The three splits a run trains and evaluates on, and the Ray-free torch loaders over them.

`load_longtailed(data_cfg)` returns train (long-tailed), val (balanced, from training images the
long-tailed subset did not use) and test (official, balanced) as decoded uint8 arrays, either
from prepared shards (`data.uri`, verified against their manifest) or built in memory from a raw
source with the same split code that `jobs/prepare_data.py` uses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import DataError
from pipeline.data.longtail import build_longtail_splits, select_balanced
from pipeline.data.manifest import read_manifest
from pipeline.data.readers.transforms import build_transform, to_chw_tensor
from pipeline.data.shards import load_split
from pipeline.data.sources.load import load_raw_dataset
from pipeline.data.sources.raw import RawSplit
from pipeline.seeding import augmentation_seed


@dataclass
class LongTailedData:
    name: str
    class_names: list[str]
    class_counts: list[int]  # training images per class (n_i)
    train: RawSplit
    val: RawSplit
    test: RawSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_in_memory(cfg: DataConfig) -> LongTailedData:
    """Long-tailed train / balanced val / test from a raw source, per SHIKE.md §4."""
    if cfg.source is not None and "://" not in cfg.source and not os.path.exists(cfg.source):
        raise DataError(f"data.source does not exist: {cfg.source}")
    raw = load_raw_dataset(cfg.dataset, cfg.source)
    splits = build_longtail_splits(
        raw,
        cfg.imbalance_factor,
        n_max=cfg.n_max,
        selection=cfg.selection,
        selection_seed=cfg.selection_seed,
        val_per_class=cfg.val_per_class,
        test_per_class=cfg.test_per_class,
    )
    return LongTailedData(
        name=raw.name,
        class_names=list(raw.class_names),
        class_counts=list(splits.class_counts),
        train=splits.train,
        val=splits.val,
        test=splits.test,
    )


def load_longtailed(cfg: DataConfig) -> LongTailedData:
    """Prepared shards when `data.uri` is set, else the in-memory builder."""
    return load_prepared(cfg.uri, cfg.test_per_class) if cfg.uri else build_in_memory(cfg)


def load_prepared(uri: str, test_per_class: int | None = None) -> LongTailedData:
    """The Ray-free reader of prepared shards: every shard verified against the manifest."""
    manifest = read_manifest(uri)
    test = load_split(manifest, "test")
    if test_per_class is not None:
        keep = select_balanced(
            test.labels, test_per_class, num_classes=manifest.num_classes, allow_empty=True
        )
        test = test.take(keep)
    train = load_split(manifest, "train")
    # Canonical order (class, then source id), whatever order the shards store the rows in: the
    # engine's epochs are then a function of the seed only, and equal to the in-memory builder's.
    train = train.take(np.lexsort((train.sample_ids, train.labels)))
    return LongTailedData(
        name=manifest.dataset,
        class_names=list(manifest.class_names),
        class_counts=list(manifest.class_counts),
        train=train,
        val=load_split(manifest, "val"),
        test=test,
    )


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (augmentation seed, index) pairs for one epoch, in a seeded order.

    The order comes from `seed` (the epoch seed) and each image's augmentation from
    `augmentation_seed(seed, sample id)` (pipeline.seeding), so an epoch's batches depend on nothing but the seed: not on the number of loader workers,
    nor on which worker decodes which image. `set_seed` between epochs lets one loader (and
    its persistent workers) serve a whole run.
    """

    def __init__(self, sample_ids: Sequence[object], shuffle: bool, seed: int = 0) -> None:
        self.sample_ids = sample_ids
        self.size = len(sample_ids)
        self.shuffle = shuffle
        self.seed = seed

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))
        else:
            order = torch.arange(self.size)
        for i in order.tolist():
            yield augmentation_seed(self.seed, self.sample_ids[i]), i


class ImageArrayDataset(Dataset):
    """uint8 NHWC images + labels -> (normalised float CHW tensor, int label).

    Indexed by (augmentation seed, index) pairs from `EpochSampler`: torch's RNG, which the
    torchvision transforms draw from, is seeded per image.
    """

    def __init__(self, split: RawSplit, transform, random: bool) -> None:
        self.images = split.images
        self.labels = torch.as_tensor(split.labels, dtype=torch.int64)
        self.transform = transform
        self.random = random

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        seed, i = key
        image = to_chw_tensor(self.images[i])
        if not self.random:
            return self.transform(image), self.labels[i]
        # A loader worker's RNG is its own; in the main process, leave the caller's RNG intact.
        in_worker = get_worker_info() is not None
        with nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
            # The transforms draw from the CPU generator only. `torch.manual_seed` would also
            # queue a lazy CUDA seeding, which records a Python stack trace on every call where
            # CUDA is not initialised (loader workers): per image, as costly as the whole
            # augmentation.
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.labels[i]


def make_loader(
    split: RawSplit,
    cfg: DataConfig,
    batch_size: int,
    train: bool,
    seed: int = 0,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A torch DataLoader; for training, shuffling and augmentation are seeded by `seed`.

    Seed = f(run seed, epoch): the epoch's sample order and augmentations then depend on nothing
    but the epoch number, which makes resume exact. With `persistent`, build one loader per run
    and call `loader.sampler.set_seed(...)` before each epoch; its workers then live as long as
    the loader instead of being started again every epoch (which costs more than a small
    dataset's epoch on a fast GPU).
    """
    dataset = ImageArrayDataset(split, build_transform(cfg.augment, train=train), random=train)
    workers = cfg.loader_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(split.sample_ids.tolist(), shuffle=train, seed=seed),
        drop_last=False,  # the recipe keeps the last partial batch
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        # Workers' base seeds come from here, not from the caller's global RNG (they are
        # unused: every image's augmentation is seeded by the sampler).
        generator=torch.Generator().manual_seed(seed),
    )
