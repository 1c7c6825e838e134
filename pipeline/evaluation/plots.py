"""Evaluation figures: per-class accuracy against training-set size, reliability diagram.

Pure matplotlib, no MLflow: `pipeline/tracking/runs.py` logs what these return. Figures are built with the
object-oriented API (`matplotlib.figure.Figure`) rather than `pyplot`, so nothing here touches
matplotlib's global backend or figure registry: it is safe in headless workers and threads, and
`fig.savefig(...)` renders through the Agg canvas. Callers need not close anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline.data.longtail import FEW_MAX_EXCLUSIVE, MANY_MIN_EXCLUSIVE, lt_group

# Band colours for the long-tail groups (few / medium / many training images).
_BANDS = (
    ("few", "#d62728"),
    ("medium", "#ff7f0e"),
    ("many", "#2ca02c"),
)


def per_class_accuracy_figure(
    per_class_acc: Sequence[float],
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Scatter of each class's accuracy against its number of *training* images (log x axis).

    The background is split into the few (< 20), medium (20..100) and many (> 100) bands, and
    each band's mean per-class accuracy is drawn as a horizontal segment. Classes with NaN
    accuracy (no evaluation samples) are left out. With <= 20 classes the points are labelled.
    """
    acc = np.asarray(per_class_acc, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    if acc.shape != counts.shape:
        raise ValueError(f"per_class_acc has {acc.size} entries but class_counts has {counts.size}")
    # Log axis: a class with zero training images is drawn at 0.5.
    xs = np.maximum(counts, 0.5)
    lo = float(xs.min()) / 1.5 if xs.size else 1.0
    hi = float(xs.max()) * 1.5 if xs.size else 1000.0
    lo, hi = min(lo, 5.0), max(hi, 200.0)  # always show all three bands

    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    edges = {
        "few": (lo, FEW_MAX_EXCLUSIVE),
        "medium": (FEW_MAX_EXCLUSIVE, MANY_MIN_EXCLUSIVE + 0.5),
        "many": (MANY_MIN_EXCLUSIVE + 0.5, hi),
    }
    valid = ~np.isnan(acc)
    groups = np.array([lt_group(c) for c in counts])
    for name, colour in _BANDS:
        x0, x1 = edges[name]
        ax.axvspan(x0, x1, color=colour, alpha=0.08, lw=0)
        mask = valid & (groups == name)
        n = int(mask.sum())
        label = f"{name} ({n} classes"
        if n:
            mean = float(acc[mask].mean())
            ax.hlines(mean, x0, x1, colors=colour, linestyles="--", lw=1.2)
            label += f", mean {mean:.3f}"
        ax.scatter(xs[mask], acc[mask], s=18, color=colour, label=label + ")", zorder=3)
    if class_names is not None and len(class_names) == acc.size and acc.size <= 20:
        for x, y, name in zip(xs[valid], acc[valid], np.asarray(class_names)[valid], strict=True):
            ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Per-class accuracy vs. training-set size")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def reliability_bins(
    bin_counts: Sequence[float], bin_correct: Sequence[float], bin_confidence_sum: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, mean confidence, accuracy) per bin from summed counts; NaN for empty bins."""
    n = np.asarray(bin_counts, dtype=np.float64)
    correct = np.asarray(bin_correct, dtype=np.float64)
    conf = np.asarray(bin_confidence_sum, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.where(n > 0, conf / n, np.nan), np.where(n > 0, correct / n, np.nan)


def reliability_figure(
    bin_counts: Sequence[float],
    bin_conf: Sequence[float],
    bin_acc: Sequence[float],
    ece: float | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability diagram over K equal-width confidence bins ((b/K, (b+1)/K], as in metrics.py).

    Top: accuracy per bin (bars) against the diagonal of perfect calibration, the gap to each
    bin's mean confidence hatched, the mean confidence marked. Bottom: share of samples per
    bin. Empty bins are left blank.
    """
    n = np.asarray(bin_counts, dtype=np.float64)
    conf = np.asarray(bin_conf, dtype=np.float64)
    acc = np.asarray(bin_acc, dtype=np.float64)
    if not n.shape == conf.shape == acc.shape or n.ndim != 1 or n.size == 0:
        raise ValueError(
            f"bin_counts, bin_conf and bin_acc must be 1-D of equal length, got "
            f"{n.shape}, {conf.shape}, {acc.shape}"
        )
    k = n.size
    width = 1.0 / k
    centres = (np.arange(k) + 0.5) * width
    filled = n > 0

    fig = Figure(figsize=(5.0, 5.6), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    top.bar(
        centres[filled],
        acc[filled],
        width=width,
        color="#1f77b4",
        edgecolor="black",
        lw=0.6,
        label="accuracy",
    )
    gap_lo = np.minimum(acc, conf)[filled]
    gap_hi = np.maximum(acc, conf)[filled]
    top.bar(
        centres[filled],
        gap_hi - gap_lo,
        bottom=gap_lo,
        width=width,
        facecolor="none",
        edgecolor="#d62728",
        hatch="//",
        lw=0.8,
        label="gap to confidence",
    )
    top.scatter(centres[filled], conf[filled], marker="_", s=120, color="black", lw=1.5,
                zorder=4, label="mean confidence")  # fmt: skip
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    heading = title or "Reliability diagram"
    if ece is not None and not math.isnan(ece):
        heading += f" (ECE {ece:.4f})"
    top.set_title(heading)
    top.legend(loc="upper left", fontsize=8)
    top.grid(True, alpha=0.3)

    total = n.sum()
    share = n / total if total > 0 else n
    bottom.bar(centres, share, width=width, color="#7f7f7f", edgecolor="black", lw=0.6)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("share of samples")
    bottom.grid(True, alpha=0.3)
    return fig
