"""The per-stage training objective built from ``LossConfig`` (SHIKE.md §2.2(d) and §2.3).

    objective = build_objective(cfg.loss, stage=1, class_counts=counts, scale=30.0)
    terms = objective(logits, target)       # logits: (M, B, C) expert stack
    terms.total.backward()
    log(terms.as_dict())                    # floats; one device sync for all four parts

Stage 1, ``stage1="shike"``:  L₁ = w_ce·L_CE + w_dkt·L_DKT + w_md·L_MD (defaults 1, 10, 1).
Stage 1, ``"ce"`` / ``"balanced_softmax"``: a single classification term (baselines).
Stage 2: ``stage2="balanced_softmax"`` (τ·log n prior) or ``"ce"``; never any distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.config import LossConfig
from pipeline.losses.classification import (
    adjusted_ce_loss,
    as_expert_stack,
    ce_loss,
    logit_adjustment,
)
from pipeline.losses.distill import dkt_loss, mutual_distillation_loss

PART_KEYS = ("loss", "loss_ce", "loss_dkt", "loss_md")


@dataclass(frozen=True)
class LossTerms:
    """What one objective call returns.

    ``total``  — the weighted loss, with its graph, for ``backward()``.
    ``parts``  — detached 0-d float32 tensors on the logits' device, always the four keys
                 ``loss`` (= total), ``loss_ce``, ``loss_dkt``, ``loss_md``. The component entries
                 are the *unweighted* terms (``total = Σ weight·part``); unused terms are 0.
                 ``loss_ce`` is the classification term of the stage, i.e. the balanced-softmax
                 CE when that objective is active. They stay on the device so the caller can
                 accumulate them over an epoch and synchronise once.
    """

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """The parts as Python floats (a single host sync)."""
        keys = list(self.parts)
        values = torch.stack([self.parts[k] for k in keys]).cpu().tolist()
        return dict(zip(keys, values, strict=True))


class Objective:
    """Callable loss of one training stage; see ``build_objective``."""

    def __init__(
        self,
        *,
        stage: int,
        classification: str,
        class_counts: Sequence[int] | Tensor | None,
        tau: float,
        ce_weight: float,
        dkt_weight: float,
        md_weight: float,
        distill: bool,
        scale: float,
        temperature: float,
        teacher_detach: bool,
        target_slot: str,
        hardest_negative: str,
        margin: float,
        kl_reduction: str,
    ) -> None:
        if classification not in ("ce", "balanced_softmax"):
            raise ValueError(f"unknown classification loss {classification!r}")
        if classification == "balanced_softmax" and class_counts is None:
            raise ValueError("balanced_softmax needs the training class counts")
        self.stage = stage
        self.classification = classification
        self.tau = tau
        self.ce_weight = ce_weight
        self.dkt_weight = dkt_weight
        self.md_weight = md_weight
        self.distill = distill
        self.scale = scale
        self.temperature = temperature
        self.teacher_detach = teacher_detach
        self.target_slot = target_slot
        self.hardest_negative = hardest_negative
        self.margin = margin
        self.kl_reduction = kl_reduction
        # τ·log n, moved to the logits' device on first use.
        self._adjustment: Tensor | None = (
            logit_adjustment(class_counts, tau) if classification == "balanced_softmax" else None
        )

    @property
    def part_names(self) -> tuple[str, ...]:
        """The keys of `LossTerms.parts`, in order: what a training loop logs per epoch."""
        return PART_KEYS

    def _classification_loss(self, z: Tensor, target: Tensor) -> Tensor:
        if self._adjustment is None:
            return ce_loss(z, target)
        if self._adjustment.device != z.device:
            self._adjustment = self._adjustment.to(z.device)
        return adjusted_ce_loss(z, target, self._adjustment)  # balanced softmax

    @staticmethod
    def _weighted(weight: float, compute: Callable[[], Tensor]) -> tuple[Tensor | None, Tensor]:
        """(contribution to total or None, detached value). A zero weight is still logged,
        but computed without a graph so it costs no backward work."""
        if weight == 0:
            with torch.no_grad():
                return None, compute().detach()
        value = compute()
        return weight * value, value.detach()

    def __call__(self, logits: Tensor, target: Tensor) -> LossTerms:
        z = as_expert_stack(logits)  # float32 (M, B, C)
        zero = z.new_zeros(())
        contributions: list[Tensor] = []

        ce_term, ce_value = self._weighted(
            self.ce_weight, lambda: self._classification_loss(z, target)
        )
        if ce_term is not None:
            contributions.append(ce_term)

        dkt_value = md_value = zero
        if self.distill and z.shape[0] > 1:  # a single expert has nobody to distil from
            dkt_term, dkt_value = self._weighted(
                self.dkt_weight,
                lambda: dkt_loss(
                    z,
                    target,
                    scale=self.scale,
                    temperature=self.temperature,
                    teacher_detach=self.teacher_detach,
                    target_slot=self.target_slot,  # type: ignore[arg-type]
                    hardest_negative=self.hardest_negative,  # type: ignore[arg-type]
                    margin=self.margin,
                    reduction=self.kl_reduction,  # type: ignore[arg-type]
                ),
            )
            md_term, md_value = self._weighted(
                self.md_weight,
                lambda: mutual_distillation_loss(
                    z,
                    temperature=self.temperature,
                    reduction=self.kl_reduction,  # type: ignore[arg-type]
                ),
            )
            contributions += [t for t in (dkt_term, md_term) if t is not None]

        # All weights zero: still return a graph-connected zero so backward() is valid.
        total = torch.stack(contributions).sum() if contributions else z.sum() * 0.0
        parts = {
            "loss": total.detach(),
            "loss_ce": ce_value,
            "loss_dkt": dkt_value,
            "loss_md": md_value,
        }
        return LossTerms(total=total, parts=parts)

    def __repr__(self) -> str:
        return (
            f"Objective(stage={self.stage}, classification={self.classification!r}, "
            f"distill={self.distill}, weights=(ce={self.ce_weight}, dkt={self.dkt_weight}, "
            f"md={self.md_weight}))"
        )


def build_objective(
    loss_cfg: LossConfig,
    stage: int,
    class_counts: Sequence[int] | Tensor | None,
    scale: float,
) -> Objective:
    """The objective of ``stage`` (1 or 2) as configured by ``loss_cfg``.

    ``class_counts`` are the per-class training counts (the balanced-softmax prior n); they may
    be None only when no balanced-softmax term is used. ``scale`` is the cosine scale s, the −s
    masking constant of DKT.
    """
    options = {
        "class_counts": class_counts,
        "tau": loss_cfg.tau,
        "scale": scale,
        "temperature": loss_cfg.temperature,
        "teacher_detach": loss_cfg.teacher_detach,
        "target_slot": loss_cfg.target_slot,
        "hardest_negative": loss_cfg.hardest_negative,
        "margin": loss_cfg.hardest_negative_margin,
        "kl_reduction": loss_cfg.kl_reduction,
    }
    if stage == 1:
        if loss_cfg.stage1 == "shike":
            return Objective(
                stage=1,
                classification="ce",
                ce_weight=loss_cfg.ce_weight,
                dkt_weight=loss_cfg.dkt_weight,
                md_weight=loss_cfg.md_weight,
                distill=True,
                **options,
            )
        # Baselines ("ce", "balanced_softmax"): the classification term alone, weight 1.
        return Objective(
            stage=1,
            classification=loss_cfg.stage1,
            ce_weight=1.0,
            dkt_weight=0.0,
            md_weight=0.0,
            distill=False,
            **options,
        )
    if stage == 2:
        # Classifier re-training: the stage-2 classification term only, no distillation.
        return Objective(
            stage=2,
            classification=loss_cfg.stage2,
            ce_weight=1.0,
            dkt_weight=0.0,
            md_weight=0.0,
            distill=False,
            **options,
        )
    raise ValueError(f"stage must be 1 or 2, got {stage}")
