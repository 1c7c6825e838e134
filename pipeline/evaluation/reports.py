"""Evaluation results for people: the report of one evaluation, its text table, the per-class
table (rows and CSV).

Ray-free and MLflow-free. `tracking.RunLogger.log_evaluation` logs the same per-class CSV as
`jobs/evaluate.py --output` writes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.data.longtail import FEW_MAX_EXCLUSIVE, MANY_MIN_EXCLUSIVE, lt_groups
from pipeline.evaluation.metrics import EvalCounts

if TYPE_CHECKING:
    from pipeline.data.manifest import Manifest


@dataclass
class EvaluationReport:
    """One model evaluated on one split of one prepared dataset."""

    model_uri: str  # as given
    model_name: str | None  # registered model (None: an unregistered runs:/ model)
    version: str | None
    source_run_id: str | None  # the training run the model came from
    split: str
    data_uri: str
    dataset: str
    manifest_hash: str
    class_names: list[str]
    class_counts: list[int]  # training images per class (many/medium/few groups)
    results: dict[str, Any]  # EvalCounts.compute(class_counts=...)
    rows: list[dict[str, Any]]  # per-class table (see per_class_rows)
    counts: EvalCounts = field(repr=False)
    manifest: Manifest = field(repr=False)

    @property
    def accuracy(self) -> float:
        return float(self.results["acc"])

    @property
    def label(self) -> str:
        """`shike-x v3`, or the URI for an unregistered model."""
        if self.model_name and self.version:
            return f"{self.model_name} v{self.version}"
        return self.model_uri


# ---- per-class table -------------------------------------------------------------------------

PER_CLASS_COLUMNS = (
    "class_id",
    "class_name",
    "train_images",
    "group",
    "eval_samples",  # only when the evaluation counts are known
    "correct",  # only when the evaluation counts are known
    "accuracy",
)


def per_class_rows(
    per_class_acc: Sequence[float],
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    counts: EvalCounts | None = None,
) -> list[dict[str, Any]]:
    """One row per class, with the keys of `PER_CLASS_COLUMNS` (`eval_samples` and `correct`
    only when `counts` is given). The class name is the class id when no names are given;
    accuracy is NaN for a class without evaluated samples."""
    group_of = {c: g for g, ids in lt_groups(list(class_counts)).items() for c in ids}
    totals = counts.class_total.cpu().tolist() if counts is not None else None
    hits = counts.class_top1.cpu().tolist() if counts is not None else None
    rows = []
    for c, acc in enumerate(per_class_acc):
        row: dict[str, Any] = {
            "class_id": c,
            "class_name": str(class_names[c]) if class_names is not None else str(c),
            "train_images": int(class_counts[c]),
            "group": group_of[c],
        }
        if totals is not None and hits is not None:
            row["eval_samples"] = int(totals[c])
            row["correct"] = int(hits[c])
        row["accuracy"] = float(acc)
        rows.append(row)
    return rows


def per_class_csv(rows: Sequence[dict[str, Any]]) -> str:
    """`per_class_rows` as CSV text (accuracy as a fraction; empty when undefined)."""
    columns = [c for c in PER_CLASS_COLUMNS if rows and c in rows[0]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        acc = row["accuracy"]
        values = [row[k] for k in columns[:-1]]
        writer.writerow([*values, "" if math.isnan(acc) else f"{acc:.6f}"])
    return buf.getvalue()


# ---- text ------------------------------------------------------------------------------------


def format_percent(value: Any, width: int = 6) -> str:
    """`" 41.25%"` for 0.4125 (the number padded to `width`, for tables; 0: `41.25%`); `n/a`
    for NaN, infinities and non-numbers. The one percent format of consoles and reports."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{100 * number:{width}.2f}%" if math.isfinite(number) else "n/a"


def format_table(report: EvaluationReport) -> str:
    """A small text table: overall (top-1), top-5, many / medium / few, ECE, in percent."""
    r = report.results
    groups = lt_groups(report.class_counts)
    counts = report.counts.class_total.cpu().tolist()

    def n_images(ids: Sequence[int]) -> str:
        return f"{len(ids)} classes, {sum(int(counts[c]) for c in ids)} images"

    many, few = MANY_MIN_EXCLUSIVE, FEW_MAX_EXCLUSIVE
    pct = format_percent
    lines = [
        f"model    {report.label}  ({report.model_uri})",
        f"data     {report.dataset}, split {report.split}: {r['num_samples']} images, "
        f"{len(report.class_names)} classes  ({report.data_uri})",
        "",
        f"{'metric':<10}{'value':>9}   detail",
        f"{'overall':<10}{pct(r['acc']):>9}   top-1",
        f"{'top-5':<10}{pct(r['top5']):>9}",
        f"{'many':<10}{pct(r['acc_many']):>9}   {n_images(groups['many'])} (>{many} train)",
        f"{'medium':<10}{pct(r['acc_medium']):>9}   {n_images(groups['medium'])} "
        f"({few}..{many} train)",
        f"{'few':<10}{pct(r['acc_few']):>9}   {n_images(groups['few'])} (<{few} train)",
        f"{'ECE':<10}{pct(r['ece']):>9}   {report.counts.ece_bins} bins",
    ]
    return "\n".join(lines)
