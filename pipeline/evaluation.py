"""Evaluate a registered model on a prepared split, log the evaluation, promote a candidate.

What `jobs/evaluate.py` and `jobs/promote.py` run (DESIGN.md "Training contract": the registry
holds `ImageClassifier`s; `candidate` moves on every finished run, `champion` only here):

    report = evaluate_model("models:/shike-cifar10-lt-if100@candidate", "s3://bucket/c10-lt")
    print(format_table(report))
    log_evaluation_run(report, tracking_uri)          # MLflow run + version tag eval_val_acc
    decision = promote("shike-cifar10-lt-if100", "s3://bucket/c10-lt", margin=0.002)

Evaluation counts come from `pipeline.metrics.EvalCounts`. The classifier returns
probabilities; they go into `EvalCounts.update` as max-shifted log-probabilities
(`log p - log max p`, in float64), whose softmax is the same distribution and whose argmax is
kept even where two probabilities are a few ulps apart.

Both paths cut the split into the same batches (rows [k*B, (k+1)*B) in manifest order), count
each batch on its own and sum the per-batch count vectors on the driver in batch order. The
`workers > 1` path only changes *where* the batches run: Ray Data actors
(`ActorPoolStrategy(size=workers)`) each holding the classifier, with one Ray Data row per
evaluation batch, so Ray's own block and batch cuts can never re-cut a batch. The totals are
therefore identical to `workers=1`, bit for bit. That path lives in
`pipeline/distributed/scoring.py`, imported only when it runs.

Promotion rule: the candidate and the champion are evaluated on the same held-out split (val
by default; the test set is allowed with a warning, since choosing models on it leaks it); the
candidate becomes champion when there is no champion yet, or when its top-1 accuracy is at
least the champion's plus `margin`. The decision, both scores, the split and the margin are
written as `promotion.*` tags on both versions; `dry_run` writes nothing at all.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import registry, tracking
from pipeline.data import DataError
from pipeline.data.shards import Manifest, load_split, read_manifest
from pipeline.metrics import EvalCounts, lt_groups

if TYPE_CHECKING:
    from torch import nn

    from pipeline.data.storage import S3Options

EVAL_EXPERIMENT = "shike-evaluations"
DEFAULT_MARGIN = 0.002
ECE_BINS = 15
# Float slack for the promotion comparison: 0.6 >= 0.598 + 0.002 must hold although the
# right-hand side is 0.6000000000000001 in binary floating point.
_COMPARE_EPS = 1e-9

# Tags on the evaluation run (model version it evaluated; the dataset hash is tracking's tag).
TAG_EVAL_MODEL_NAME = "shike.eval.model_name"
TAG_EVAL_MODEL_VERSION = "shike.eval.model_version"
TAG_EVAL_MODEL_URI = "shike.eval.model_uri"
TAG_EVAL_SOURCE_RUN = "shike.eval.source_run_id"
TAG_EVAL_SPLIT = "shike.eval.split"
TAG_EVAL_DATA_URI = "shike.eval.data_uri"

# Tags on model versions.
PROMOTION_PREFIX = "promotion."

Log = Callable[[str], None]


class EvaluationError(ValueError):
    """An evaluation / promotion problem the user can fix, with a one-line message."""


# ---- evaluation ------------------------------------------------------------------------------


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


def per_class_rows(
    results: dict[str, Any],
    counts: EvalCounts,
    class_names: Sequence[str],
    class_counts: Sequence[int],
) -> list[dict[str, Any]]:
    """One row per class: class_id, class_name, group, train_images, eval_samples, correct,
    accuracy (NaN for a class without evaluated samples)."""
    group_of = {c: g for g, ids in lt_groups(list(class_counts)).items() for c in ids}
    totals = counts.class_total.cpu().tolist()
    hits = counts.class_top1.cpu().tolist()
    return [
        {
            "class_id": c,
            "class_name": str(class_names[c]),
            "group": group_of[c],
            "train_images": int(class_counts[c]),
            "eval_samples": int(totals[c]),
            "correct": int(hits[c]),
            "accuracy": float(results["per_class_acc"][c]),
        }
        for c in range(len(class_names))
    ]


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


def batch_ranges(num_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of each evaluation batch, in order."""
    return [(a, min(a + batch_size, num_rows)) for a in range(0, num_rows, batch_size)]


def _sum_in_order(flats: Sequence[torch.Tensor], num_classes: int) -> EvalCounts:
    total = torch.zeros(3 * num_classes + 3 * ECE_BINS, dtype=torch.float64)
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
    workers: int = 1,
    cpus_per_worker: float = 1.0,
) -> EvalCounts:
    """Run `classifier` over uint8 `images` (N, H, W, 3) and count against `labels`.

    `workers=1`: in this process. `workers > 1`: Ray Data actors (see the module docstring);
    the result is identical.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise EvaluationError(f"workers must be >= 1, got {workers}")
    ranges = batch_ranges(len(labels), batch_size)
    if workers == 1:
        classifier.eval()
        flats = [score_batch(classifier, images[a:b], labels[a:b], num_classes) for a, b in ranges]
    else:
        from pipeline.distributed.scoring import ray_batch_counts  # Ray only on this path

        flats = ray_batch_counts(
            classifier, images, labels, num_classes, ranges, workers, cpus_per_worker
        )
    return _sum_in_order(flats, num_classes)


def _describe(model_uri: str, mv: Any) -> str:
    return f"{model_uri} (version {mv.version})" if mv is not None else model_uri


def check_classes(model_label: str, model_names: Sequence[str], manifest: Manifest) -> None:
    """The model must predict the dataset's classes, in the dataset's order."""
    names = [str(n) for n in model_names]
    if len(names) != manifest.num_classes:
        raise EvaluationError(
            f"class count mismatch: model {model_label} predicts {len(names)} classes but "
            f"dataset {manifest.uri} ({manifest.dataset}) has {manifest.num_classes} classes"
        )
    for c, (ours, theirs) in enumerate(zip(names, manifest.class_names, strict=True)):
        if ours != theirs:
            raise EvaluationError(
                f"class names differ: class {c} is {ours!r} in model {model_label} but "
                f"{theirs!r} in dataset {manifest.uri}"
            )


def evaluate_model(
    model_uri: str,
    data_uri: str,
    split: str = "val",
    *,
    tracking_uri: str | None = None,
    batch_size: int = 256,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    s3: S3Options | None = None,
    manifest: Manifest | None = None,
) -> EvaluationReport:
    """Evaluate the model at `model_uri` (`models:/<name>@<alias>`, `models:/<name>/<version>`,
    `runs:/<run_id>/<path>`) on `split` of the prepared dataset at `data_uri`.

    Errors (one line each): RegistryError (unknown model / alias / version), TrackingError
    (unreachable server), DataError (missing manifest, altered shard, unknown split),
    EvaluationError (class mismatch, empty split, bad arguments).
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise EvaluationError(f"workers must be >= 1, got {workers}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_server(uri)

    # The version first (cheap, clear errors), then the dataset, then the weights.
    mv = None
    try:
        mv = registry.resolve_model_version(model_uri, tracking_uri=uri)
    except registry.RegistryError:
        if not model_uri.startswith("runs:/"):
            raise
        # An unregistered model logged in a run: load_classifier says whether it exists.
    if manifest is None:
        manifest = read_manifest(data_uri, s3)
    if split not in manifest.splits:
        raise DataError(
            f"dataset {manifest.uri} has no split '{split}' (has {', '.join(manifest.splits)})"
        )
    if manifest.splits[split].num_rows == 0:
        raise EvaluationError(f"split '{split}' of dataset {manifest.uri} has no images")

    # Load exactly the resolved version (an alias could move between lookup and load).
    load_uri = model_uri
    if mv is not None and not model_uri.startswith("runs:/"):
        load_uri = f"models:/{mv.name}/{mv.version}"
    classifier = registry.load_classifier(load_uri, tracking_uri=uri)
    names = getattr(classifier, "class_names", None)
    if names is None:
        names = registry.class_names_of(load_uri, tracking_uri=uri)
    check_classes(_describe(model_uri, mv), names, manifest)

    data = load_split(manifest, split)
    counts = count_predictions(
        classifier,
        data.images,
        data.labels,
        manifest.num_classes,
        batch_size=batch_size,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
    )
    results = counts.compute(class_counts=manifest.class_counts)
    source_run = None
    if mv is not None:
        source_run = mv.run_id or (mv.tags or {}).get(registry.TAG_RUN_ID)
    elif model_uri.startswith("runs:/"):
        source_run = model_uri[len("runs:/") :].split("/", 1)[0]
    return EvaluationReport(
        model_uri=model_uri,
        model_name=mv.name if mv is not None else None,
        version=str(mv.version) if mv is not None else None,
        source_run_id=source_run,
        split=split,
        data_uri=str(data_uri),
        dataset=manifest.dataset,
        manifest_hash=tracking.manifest_hash(manifest),
        class_names=list(manifest.class_names),
        class_counts=[int(c) for c in manifest.class_counts],
        results=results,
        rows=per_class_rows(results, counts, manifest.class_names, manifest.class_counts),
        counts=counts,
        manifest=manifest,
    )


# ---- output ----------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(number) else f"{100 * number:6.2f}%"


def format_table(report: EvaluationReport) -> str:
    """A small text table: overall (top-1), top-5, many / medium / few, ECE, in percent."""
    r = report.results
    groups = lt_groups(report.class_counts)
    counts = report.counts.class_total.cpu().tolist()

    def n_images(ids: Sequence[int]) -> str:
        return f"{len(ids)} classes, {sum(int(counts[c]) for c in ids)} images"

    lines = [
        f"model    {report.label}  ({report.model_uri})",
        f"data     {report.dataset}, split {report.split}: {r['num_samples']} images, "
        f"{len(report.class_names)} classes  ({report.data_uri})",
        "",
        f"{'metric':<10}{'value':>9}   detail",
        f"{'overall':<10}{_pct(r['acc']):>9}   top-1",
        f"{'top-5':<10}{_pct(r['top5']):>9}",
        f"{'many':<10}{_pct(r['acc_many']):>9}   {n_images(groups['many'])} (>100 train)",
        f"{'medium':<10}{_pct(r['acc_medium']):>9}   {n_images(groups['medium'])} (20..100 train)",
        f"{'few':<10}{_pct(r['acc_few']):>9}   {n_images(groups['few'])} (<20 train)",
        f"{'ECE':<10}{_pct(r['ece']):>9}   {ECE_BINS} bins",
    ]
    return "\n".join(lines)


PER_CLASS_COLUMNS = (
    "class_id",
    "class_name",
    "group",
    "train_images",
    "eval_samples",
    "correct",
    "accuracy",
)


def per_class_csv(report: EvaluationReport) -> str:
    """The per-class table as CSV text (accuracy as a fraction; empty when undefined)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for row in report.rows:
        acc = row["accuracy"]
        values = [row[k] for k in PER_CLASS_COLUMNS[:-1]]
        writer.writerow([*values, "" if math.isnan(acc) else f"{acc:.6f}"])
    return buf.getvalue()


# ---- logging ---------------------------------------------------------------------------------


def evaluation_run_name(report: EvaluationReport) -> str:
    """`eval-<model>-v<version>-<split>-<manifest hash>`: re-evaluating the same model on the
    same data reuses the run."""
    if report.model_name and report.version:
        who = f"{report.model_name}-v{report.version}"
    else:
        who = f"run-{report.source_run_id or 'unknown'}"
    return f"eval-{who}-{report.split}-{report.manifest_hash}"


def log_evaluation_run(
    report: EvaluationReport,
    tracking_uri: str | None = None,
    experiment: str = EVAL_EXPERIMENT,
) -> str:
    """Log `report` as an MLflow run of `experiment` (one run per model version, split and
    dataset: re-running reuses it) and tag the model version `eval_<split>_acc`. Returns the
    run id."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tags = {
        TAG_EVAL_MODEL_NAME: report.model_name,
        TAG_EVAL_MODEL_VERSION: report.version,
        TAG_EVAL_MODEL_URI: report.model_uri,
        TAG_EVAL_SOURCE_RUN: report.source_run_id,
        TAG_EVAL_SPLIT: report.split,
        TAG_EVAL_DATA_URI: report.data_uri,
        "shike.dataset": report.dataset,
    }
    run_id = tracking.start_or_resume_run(uri, experiment, evaluation_run_name(report), tags)
    log = tracking.RunLogger(uri, run_id)
    try:
        log.log_manifest(report.manifest)
        log.log_evaluation(
            report.split,
            report.results,
            report.class_counts,
            report.class_names,
            counts=report.counts,
        )
    except BaseException:
        log.finish("FAILED")
        raise
    log.finish("FINISHED")
    if report.model_name and report.version:
        registry.set_version_tags(
            report.model_name,
            report.version,
            {
                f"eval_{report.split}_acc": f"{report.accuracy:.6g}",
                f"eval_{report.split}_run_id": run_id,
            },
            tracking_uri=uri,
        )
    return run_id


# ---- promotion -------------------------------------------------------------------------------


@dataclass
class PromotionDecision:
    model_name: str
    action: str  # "promote" | "keep" | "first-promotion" | "already-champion"
    candidate_version: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    split: str
    margin: float
    reason: str
    dry_run: bool = False
    manifest_hash: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # what was (or would be) written

    @property
    def moves_champion(self) -> bool:
        return self.action in ("promote", "first-promotion")


def split_warning(split: str) -> str | None:
    """A warning for model selection on the test split (None for other splits)."""
    if split == "test":
        return (
            "promoting on the test split: model selection then looks at the test set; "
            "use the held-out val split (the default) for promotion"
        )
    return None


def decide(candidate_score: float, champion_score: float | None, margin: float) -> tuple[str, str]:
    """(action, reason) of the promotion rule, for two different versions."""
    if champion_score is None:
        return "first-promotion", "there is no champion yet"
    needed = champion_score + margin
    if candidate_score >= needed - _COMPARE_EPS:
        return "promote", (
            f"candidate {100 * candidate_score:.2f}% >= champion {100 * champion_score:.2f}% "
            f"+ margin {100 * margin:.2f}%"
        )
    return "keep", (
        f"candidate {100 * candidate_score:.2f}% < champion {100 * champion_score:.2f}% "
        f"+ margin {100 * margin:.2f}%"
    )


def promote(
    model_name: str,
    data_uri: str,
    *,
    split: str = "val",
    margin: float = DEFAULT_MARGIN,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    batch_size: int = 256,
    workers: int = 1,
    s3: S3Options | None = None,
    log: Log | None = None,
) -> PromotionDecision:
    """Evaluate `candidate` (and `champion`, if set) of `model_name` on `split` and move
    `champion` to the candidate when the rule says so (see the module docstring).

    Unless `dry_run`, the decision is recorded as `promotion.*` tags on both versions (not when
    the candidate already is the champion: nothing changes then).
    """
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise EvaluationError(f"margin must be a finite number >= 0, got {margin!r}")
    say = log or (lambda _msg: None)
    warning = split_warning(split)
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_server(uri)

    candidate = registry.get_alias_version(model_name, registry.CANDIDATE, tracking_uri=uri)
    if candidate is None:
        raise registry.RegistryError(
            f"model '{model_name}' has no '{registry.CANDIDATE}' alias: nothing to promote "
            f"(a finished training run sets it)"
        )
    champion = registry.get_alias_version(model_name, registry.CHAMPION, tracking_uri=uri)
    manifest = read_manifest(data_uri, s3)

    def evaluate(version: Any, role: str) -> EvaluationReport:
        say(f"evaluating {role} {model_name} v{version.version} on {split} ...")
        return evaluate_model(
            f"models:/{model_name}/{version.version}",
            data_uri,
            split,
            tracking_uri=uri,
            batch_size=batch_size,
            workers=workers,
            s3=s3,
            manifest=manifest,
        )

    cand_report = evaluate(candidate, "candidate")
    cand_score = cand_report.accuracy
    if champion is not None and str(champion.version) == str(candidate.version):
        return PromotionDecision(
            model_name=model_name,
            action="already-champion",
            candidate_version=str(candidate.version),
            candidate_score=cand_score,
            champion_version=str(champion.version),
            champion_score=cand_score,
            split=split,
            margin=float(margin),
            reason=f"version {candidate.version} is both candidate and champion; nothing to do",
            dry_run=dry_run,
            manifest_hash=cand_report.manifest_hash,
        )
    champ_score = evaluate(champion, "champion").accuracy if champion is not None else None
    action, reason = decide(cand_score, champ_score, float(margin))
    decision = PromotionDecision(
        model_name=model_name,
        action=action,
        candidate_version=str(candidate.version),
        candidate_score=cand_score,
        champion_version=str(champion.version) if champion is not None else None,
        champion_score=champ_score,
        split=split,
        margin=float(margin),
        reason=reason,
        dry_run=dry_run,
        manifest_hash=cand_report.manifest_hash,
    )
    champ_text = "none" if champ_score is None else f"{champ_score:.6g}"
    decision.tags = {
        f"{PROMOTION_PREFIX}decision": action,
        f"{PROMOTION_PREFIX}candidate_version": decision.candidate_version,
        f"{PROMOTION_PREFIX}candidate_score": f"{cand_score:.6g}",
        f"{PROMOTION_PREFIX}champion_version": decision.champion_version or "none",
        f"{PROMOTION_PREFIX}champion_score": champ_text,
        f"{PROMOTION_PREFIX}split": split,
        f"{PROMOTION_PREFIX}margin": f"{float(margin):g}",
        f"{PROMOTION_PREFIX}dataset_manifest_hash": cand_report.manifest_hash,
        f"{PROMOTION_PREFIX}timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if dry_run:
        return decision
    # Another promotion may have moved `champion` while we evaluated: then this comparison is
    # stale, and nothing is written.
    now = registry.get_alias_version(model_name, registry.CHAMPION, tracking_uri=uri)
    if (now.version if now else None) != (champion.version if champion else None):
        raise EvaluationError(
            f"the '{registry.CHAMPION}' alias of '{model_name}' moved during the evaluation "
            f"(now {'v' + str(now.version) if now else 'unset'}); run the promotion again"
        )
    # The alias is the source of truth: move it first, then record why on both versions.
    if decision.moves_champion:
        registry.set_alias(model_name, registry.CHAMPION, candidate.version, tracking_uri=uri)
    roles = [(decision.candidate_version, "candidate")]
    if decision.champion_version is not None:
        roles.append((decision.champion_version, "champion"))
    for version, role in roles:
        registry.set_version_tags(
            model_name,
            version,
            {**decision.tags, f"{PROMOTION_PREFIX}role": role},
            tracking_uri=uri,
        )
    return decision


def format_decision(decision: PromotionDecision) -> str:
    """Both scores and the decision, a few lines."""

    def score(value: float | None) -> str:
        return "n/a" if value is None else _pct(value).strip()

    champion = (
        f"v{decision.champion_version}" if decision.champion_version is not None else "(none)"
    )
    lines = [
        f"model      {decision.model_name}  (split {decision.split}, margin "
        f"{100 * decision.margin:.2f}%)",
        f"candidate  v{decision.candidate_version}  top-1 {score(decision.candidate_score)}",
        f"champion   {champion}  top-1 {score(decision.champion_score)}",
        f"decision   {decision.action}: {decision.reason}",
    ]
    if decision.dry_run:
        lines.append("dry run    nothing was changed in the registry")
    elif decision.moves_champion:
        lines.append(
            f"champion   now v{decision.candidate_version} "
            f"(models:/{decision.model_name}@{registry.CHAMPION})"
        )
    return "\n".join(lines)


__all__ = [
    "EVAL_EXPERIMENT",
    "EvaluationError",
    "EvaluationReport",
    "PromotionDecision",
    "count_predictions",
    "decide",
    "evaluate_model",
    "evaluation_run_name",
    "format_decision",
    "format_table",
    "log_evaluation_run",
    "per_class_csv",
    "promote",
    "split_warning",
]
