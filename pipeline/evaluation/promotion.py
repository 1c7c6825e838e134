"""The promotion rule: move `champion` to the `candidate` when it is better on the same
held-out split.

    decision = promote("shike-cifar10-lt-if100", "s3://bucket/c10-lt", margin=0.002)
    print(format_decision(decision))

The candidate and the champion are evaluated (`evaluation.evaluate_model`) on the same
held-out split (val by default; the test set is allowed with a warning, since choosing models
on it leaks it); the candidate becomes champion when there is no champion yet, or when its
top-1 accuracy is at least the champion's plus `margin`. The decision, both scores, the split
and the margin are written as `promotion.*` tags on both versions; `dry_run` writes nothing at
all. This is the only code that moves `champion` (DESIGN.md "Training contract").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.data.manifest import read_manifest
from pipeline.evaluation.evaluate import evaluate_model
from pipeline.evaluation.reports import EvaluationReport, format_percent
from pipeline.evaluation.scoring import EvaluationError
from pipeline.tracking.store import check_tracking_server, resolve_tracking_uri
from pipeline.tracking.versions import (
    CANDIDATE,
    CHAMPION,
    RegistryError,
    get_alias_version,
    set_alias,
    set_version_tags,
)

if TYPE_CHECKING:
    from pipeline.storage import S3Options

DEFAULT_MARGIN = 0.002
# Float slack for the promotion comparison: 0.6 >= 0.598 + 0.002 must hold although the
# right-hand side is 0.6000000000000001 in binary floating point.
_COMPARE_EPS = 1e-9

# Tags on model versions.
PROMOTION_PREFIX = "promotion."

Log = Callable[[str], None]


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
    _check_margin(margin)
    say = log or (lambda _msg: None)
    warning = split_warning(split)
    if warning:
        # Here, not in a helper: stacklevel=2 points the warning at promote's caller.
        warnings.warn(warning, UserWarning, stacklevel=2)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)

    candidate, champion = _current_aliases(model_name, uri)
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
    if champion is not None and str(champion.version) == str(candidate.version):
        return _already_champion(model_name, candidate, cand_report, split, margin, dry_run)
    champ_score = evaluate(champion, "champion").accuracy if champion is not None else None
    decision = _decide_promotion(
        model_name, candidate, champion, cand_report, champ_score, split, margin, dry_run
    )
    if dry_run:
        return decision
    _check_champion_unmoved(model_name, champion, uri)
    _apply_decision(decision, candidate, uri)
    return decision


def _check_margin(margin: float) -> None:
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise EvaluationError(f"margin must be a finite number >= 0, got {margin!r}")


def _current_aliases(model_name: str, uri: str) -> tuple[Any, Any]:
    """The versions `candidate` and `champion` point at (champion: None when unset)."""
    candidate = get_alias_version(model_name, CANDIDATE, tracking_uri=uri)
    if candidate is None:
        raise RegistryError(
            f"model '{model_name}' has no '{CANDIDATE}' alias: nothing to promote "
            f"(a finished training run sets it)"
        )
    champion = get_alias_version(model_name, CHAMPION, tracking_uri=uri)
    return candidate, champion


def _already_champion(
    model_name: str,
    candidate: Any,
    cand_report: EvaluationReport,
    split: str,
    margin: float,
    dry_run: bool,
) -> PromotionDecision:
    """The decision when one version is both candidate and champion: nothing to compare or
    write, so it carries no tags."""
    cand_score = cand_report.accuracy
    return PromotionDecision(
        model_name=model_name,
        action="already-champion",
        candidate_version=str(candidate.version),
        candidate_score=cand_score,
        champion_version=str(candidate.version),
        champion_score=cand_score,
        split=split,
        margin=float(margin),
        reason=f"version {candidate.version} is both candidate and champion; nothing to do",
        dry_run=dry_run,
        manifest_hash=cand_report.manifest_hash,
    )


def _decide_promotion(
    model_name: str,
    candidate: Any,
    champion: Any,
    cand_report: EvaluationReport,
    champ_score: float | None,
    split: str,
    margin: float,
    dry_run: bool,
) -> PromotionDecision:
    """The rule's decision on two different versions, with the tags that record it."""
    cand_score = cand_report.accuracy
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
    decision.tags = _decision_tags(decision)
    return decision


def _decision_tags(decision: PromotionDecision) -> dict[str, str]:
    """The `promotion.*` tags written on both versions (the role is added per version)."""
    champ_score = decision.champion_score
    champ_text = "none" if champ_score is None else f"{champ_score:.6g}"
    return {
        f"{PROMOTION_PREFIX}decision": decision.action,
        f"{PROMOTION_PREFIX}candidate_version": decision.candidate_version,
        f"{PROMOTION_PREFIX}candidate_score": f"{decision.candidate_score:.6g}",
        f"{PROMOTION_PREFIX}champion_version": decision.champion_version or "none",
        f"{PROMOTION_PREFIX}champion_score": champ_text,
        f"{PROMOTION_PREFIX}split": decision.split,
        f"{PROMOTION_PREFIX}margin": f"{decision.margin:g}",
        f"{PROMOTION_PREFIX}dataset_manifest_hash": decision.manifest_hash,
        f"{PROMOTION_PREFIX}timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _check_champion_unmoved(model_name: str, champion: Any, uri: str) -> None:
    # Another promotion may have moved `champion` while we evaluated: then this comparison is
    # stale, and nothing is written.
    now = get_alias_version(model_name, CHAMPION, tracking_uri=uri)
    if (now.version if now else None) != (champion.version if champion else None):
        raise EvaluationError(
            f"the '{CHAMPION}' alias of '{model_name}' moved during the evaluation "
            f"(now {'v' + str(now.version) if now else 'unset'}); run the promotion again"
        )


def _apply_decision(decision: PromotionDecision, candidate: Any, uri: str) -> None:
    """Move `champion` when the decision says so, and tag both versions with the decision."""
    # The alias is the source of truth: move it first, then record why on both versions.
    if decision.moves_champion:
        set_alias(decision.model_name, CHAMPION, candidate.version, tracking_uri=uri)
    roles = [(decision.candidate_version, "candidate")]
    if decision.champion_version is not None:
        roles.append((decision.champion_version, "champion"))
    for version, role in roles:
        set_version_tags(
            decision.model_name,
            version,
            {**decision.tags, f"{PROMOTION_PREFIX}role": role},
            tracking_uri=uri,
        )


def format_decision(decision: PromotionDecision) -> str:
    """Both scores and the decision, a few lines."""

    def score(value: float | None) -> str:
        return "n/a" if value is None else format_percent(value).strip()

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
            f"(models:/{decision.model_name}@{CHAMPION})"
        )
    return "\n".join(lines)
