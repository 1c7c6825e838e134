"""Evaluation metrics for long-tailed classification, as summable counts.

Every metric is derived from counts that add up across batches and workers, so distributed
evaluation is: each worker ``update``s its shard, the caller all-reduces ``to_tensor()`` (a flat
float64 tensor, SUM), and ``EvalCounts.from_tensor`` rebuilds the totals for ``compute``.

    counts = EvalCounts(num_classes=100)
    for images, labels in loader:
        counts.update(model(images).mean(0), labels)   # mean of the experts' logits
    flat = counts.to_tensor(); dist.all_reduce(flat)   # caller's job
    results = EvalCounts.from_tensor(flat, 100).compute(class_counts=train_counts)

Definitions (accuracies are fractions in [0, 1]):

* ``acc`` / ``top5`` — over all test samples; top-5 uses min(5, C) guesses.
* ``per_class_acc`` — correct / samples of each class; NaN for a class with no test samples.
* ``acc_many`` / ``acc_medium`` / ``acc_few`` — *sample-weighted* accuracy over the test samples
  whose class is in the group (Σ correct / Σ samples), as the LT literature reports it; on a
  balanced test set this equals the mean per-class accuracy of the group. NaN when the group is
  empty (no such classes, or no test samples of them, or no ``class_counts`` given).
* ``ece`` — expected calibration error over ``ece_bins`` equal-width bins of the max softmax
  probability: Σ_b (n_b / N)·|acc_b − conf_b|; bin b holds confidences in (b/K, (b+1)/K].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pipeline.data.longtail import lt_groups

# The scalar results of `EvalCounts.compute`: what the epoch metrics (`split/<key>`), the console
# and MLflow report of a split (with its `num_samples` where a whole split is logged).
SCALAR_RESULTS = ("acc", "top5", "acc_many", "acc_medium", "acc_few", "ece")


class EvalCounts:
    """Summable evaluation counts: per-class top-1/top-5 hits and sample totals, ECE bins.

    The state lives on the device of the first ``update`` (no host sync per batch).
    """

    def __init__(
        self, num_classes: int, ece_bins: int = 15, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be >= 1, got {ece_bins}")
        self.num_classes = num_classes
        self.ece_bins = ece_bins
        self._init_state(torch.device(device) if device is not None else torch.device("cpu"))
        self._placed = device is not None

    def _init_state(self, device: torch.device) -> None:
        c, k = self.num_classes, self.ece_bins
        self.class_total = torch.zeros(c, dtype=torch.int64, device=device)
        self.class_top1 = torch.zeros(c, dtype=torch.int64, device=device)
        self.class_top5 = torch.zeros(c, dtype=torch.int64, device=device)
        self.bin_count = torch.zeros(k, dtype=torch.int64, device=device)
        self.bin_correct = torch.zeros(k, dtype=torch.int64, device=device)
        self.bin_confidence = torch.zeros(k, dtype=torch.float64, device=device)  # Σ confidence

    def _state(self) -> list[Tensor]:
        return [
            self.class_total,
            self.class_top1,
            self.class_top5,
            self.bin_count,
            self.bin_correct,
            self.bin_confidence,
        ]

    @property
    def device(self) -> torch.device:
        return self.class_total.device

    def _move(self, device: torch.device) -> None:
        (
            self.class_total,
            self.class_top1,
            self.class_top5,
            self.bin_count,
            self.bin_correct,
            self.bin_confidence,
        ) = (t.to(device) for t in self._state())

    @torch.no_grad()
    def update(self, logits_mean: Tensor, target: Tensor) -> None:
        """Add a batch: ``logits_mean`` (B, C) (the experts' mean logits), ``target`` (B,)."""
        if logits_mean.dim() != 2 or logits_mean.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape (B, {self.num_classes}), got {tuple(logits_mean.shape)}"
            )
        if target.shape != logits_mean.shape[:1]:
            raise ValueError(
                f"target must have shape ({logits_mean.shape[0]},), got {tuple(target.shape)}"
            )
        if not self._placed:
            self._move(logits_mean.device)
            self._placed = True
        logits = logits_mean.detach().to(self.device, torch.float32)
        target = target.detach().to(self.device, torch.int64)
        if target.numel() == 0:
            return

        probs = logits.softmax(dim=-1)
        confidence, pred = probs.max(dim=-1)  # argmax of softmax == argmax of logits
        top1 = pred == target
        k = min(5, self.num_classes)
        top5 = (logits.topk(k, dim=-1).indices == target.unsqueeze(1)).any(dim=1)

        # index_add_ into fixed-size buffers: no host sync (bincount / boolean indexing would).
        self.class_total.index_add_(0, target, torch.ones_like(target))
        self.class_top1.index_add_(0, target, top1.long())
        self.class_top5.index_add_(0, target, top5.long())

        # Bin b holds confidences in (b/K, (b+1)/K]: index ceil(conf·K) − 1, clamped to [0, K−1].
        conf64 = confidence.double()
        bins = (conf64 * self.ece_bins).ceil().long().sub(1).clamp(0, self.ece_bins - 1)
        self.bin_count.index_add_(0, bins, torch.ones_like(bins))
        self.bin_correct.index_add_(0, bins, top1.long())
        self.bin_confidence.index_add_(0, bins, conf64)

    def merge(self, other: EvalCounts) -> EvalCounts:
        """Add ``other``'s counts into this one (in place); returns self."""
        if (other.num_classes, other.ece_bins) != (self.num_classes, self.ece_bins):
            raise ValueError("cannot merge EvalCounts with different num_classes / ece_bins")
        for mine, theirs in zip(self._state(), other._state(), strict=True):
            mine += theirs.to(mine.device)
        self._placed = self._placed or other._placed
        return self

    def to_tensor(self) -> Tensor:
        """Flat float64 tensor of every count (exact for counts below 2⁵³), for all_reduce SUM."""
        return torch.cat([t.to(torch.float64) for t in self._state()])

    @classmethod
    def from_tensor(cls, flat: Tensor, num_classes: int, ece_bins: int = 15) -> EvalCounts:
        """Inverse of ``to_tensor`` (the result lives on ``flat``'s device)."""
        out = cls(num_classes, ece_bins, device=flat.device)
        expected = 3 * num_classes + 3 * ece_bins
        if flat.dim() != 1 or flat.numel() != expected:
            raise ValueError(
                f"expected a flat tensor of {expected} values for {num_classes} classes and "
                f"{ece_bins} bins, got shape {tuple(flat.shape)}"
            )
        sizes = [num_classes] * 3 + [ece_bins] * 3
        pieces = torch.split(flat.to(torch.float64), sizes)
        for target, piece in zip(out._state(), pieces, strict=True):
            if target.dtype == torch.int64:
                target.copy_(piece.round().to(torch.int64))
            else:
                target.copy_(piece)
        return out

    @property
    def num_samples(self) -> int:
        return int(self.class_total.sum().item())

    def compute(self, class_counts: Sequence[int] | Tensor | None = None) -> dict[str, Any]:
        """Metrics as Python numbers (see the module docstring for definitions).

        ``class_counts``: per-class *training* counts, for the many/medium/few groups.
        """
        total = self.class_total.cpu().to(torch.float64)
        top1 = self.class_top1.cpu().to(torch.float64)
        top5 = self.class_top5.cpu().to(torch.float64)
        n = float(total.sum())
        nan = float("nan")

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else nan

        per_class = [ratio(float(a), float(b)) for a, b in zip(top1, total, strict=True)]

        bin_count = self.bin_count.cpu().to(torch.float64)
        bin_correct = self.bin_correct.cpu().to(torch.float64)
        bin_conf = self.bin_confidence.cpu()
        ece = 0.0
        for count, correct, conf in zip(bin_count, bin_correct, bin_conf, strict=True):
            if count > 0:
                ece += float(count) / n * abs(float(correct / count) - float(conf / count))

        groups: dict[str, float] = {"many": nan, "medium": nan, "few": nan}
        if class_counts is not None:
            num_counts = torch.as_tensor(class_counts).numel()
            if num_counts != self.num_classes:
                raise ValueError(
                    f"class_counts has {num_counts} entries, expected {self.num_classes}"
                )
            for name, ids in lt_groups(class_counts).items():
                idx = torch.tensor(ids, dtype=torch.int64)
                # Sample-weighted: correct / samples over every test image of the group.
                groups[name] = ratio(float(top1[idx].sum()), float(total[idx].sum()))

        return {
            "acc": ratio(float(top1.sum()), n),
            "top5": ratio(float(top5.sum()), n),
            "ece": ece if n > 0 else nan,
            "acc_many": groups["many"],
            "acc_medium": groups["medium"],
            "acc_few": groups["few"],
            "per_class_acc": per_class,
            "num_samples": int(n),
        }
