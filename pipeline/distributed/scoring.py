"""Evaluation batches scored by Ray Data actors that each hold the classifier: the
`workers > 1` path of `pipeline.evaluation.evaluate.count_split_predictions`.

One Ray Data row per evaluation batch, so Ray's block and batch cuts never re-cut a batch; each
actor runs the Ray-free `pipeline.evaluation.scoring.score_batch`, and the caller sums the per-batch
counts in batch order (`scoring.sum_batch_counts`), exactly as the in-process path does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from pipeline.evaluation.scoring import EvaluationError, count_vector_size, score_batch

if TYPE_CHECKING:
    from torch import nn


class RayBatchScorer:
    """Ray Data callable class: holds the classifier and the split (from the object store);
    each input row is one evaluation batch index."""

    def __init__(self, boxed: list[Any], num_classes: int) -> None:
        model, images, labels, ranges = (
            ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in boxed
        )
        self.model = model.eval()
        self.images, self.labels, self.ranges = images, labels, ranges
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = np.asarray(batch["id"], dtype=np.int64)
        flats = []
        for k in index:
            a, b = self.ranges[int(k)]
            # Copies: arrays from the object store are read-only (torch warns on those).
            images = np.array(self.images[a:b])
            labels = np.array(self.labels[a:b])
            flats.append(score_batch(self.model, images, labels, self.num_classes).numpy())
        width = count_vector_size(self.num_classes)
        stacked = np.stack(flats) if flats else np.zeros((0, width))
        return {"index": index, "counts": stacked}


def ray_batch_counts(
    classifier: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    ranges: list[tuple[int, int]],
    workers: int,
    cpus_per_worker: float,
) -> list[torch.Tensor]:
    """Per-batch count vectors of `ranges`, scored by `workers` Ray Data actors, in order."""
    if not ranges:
        return []
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # RAY_ADDRESS (ray job submit) or a local instance
    boxed = [ray.put(classifier.cpu().eval()), ray.put(images), ray.put(labels), ranges]
    ds = ray.data.range(len(ranges), override_num_blocks=min(len(ranges), 4 * workers))
    scored = ds.map_batches(
        RayBatchScorer,
        fn_constructor_kwargs={"boxed": boxed, "num_classes": num_classes},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
    )
    by_index: dict[int, np.ndarray] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for k, flat in zip(batch["index"], batch["counts"], strict=True):
            if int(k) in by_index:
                raise EvaluationError(f"Ray Data returned evaluation batch {int(k)} twice")
            by_index[int(k)] = np.array(flat, dtype=np.float64)  # a writable copy
    missing = [k for k in range(len(ranges)) if k not in by_index]
    if missing:
        raise EvaluationError(f"Ray Data lost evaluation batches {missing[:10]}")
    return [torch.from_numpy(by_index[k]) for k in range(len(ranges))]
