"""The learning-rate schedule of both stages and the stage of an epoch (SHIKE.md §3.1)."""

from __future__ import annotations

import math

from pipeline.config import OptimConfig


def _warmup_cosine(e: int, base: float, peak: float, warmup: int, length: int) -> float:
    """The released scheduler: linear warm-up that reaches `base` at e=1 and `peak` at e=warmup,
    then a half cosine from `peak` to 0 over the remaining epochs of the stage."""
    if e < warmup:
        return base + (peak - base) / max(warmup - 1, 1) * (e - 1)
    span = max(length - warmup, 1)
    return 0.5 * peak * (1.0 + math.cos(math.pi * (e - warmup) / span))


def stage_of(epoch: int, optim: OptimConfig) -> int:
    return 2 if epoch >= optim.stage2_start else 1


def lr_at(epoch: int, optim: OptimConfig) -> float:
    """Learning rate of `epoch` (0-based). Stage 1: 0.025..0.125 warm-up, 0.15 peak at epoch 5,
    cosine to ~0 at 179; stage 2 restarts: 0.0375..0.0875, 0.10 at 185, cosine to 0.0011 at 199."""
    if stage_of(epoch, optim) == 1:
        return _warmup_cosine(
            epoch, optim.lr, optim.peak_lr, optim.warmup_epochs, optim.stage2_start
        )
    return _warmup_cosine(
        epoch - optim.stage2_start,
        optim.stage2_lr,
        optim.stage2_peak_lr,
        optim.warmup_epochs,
        optim.epochs - optim.stage2_start,
    )
