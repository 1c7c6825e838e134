"""The three splits a run trains and evaluates on, and the Ray-free torch loaders over them.

`load_longtailed(data_cfg)` returns train (long-tailed), val (balanced, from training images the
long-tailed subset did not use) and test (official, balanced) as decoded uint8 arrays, either
from prepared shards (`data.uri`, verified against their manifest) or built in memory from a raw
source with the same split code that `jobs/prepare_data.py` uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import DataConfig
from pipeline.data.longtail import longtail_counts, select_balanced, select_longtail
from pipeline.data.sources import RawSplit, load_raw_dataset
from pipeline.data.transforms import build_transform, to_chw_tensor

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGES_PER_CLASS = {"cifar10": 5000, "cifar100": 500}


class DataError(ValueError):
    """A data problem (missing path, bad manifest, ...) with a message naming the culprit."""


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


def _take(split: RawSplit, idx: np.ndarray) -> RawSplit:
    return RawSplit(
        images=split.images[idx],
        labels=split.labels[idx],
        sample_ids=split.sample_ids[idx],
        coarse_labels=None if split.coarse_labels is None else split.coarse_labels[idx],
    )


def _cap_per_class(split: RawSplit, per_class: int | None) -> RawSplit:
    if per_class is None:
        return split
    idx = np.concatenate(
        [np.flatnonzero(split.labels == c)[:per_class] for c in np.unique(split.labels)]
    )
    return _take(split, np.sort(idx))


def build_in_memory(cfg: DataConfig) -> LongTailedData:
    """Long-tailed train / balanced val / test from a raw source, per SHIKE.md §4."""
    source = cfg.source
    if source is not None and "://" not in source and not os.path.exists(source):
        raise DataError(f"data.source does not exist: {source}")
    raw = load_raw_dataset(cfg.dataset, source)
    num_classes = len(raw.class_names)
    n_max = cfg.n_max or int(np.bincount(raw.train.labels, minlength=num_classes).max())
    counts = longtail_counts(n_max, num_classes, cfg.imbalance_factor)
    train_idx = select_longtail(raw.train.labels, counts, rule=cfg.selection, seed=cfg.selection_seed)
    val_idx = select_balanced(raw.train.labels, cfg.val_per_class, exclude=train_idx)
    return LongTailedData(
        name=raw.name,
        class_names=list(raw.class_names),
        class_counts=list(counts),
        train=_take(raw.train, train_idx),
        val=_take(raw.train, val_idx),
        test=_cap_per_class(raw.test, cfg.test_per_class),
    )


def load_longtailed(cfg: DataConfig) -> LongTailedData:
    """Prepared shards when `data.uri` is set, else the in-memory builder."""
    if cfg.uri:
        from pipeline.data.shards import load_prepared

        data = load_prepared(cfg.uri)
        data.test = _cap_per_class(data.test, cfg.test_per_class)
        return data
    return build_in_memory(cfg)


class ImageArrayDataset(Dataset):
    """uint8 NHWC images + labels -> (normalised float CHW tensor, int label)."""

    def __init__(self, split: RawSplit, transform) -> None:
        self.images = split.images
        self.labels = torch.as_tensor(split.labels, dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(to_chw_tensor(self.images[i])), self.labels[i]


def make_loader(
    split: RawSplit,
    cfg: DataConfig,
    batch_size: int,
    train: bool,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A torch DataLoader; for training, shuffling and augmentation are seeded by `seed`.

    Build one per epoch with seed = f(run seed, epoch): the epoch's sample order and
    augmentations then depend on nothing but the epoch number, which makes resume exact.
    """
    dataset = ImageArrayDataset(split, build_transform(cfg.augment, train=train))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=False,  # the recipe keeps the last partial batch
        num_workers=cfg.loader_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
