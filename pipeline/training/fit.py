"""The epoch loop, written once for both drivers (DESIGN.md, "One loop, two drivers").

`fit` runs a `TrainingSession` to the end of its recipe: each turn trains one epoch (the
session switches stage when it is due), evaluates the val split on the `train.eval_every`
cadence and on the last epoch, the test split at the end (and after every epoch from
`train.test_from_epoch`), logs the epoch line with its ETA,
and hands an `EpochEnd` to the driver, which saves or reports the checkpoint when
`checkpoint_due` says so. What differs between drivers is passed in:

- the Ray-free engine (pipeline.training.engine): torch DataLoaders, checkpoints in a local folder;
- the Ray Train worker (pipeline.distributed.worker): Ray Data batches, the DDP-wrapped model,
  `reduce` averaging the epoch's statistics over workers, `ray.train.report` and MLflow
  (`pipeline.tracking.runs.EpochRecorder`).

A run resumed after its last epoch trains nothing: the loop makes one turn with `train=None`
that evaluates and reports the finished model, so a driver always sees a final `EpochEnd`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.evaluation.metrics import SCALAR_RESULTS, EvalCounts
from pipeline.evaluation.reports import format_percent
from pipeline.training.session import Batches, TrainingSession


@dataclass
class Evaluation:
    """One split's results (`EvalCounts.compute`), their counts, and the results after post-hoc
    logit adjustment (val only): during stage 1 these anticipate stage-2 re-training."""

    results: dict[str, Any]
    counts: EvalCounts
    adjusted: dict[str, Any] | None = None


@dataclass
class EpochEnd:
    epoch: int  # epochs completed: the session's next epoch
    stage: int
    train: dict[str, float] | None  # the epoch's statistics; None when nothing was left to train
    val: Evaluation | None
    test: Evaluation | None  # on the final turn (and every turn from train.test_from_epoch)
    final: bool
    checkpoint_due: bool
    loss_parts: tuple[str, ...]  # the objective's loss terms, keys of `train`

    def metrics(self) -> dict[str, float]:
        """The turn's namespaced metrics (DESIGN.md, "Training contract"): train/<part>,
        train/lr, ..., val/<result>, val/acc_la, val/score, test/<result>, epoch, stage."""
        out: dict[str, float] = {"epoch": self.epoch}
        if self.train is not None:
            keys = (*self.loss_parts, "lr", "images_per_s", "input_wait", "input_start_s")
            out.update({f"train/{k}": self.train[k] for k in keys})
            out["stage"] = self.stage
        if self.val is not None:
            out.update(namespaced("val", self.val.results))
            # The sweep score: stage 2 decides SHIKE's accuracy; during stage 1 the post-hoc
            # logit-adjusted accuracy anticipates what balanced-softmax re-training will give.
            out["val/acc_la"] = self.val.adjusted["acc"]
            out["val/score"] = self.val.results["acc"] if self.stage == 2 else out["val/acc_la"]
        if self.test is not None:
            out.update(namespaced("test", self.test.results))
        return out


def namespaced(split: str, results: dict[str, Any]) -> dict[str, float]:
    """`split/<key>` for the scalar results that are defined (NaN: a group without images)."""
    return {
        f"{split}/{k}": float(results[k])
        for k in SCALAR_RESULTS
        if results.get(k) == results.get(k)
    }


def evaluate_split(session: TrainingSession, batches: Batches, adjust: bool) -> Evaluation:
    counts, adjusted = session.evaluate(batches, adjust=adjust)
    train_counts = session.class_counts
    return Evaluation(
        counts.compute(class_counts=train_counts),
        counts,
        adjusted.compute(class_counts=train_counts) if adjusted else None,
    )


def fit(
    session: TrainingSession,
    train_batches: Callable[[int], Batches],
    *,
    val_batches: Batches | None = None,
    test_batches: Batches | None = None,
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochEnd]:
    """Train `session` to its last epoch; returns every turn's `EpochEnd`.

    `train_batches(epoch)` gives an epoch's batches; `reduce` combines a worker's epoch
    statistics with the others' (called on every worker); evaluation runs where the split is
    given (on Ray, rank 0 only).
    """
    train_cfg, epochs = session.cfg.train, session.cfg.optim.epochs
    started, first_epoch = time.perf_counter(), session.epoch
    ends: list[EpochEnd] = []
    while True:
        trained = not session.finished
        train = session.run_epoch(train_batches) if trained else None
        if train is not None and reduce is not None:
            train = reduce(train)
        final = session.finished
        val = test = None
        if val_batches is not None and (final or session.epoch % train_cfg.eval_every == 0):
            val = evaluate_split(session, val_batches, adjust=True)
        test_from = train_cfg.test_from_epoch
        if test_batches is not None and (final or (test_from and session.epoch >= test_from)):
            test = evaluate_split(session, test_batches, adjust=False)
        if train is not None:
            eta = (time.perf_counter() - started) / (session.epoch - first_epoch)
            eta *= epochs - session.epoch
            line_val = val.results if val is not None else None
            line_test = test.results if test is not None and not final else None
            line = format_epoch_line(
                train, epochs, line_val, eta, session.objective.part_names, test=line_test
            )
            log(line)
        if test is not None and final:
            log(format_results("test", test.results))
        end = EpochEnd(
            epoch=session.epoch,
            stage=session.stage,
            train=train,
            val=val,
            test=test,
            final=final,
            checkpoint_due=final or (trained and session.epoch % train_cfg.checkpoint_every == 0),
            loss_parts=session.objective.part_names,
        )
        if on_epoch_end is not None:
            on_epoch_end(end)
        ends.append(end)
        if final:
            log(f"wall time {format_duration(time.perf_counter() - started)}")
            return ends


# ----------------------------------------------------------------------------- the log lines


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_epoch_line(
    stats: dict[str, float],
    epochs: int,
    val: dict[str, Any] | None,
    eta_s: float,
    loss_parts: tuple[str, ...],
    test: dict[str, Any] | None = None,
) -> str:
    """`epoch  3/200 stage 1 | loss 4.1 (ce 2.3 dkt 0.1 md 0.04) | lr ... | val acc ... | ...`:
    the total, then each other loss term the objective reports, named without `loss_`."""
    terms = " ".join(f"{k.removeprefix('loss_')} {stats[k]:.4f}" for k in loss_parts if k != "loss")
    line = (
        f"epoch {int(stats['epoch']) + 1:>3}/{epochs} stage {int(stats['stage'])} | "
        f"loss {stats['loss']:.4f} ({terms}) | lr {stats['lr']:.5f}"
    )
    if val is not None:
        line += f" | val acc {100 * val['acc']:.2f}%"
    if test is not None:
        line += f" | test acc {100 * test['acc']:.2f}%"
    return line + (
        f" | {stats['images_per_s']:.0f} img/s (input wait {100 * stats['input_wait']:.0f}%)"
        f" | eta {format_duration(eta_s)}"
    )


def format_results(split: str, results: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        return format_percent(results.get(key), width=0)

    return (
        f"{split}: top-1 {pct('acc')} | top-5 {pct('top5')} | many {pct('acc_many')} | "
        f"medium {pct('acc_medium')} | few {pct('acc_few')} | ECE {results['ece']:.4f} "
        f"({results['num_samples']} images)"
    )
