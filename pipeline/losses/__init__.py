"""SHIKE losses: per-expert CE / balanced softmax, DKT, mutual distillation, per-stage objective.

Expert logits are passed stacked as (M, B, C); see ``classification`` for the conventions and
``distill`` for the paper-notation → code map. Ray- and MLflow-free.
"""

from pipeline.losses.classification import (
    adjusted_ce_loss,
    balanced_softmax_loss,
    ce_loss,
    log_prior,
    logit_adjustment,
)
from pipeline.losses.distill import dkt_loss, dkt_teacher, mutual_distillation_loss
from pipeline.losses.objective import PART_KEYS, LossTerms, Objective, build_objective

__all__ = [
    "PART_KEYS",
    "LossTerms",
    "Objective",
    "adjusted_ce_loss",
    "balanced_softmax_loss",
    "build_objective",
    "ce_loss",
    "dkt_loss",
    "dkt_teacher",
    "log_prior",
    "logit_adjustment",
    "mutual_distillation_loss",
]
