"""The long-tailed split (SHIKE.md §4): class counts, which images, the val split, class groups.

    counts = longtail_counts(500, 100, 100)          # CIFAR-100-LT IF100: sum(counts) == 10847
    train_idx = select_longtail(labels, counts)       # first n_i images of class i, source order
    val_idx = select_balanced(labels, 20, exclude=train_idx, allow_empty=True)
    lt_groups(counts)                                 # {"many": [0..34], "medium": [...], "few": [...]}

`build_longtail_splits(raw, ...)` applies all of it to a `RawDataset` and returns the three
splits (train = long-tailed subset, val = balanced held-out from unused training images,
test = the official test set). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.data.sources.raw import RawDataset, RawSplit

SELECTION_RULES = ("first", "shuffle")

# Long-tail groups by *training* images per class (DESIGN.md data contract), the one place
# they are defined: the manifest, the metrics, tables and plots use these.
MANY_MIN_EXCLUSIVE = 100  # many: n > 100
FEW_MAX_EXCLUSIVE = 20  # few: n < 20; medium: 20 <= n <= 100


def lt_group(train_images: float) -> str:
    """The group of a class with `train_images` training images: many (> 100), medium
    (20..100) or few (< 20)."""
    if train_images > MANY_MIN_EXCLUSIVE:
        return "many"
    if train_images >= FEW_MAX_EXCLUSIVE:
        return "medium"
    return "few"


def lt_groups(class_counts: Sequence[int] | np.ndarray) -> dict[str, list[int]]:
    """Class ids per group (`lt_group` of each class's training images), in class order."""
    counts = [int(c) for c in np.asarray(class_counts).reshape(-1).tolist()]
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for cls, n in enumerate(counts):
        groups[lt_group(n)].append(cls)
    return groups


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class training counts n_i = int(n_max * (1/IF) ** (i/(C-1))), i = 0..C-1.

    Computed in float exactly like the reference code and truncated with int (not rounded):
    CIFAR-100 (500, 100) gives 10,847 / 12,608 / 19,573 images for IF 100 / 50 / 10.
    Raises ValueError when an argument is out of range or a class would get no image.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    imbalance_factor = float(imbalance_factor)
    if not np.isfinite(imbalance_factor) or imbalance_factor < 1.0:
        raise ValueError(f"imbalance_factor must be a finite number >= 1, got {imbalance_factor!r}")
    n_max, num_classes = int(n_max), int(num_classes)
    if num_classes == 1:
        return [n_max]
    counts = [
        int(n_max * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)
    ]
    if counts[-1] < 1:
        raise ValueError(
            f"imbalance factor {imbalance_factor:g} with n_max {n_max} leaves class "
            f"{num_classes - 1} with no training image (n_max / IF = {n_max / imbalance_factor:g} < 1)"
        )
    return counts


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _class_name(i: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= i < len(class_names):
        return f"class {i} ({class_names[i]!r})"
    return f"class {i}"


def _per_class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Indices of each class in source order (a stable sort keeps the source order)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1), side="left")
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def select_longtail(
    labels: np.ndarray | Sequence[int],
    counts: Sequence[int],
    rule: str = "first",
    seed: int = 0,
    *,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices into `labels` of the long-tailed subset, sorted ascending (so source order).

    Class i (i = 0..len(counts)-1) contributes `counts[i]` images:
    - "first": its first counts[i] images in source order (SHIKE's rule);
    - "shuffle": LDAM-DRW's rule: one `np.random.seed(seed)` stream; for each class in label
      order, shuffle that class's indices and keep the first counts[i]. Bit-identical to the
      LDAM/RIDE/SADE loaders for the same labels and seed (they use seed 0).
    Labels outside 0..len(counts)-1 are ignored. Raises ValueError naming the class when a class
    has fewer images than asked, or for an unknown rule.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")
    labels = _as_labels(labels)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {counts}")
    per_class = _per_class_indices(labels, len(counts))
    rng = np.random.RandomState(seed) if rule == "shuffle" else None
    chosen = []
    for c, (idx, want) in enumerate(zip(per_class, counts, strict=True)):
        if len(idx) < want:
            raise ValueError(
                f"{_class_name(c, class_names)} has {len(idx)} training images but the "
                f"long-tailed split asks for {want}"
            )
        if rng is not None:
            idx = idx.copy()
            rng.shuffle(idx)
        chosen.append(idx[:want])
    out = np.concatenate(chosen) if chosen else np.empty(0, np.int64)
    return np.sort(out).astype(np.int64)


def select_balanced(
    labels: np.ndarray | Sequence[int],
    per_class: int,
    exclude: np.ndarray | Sequence[int] | None = None,
    *,
    num_classes: int | None = None,
    allow_empty: bool = False,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """The balanced split: the first `per_class` images of each class, in source order, among
    the indices NOT in `exclude`; returned sorted ascending.

    A class whose pool (its images minus `exclude`) is smaller than `per_class` gives what it
    has: the split is then only as balanced as the data allows (the manifest records the
    per-class counts). A class with an empty pool raises ValueError naming it when
    per_class > 0, unless `allow_empty=True` (then it simply has no image in the split).

    Note: with n_max equal to the full per-class count (CIFAR's default), the long-tailed
    subset uses every image of class 0, so class 0's pool is always empty.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    labels = _as_labels(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    keep = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64)
        if ex.size and (ex.min() < 0 or ex.max() >= len(labels)):
            raise ValueError("exclude holds indices outside the labels array")
        keep[ex] = False
    if per_class == 0:
        return np.empty(0, np.int64)
    per_class_idx = _per_class_indices(np.where(keep, labels, -1), num_classes)
    chosen = []
    for c, idx in enumerate(per_class_idx):
        if len(idx) == 0 and not allow_empty:
            raise ValueError(
                f"{_class_name(c, class_names)} has no image left for the balanced split "
                f"(all of its images are excluded)"
            )
        chosen.append(idx[:per_class])
    out = np.concatenate(chosen) if chosen else np.empty(0, np.int64)
    return np.sort(out).astype(np.int64)


def class_counts_of(labels: np.ndarray | Sequence[int], num_classes: int) -> list[int]:
    """Images per class (0..num_classes-1) in `labels`."""
    labels = _as_labels(labels)
    return [int(n) for n in np.bincount(labels, minlength=num_classes)[:num_classes]]


@dataclass
class LongTailSplits:
    """The three splits of a long-tailed dataset, plus how they were drawn."""

    train: RawSplit
    val: RawSplit
    test: RawSplit
    train_indices: np.ndarray  # into raw.train, ascending
    val_indices: np.ndarray  # into raw.train, ascending, disjoint from train_indices
    test_indices: np.ndarray  # into raw.test, ascending (all of it unless capped)
    class_counts: list[int]  # training images per class (the long-tail profile)
    groups: dict[str, list[int]]  # many / medium / few
    n_max: int


def build_longtail_splits(
    raw: RawDataset,
    imbalance_factor: float,
    *,
    n_max: int | None = None,
    selection: str = "first",
    selection_seed: int = 0,
    val_per_class: int = 20,
    test_per_class: int | None = None,
) -> LongTailSplits:
    """train = long-tailed subset of raw.train; val = `val_per_class` images per class from
    the training images train did not use (classes with fewer left give what they have; the
    head class has none when n_max is its full count); test = raw.test, optionally capped to
    the first `test_per_class` images per class.

    n_max None: the smallest per-class count of raw.train (500 for CIFAR-100, 5000 for CIFAR-10).
    """
    num_classes = len(raw.class_names)
    full = class_counts_of(raw.train.labels, num_classes)
    if n_max is None:
        n_max = min(full) if full else 0
        if n_max < 1:
            empty = [c for c, n in enumerate(full) if n == 0]
            raise ValueError(
                f"{_class_name(empty[0], raw.class_names)} has no training image in {raw.source}"
            )
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    train_idx = select_longtail(
        raw.train.labels, counts, selection, selection_seed, class_names=raw.class_names
    )
    val_idx = select_balanced(
        raw.train.labels,
        val_per_class,
        exclude=train_idx,
        num_classes=num_classes,
        allow_empty=True,
        class_names=raw.class_names,
    )
    if test_per_class is None:
        test_idx = np.arange(len(raw.test.labels), dtype=np.int64)
    else:
        test_idx = select_balanced(
            raw.test.labels,
            test_per_class,
            num_classes=num_classes,
            allow_empty=True,
            class_names=raw.class_names,
        )
    return LongTailSplits(
        train=raw.train.take(train_idx),
        val=raw.train.take(val_idx),
        test=raw.test.take(test_idx) if test_per_class is not None else raw.test,
        train_indices=train_idx,
        val_indices=val_idx,
        test_indices=test_idx,
        class_counts=counts,
        groups=lt_groups(counts),
        n_max=n_max,
    )
