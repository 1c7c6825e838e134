"""Long-tail profile and split (SHIKE.md §4, ../shared/data/cifar10/SOURCE.md)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.longtail import (
    build_longtail_splits,
    class_counts_of,
    longtail_counts,
    lt_groups,
    select_balanced,
    select_longtail,
)
from pipeline.data.sources.raw import RawDataset, RawSplit

# SHIKE.md §4: total, first 5, last 5, (many, medium, few) class counts
CIFAR100 = {
    100: (10847, [500, 477, 455, 434, 415], [6, 5, 5, 5, 5], (35, 35, 30)),
    50: (12608, [500, 480, 462, 444, 426], [11, 11, 10, 10, 10], (41, 41, 18)),
    10: (19573, [500, 488, 477, 466, 455], [54, 53, 52, 51, 50], (69, 31, 0)),
}
# SOURCE.md: per-class counts for CIFAR-10 (n_max 5000)
CIFAR10 = {
    100: (12406, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
    50: (13996, [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]),
    10: (20431, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
}


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_cifar100_counts_match_the_paper(imbalance):
    total, first5, last5, (many, medium, few) = CIFAR100[imbalance]
    counts = longtail_counts(500, 100, imbalance)
    assert sum(counts) == total
    assert counts[:5] == first5 and counts[-5:] == last5
    assert counts == sorted(counts, reverse=True)
    groups = lt_groups(counts)
    assert (len(groups["many"]), len(groups["medium"]), len(groups["few"])) == (many, medium, few)


def test_cifar100_if100_groups_are_contiguous_class_ranges():
    groups = lt_groups(longtail_counts(500, 100, 100))
    assert groups == {
        "many": list(range(0, 35)),
        "medium": list(range(35, 70)),
        "few": list(range(70, 100)),
    }


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_cifar10_counts_match_source_md(imbalance):
    total, per_class = CIFAR10[imbalance]
    counts = longtail_counts(5000, 10, imbalance)
    assert counts == per_class and sum(counts) == total


def test_counts_truncate_not_round():
    # rounding would give 10,899 for CIFAR-100 IF100
    counts = longtail_counts(500, 100, 100)
    rounded = [round(500 * (1 / 100) ** (i / 99)) for i in range(100)]
    assert sum(rounded) == 10899 and sum(counts) == 10847


def test_counts_edge_cases():
    assert longtail_counts(7, 1, 100) == [7]
    assert longtail_counts(50, 4, 1) == [50, 50, 50, 50]
    assert longtail_counts(500, 100, 100.0) == longtail_counts(500, 100, 100)
    with pytest.raises(ValueError, match="imbalance_factor"):
        longtail_counts(500, 100, 0.5)
    with pytest.raises(ValueError, match="n_max"):
        longtail_counts(0, 10, 10)
    with pytest.raises(ValueError, match="num_classes"):
        longtail_counts(10, 0, 10)
    with pytest.raises(ValueError, match="class 9 with no training image"):
        longtail_counts(50, 10, 100)


def _interleaved_labels(num_classes: int, per_class: int, seed: int = 3) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def test_select_first_takes_first_n_per_class_in_source_order():
    labels = _interleaved_labels(4, 10)
    counts = [10, 6, 3, 1]
    idx = select_longtail(labels, counts, "first")
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    for c, n in enumerate(counts):
        assert list(idx[labels[idx] == c]) == list(np.flatnonzero(labels == c)[:n])
    assert class_counts_of(labels[idx], 4) == counts


def _ldam_reference(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """The LDAM-DRW IMBALANCECIFAR rule, written the way those loaders do it."""
    np.random.seed(seed)
    new = []
    for the_class, the_img_num in zip(np.unique(labels), counts, strict=True):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        new.append(idx[:the_img_num])
    return np.sort(np.concatenate(new))


@pytest.mark.parametrize("seed", [0, 7])
def test_select_shuffle_matches_ldam_loader(seed):
    labels = _interleaved_labels(10, 50)
    counts = longtail_counts(50, 10, 10)
    idx = select_longtail(labels, counts, "shuffle", seed)
    assert np.array_equal(idx, _ldam_reference(labels, counts, seed))
    assert class_counts_of(labels[idx], 10) == counts
    assert not np.array_equal(idx, select_longtail(labels, counts, "first"))
    # does not disturb numpy's global RNG
    np.random.seed(123)
    a = np.random.rand()
    np.random.seed(123)
    select_longtail(labels, counts, "shuffle", seed)
    assert np.random.rand() == a


def test_select_errors_name_the_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"class 2 \('bird'\) has 1 training images .* asks for 2"):
        select_longtail(labels, [3, 2, 2], class_names=["cat", "dog", "bird"])
    with pytest.raises(ValueError, match="class 1 has 2"):
        select_longtail(labels, [3, 3, 1])
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_longtail(labels, [1, 1, 1], "random")


def test_select_balanced_takes_first_unused_per_class():
    labels = _interleaved_labels(3, 10)
    train = select_longtail(labels, [4, 2, 1])
    val = select_balanced(labels, 3, exclude=train)
    assert not set(val) & set(train)
    for c in range(3):
        pool = [i for i in np.flatnonzero(labels == c) if i not in set(train)]
        assert list(val[labels[val] == c]) == pool[:3]
    assert np.all(np.diff(val) > 0)


def test_select_balanced_small_and_empty_pools():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    exclude = np.array([0, 1, 2, 3])  # class 0 fully used, class 1 has one left
    val = select_balanced(labels, 2, exclude=exclude, allow_empty=True)
    assert list(val) == [4, 5, 6]
    with pytest.raises(ValueError, match="class 0 .* no image left"):
        select_balanced(labels, 2, exclude=exclude)
    assert select_balanced(labels, 0, exclude=exclude).size == 0
    # a class with no image at all (num_classes larger than the labels show)
    with pytest.raises(ValueError, match="class 3"):
        select_balanced(labels, 1, num_classes=4)


def test_class_group_thresholds():
    counts = [101, 100, 20, 19, 0]
    assert lt_groups(counts) == {"many": [0], "medium": [1, 2], "few": [3, 4]}


def _raw(num_classes: int, train_per_class: int, test_per_class: int) -> RawDataset:
    def split(per, prefix):
        labels = _interleaved_labels(num_classes, per)
        n = len(labels)
        images = np.arange(n, dtype=np.int64).reshape(n, 1, 1, 1).repeat(3, -1).astype(np.uint8)
        return RawSplit(images, labels, np.array([f"{prefix}/{i}" for i in range(n)]))

    return RawDataset(
        "imagefolder",
        [f"c{i}" for i in range(num_classes)],
        split(train_per_class, "train"),
        split(test_per_class, "test"),
        "memory",
        "sha256:0",
    )


def test_build_longtail_splits():
    raw = _raw(10, 60, 8)
    s = build_longtail_splits(raw, 10, val_per_class=5)
    assert s.n_max == 60 and s.class_counts == longtail_counts(60, 10, 10)
    assert class_counts_of(s.train.labels, 10) == s.class_counts
    # class 0 uses all 60 images: its pool for val is empty; others give 5
    assert class_counts_of(s.val.labels, 10) == [0] + [5] * 9
    assert not set(s.train_indices) & set(s.val_indices)
    assert list(s.train.sample_ids) == [f"train/{i}" for i in s.train_indices]
    assert s.test is raw.test and len(s.test_indices) == 80
    capped = build_longtail_splits(raw, 10, n_max=40, val_per_class=5, test_per_class=3)
    assert class_counts_of(capped.val.labels, 10) == [5] * 10
    assert class_counts_of(capped.test.labels, 10) == [3] * 10
    shuffled = build_longtail_splits(raw, 10, selection="shuffle", selection_seed=1)
    assert shuffled.class_counts == s.class_counts
    assert not np.array_equal(shuffled.train_indices, s.train_indices)
