"""Evaluation counts and long-tail metrics on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data.longtail import lt_group, lt_groups
from pipeline.evaluation.metrics import EvalCounts

# Six classes; training counts put classes 0-1 in "many", 2-3 in "medium", 4-5 in "few".
TRAIN_COUNTS = [500, 101, 100, 20, 19, 5]


def one_row(ranking: list[int], num_classes: int = 6) -> list[float]:
    """Logits whose descending order is `ranking` (first entry = prediction)."""
    row = [0.0] * num_classes
    for rank, cls in enumerate(ranking):
        row[cls] = float(num_classes - rank)
    return row


# (target, class ranking of the logits). An imbalanced *test* set, so sample-weighted group
# accuracy differs from the mean of per-class accuracies.
SAMPLES = [
    (0, [0, 1, 2, 3, 4, 5]),  # top-1 hit
    (0, [0, 2, 1, 3, 4, 5]),  # top-1 hit
    (0, [1, 0, 2, 3, 4, 5]),  # top-5 hit only
    (1, [0, 2, 3, 4, 5, 1]),  # miss: target ranked 6th
    (2, [2, 0, 1, 3, 4, 5]),  # top-1 hit
    (3, [4, 0, 1, 3, 2, 5]),  # top-5 hit only
    (4, [4, 0, 1, 2, 3, 5]),  # top-1 hit
    (4, [5, 0, 1, 2, 3, 4]),  # miss
    (5, [0, 1, 2, 3, 4, 5]),  # top-5 miss (6th)
    (5, [5, 1, 2, 3, 4, 0]),  # top-1 hit
]


def batch(samples=SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([one_row(r) for _, r in samples])
    target = torch.tensor([t for t, _ in samples])
    return logits, target


def ref_ece(logits: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    total = len(target)
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for row, y in zip(logits.tolist(), target.tolist(), strict=True):
        exps = [math.exp(v - max(row)) for v in row]
        probs = [e / sum(exps) for e in exps]
        conf = max(probs)
        pred = probs.index(conf)
        b = next(i for i in range(bins) if conf <= (i + 1) / bins)  # (i/K, (i+1)/K]
        members[b].append((conf, pred == y))
    ece = 0.0
    for group in members:
        if group:
            acc = sum(hit for _, hit in group) / len(group)
            conf = sum(c for c, _ in group) / len(group)
            ece += len(group) / total * abs(acc - conf)
    return ece


def test_lt_groups_thresholds() -> None:
    groups = lt_groups([101, 100, 20, 19, 0, 500])
    assert groups == {"many": [0, 5], "medium": [1, 2], "few": [3, 4]}
    assert [lt_group(n) for n in (100.5, 100, 20, 19.5)] == ["many", "medium", "medium", "few"]


def test_accuracy_top5_per_class_groups_ece() -> None:
    counts = EvalCounts(6)
    logits, target = batch()
    counts.update(logits, target)
    res = counts.compute(class_counts=TRAIN_COUNTS)
    assert res["num_samples"] == 10
    assert res["acc"] == pytest.approx(5 / 10)
    assert res["top5"] == pytest.approx(7 / 10)
    assert res["per_class_acc"] == pytest.approx([2 / 3, 0.0, 1.0, 0.0, 0.5, 0.5])
    # Sample-weighted: many = classes 0,1 -> 2 hits of 4 samples (per-class mean would be 1/3).
    assert res["acc_many"] == pytest.approx(2 / 4)
    assert res["acc_medium"] == pytest.approx(1 / 2)
    assert res["acc_few"] == pytest.approx(2 / 4)
    assert res["ece"] == pytest.approx(ref_ece(logits, target), abs=1e-6)
    assert res["ece"] > 0


def test_ece_over_many_bins_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 6, generator=g) * torch.rand(300, 1, generator=g) * 6
    target = torch.randint(0, 6, (300,), generator=g)
    counts = EvalCounts(6)
    counts.update(logits, target)
    assert int((counts.bin_count > 0).sum()) >= 8  # confidences really spread over bins
    assert counts.compute()["ece"] == pytest.approx(ref_ece(logits, target), abs=1e-6)


def test_ece_known_values() -> None:
    # Two samples with confidence 0.9 (bin 13): one right, one wrong -> |0.5 - 0.9| = 0.4.
    logit = math.log(9.0)  # softmax([log 9, 0]) = [0.9, 0.1]
    counts = EvalCounts(2)
    counts.update(torch.tensor([[logit, 0.0], [logit, 0.0]]), torch.tensor([0, 1]))
    assert counts.compute()["ece"] == pytest.approx(0.4, abs=1e-6)
    assert int(counts.bin_count[13]) == 2


def test_top5_with_fewer_than_five_classes_and_missing_groups() -> None:
    counts = EvalCounts(3)
    counts.update(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), torch.tensor([2, 0]))
    res = counts.compute()  # no class counts: groups are NaN
    assert res["top5"] == 1.0 and res["acc"] == 0.5
    assert all(math.isnan(res[k]) for k in ("acc_many", "acc_medium", "acc_few"))
    assert math.isnan(res["per_class_acc"][1])  # class without test samples
    res = counts.compute(class_counts=[500, 500, 500])
    assert res["acc_many"] == 0.5 and math.isnan(res["acc_few"])  # empty group -> NaN


def test_merge_two_halves_equals_all_at_once() -> None:
    logits, target = batch()
    whole = EvalCounts(6)
    whole.update(logits, target)
    first, second = EvalCounts(6), EvalCounts(6)
    first.update(logits[:4], target[:4])
    second.update(logits[4:], target[4:])
    merged = first.merge(second).compute(TRAIN_COUNTS)
    expected = whole.compute(TRAIN_COUNTS)
    assert merged["per_class_acc"] == pytest.approx(expected["per_class_acc"])
    for key in ("acc", "top5", "ece", "acc_many", "acc_medium", "acc_few", "num_samples"):
        assert merged[key] == pytest.approx(expected[key]), key


def test_tensor_round_trip_and_summing_flat_tensors() -> None:
    logits, target = batch()
    a, b = EvalCounts(6), EvalCounts(6)
    a.update(logits[:7], target[:7])
    b.update(logits[7:], target[7:])
    flat = a.to_tensor()
    assert flat.dtype == torch.float64 and flat.dim() == 1
    back = EvalCounts.from_tensor(flat, 6)
    for mine, theirs in zip(back._state(), a._state(), strict=True):
        assert torch.equal(mine, theirs)
    # What an all_reduce(SUM) over two workers would produce.
    summed = EvalCounts.from_tensor(a.to_tensor() + b.to_tensor(), 6).compute(TRAIN_COUNTS)
    whole = EvalCounts(6)
    whole.update(logits, target)
    assert summed["acc"] == whole.compute()["acc"]
    assert summed["ece"] == pytest.approx(whole.compute()["ece"])
    with pytest.raises(ValueError):
        EvalCounts.from_tensor(flat[:-1], 6)


def test_rejects_wrong_shapes() -> None:
    counts = EvalCounts(6)
    with pytest.raises(ValueError):
        counts.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        counts.update(torch.zeros(2, 6), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        counts.merge(EvalCounts(6, ece_bins=10))
