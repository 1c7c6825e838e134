"""Score a classifier on an in-memory split, batch by batch, as summable `EvalCounts`.

Ray-free and MLflow-free: the in-process path of an evaluation, and the per-batch step that
`pipeline/distributed/scoring.py` runs on Ray Data actors.

The classifier returns probabilities; they go into `EvalCounts.update` as max-shifted
log-probabilities (`log p - log max p`, in float64), whose softmax is the same distribution and
whose argmax is kept even where two probabilities are a few ulps apart.

Every path cuts the split into the same batches (rows [k*B, (k+1)*B) in order, `batch_ranges`),
counts each batch on its own (`score_batch`) and sums the per-batch count vectors in batch
order (`sum_batch_counts`). Where a batch runs therefore never changes the totals, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.evaluation.metrics import EvalCounts

if TYPE_CHECKING:
    from torch import nn

ECE_BINS = 15


class EvaluationError(ValueError):
    """An evaluation / promotion problem the user can fix, with a one-line message."""


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")


def batch_ranges(num_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of each evaluation batch, in order."""
    check_batch_size(batch_size)
    return [(a, min(a + batch_size, num_rows)) for a in range(0, num_rows, batch_size)]


def _batch_logits(probs: torch.Tensor) -> torch.Tensor:
    """Max-shifted log-probabilities: softmax gives `probs` back, argmax is preserved."""
    logp = probs.detach().to(torch.float64).log()
    return logp - logp.max(dim=1, keepdim=True).values


def score_batch(
    classifier: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> torch.Tensor:
    """EvalCounts of one batch as a flat float64 tensor (`EvalCounts.to_tensor`)."""
    with torch.no_grad():
        probs = classifier(torch.from_numpy(np.ascontiguousarray(images)))
    if probs.dim() != 2 or probs.shape[1] != num_classes:
        raise EvaluationError(
            f"the model returned outputs of shape {tuple(probs.shape)} for {len(images)} images; "
            f"expected ({len(images)}, {num_classes}) class probabilities"
        )
    counts = EvalCounts(num_classes, ECE_BINS)
    counts.update(_batch_logits(probs), torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    return counts.to_tensor()


def count_vector_size(num_classes: int) -> int:
    """Length of one batch's flat count vector (`EvalCounts.to_tensor` with `ECE_BINS`)."""
    return 3 * num_classes + 3 * ECE_BINS


def sum_batch_counts(flats: Sequence[torch.Tensor], num_classes: int) -> EvalCounts:
    """The per-batch count vectors added up in the order given."""
    total = torch.zeros(count_vector_size(num_classes), dtype=torch.float64)
    for flat in flats:
        total += flat
    return EvalCounts.from_tensor(total, num_classes, ECE_BINS)


def count_predictions(
    classifier: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 256,
) -> EvalCounts:
    """Run `classifier` over uint8 `images` (N, H, W, 3) in this process, in batches of
    `batch_size`, and count against `labels`."""
    ranges = batch_ranges(len(labels), batch_size)
    classifier.eval()
    flats = [score_batch(classifier, images[a:b], labels[a:b], num_classes) for a, b in ranges]
    return sum_batch_counts(flats, num_classes)
