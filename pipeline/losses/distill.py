"""Distillation losses of SHIKE stage 1 (SHIKE.md §2.2(b) DKT and §2.2(c) mutual distillation).

Paper notation → code:

    z_m   expert m's logits              logits[m]          (M, B, C) stack, already ×s
    y     label                          target             (B,) int64
    μ     consensus, mean over experts   mu                 (B, C)
    ν     per-class max over experts     nu                 (B, C)
    h     hardest negative               hard               argmax_{c≠y} μ_c, (B,)
    t     DKT teacher logits             teacher            ν everywhere, μ_h at h, slot y set
    P     teacher distribution           softmax(t / T)
    u_m   student logits of expert m     student            z_m with slot y set
    Q_m   student distribution           softmax(u_m / T)
    s     cosine scale (30)              scale              masking constant −s
    T     distillation temperature       temperature        KL is multiplied by T²

KL reductions (``reduction``):

* ``"mean"`` — PyTorch ``kl_div``'s default and the released code's: the element sum
  Σ_b Σ_c P_bc (log P_bc − log Q_bc) divided by B·C (all elements, not per sample).
* ``"batchmean"`` — the same sum divided by B (per sample), i.e. C × ``"mean"``.

Each per-expert (DKT) or per-pair (MD) KL is reduced this way and the results are summed, so
the code's weights (10 for DKT, 1 for MD) keep their meaning.

Gradient flow (defaults reproduce the code): the DKT teacher is *not* detached, so gradients
reach every expert through μ and the max-holding expert through ν; in MD both members of a pair
get gradients. Only the choice of h (an argmax) is non-differentiable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.classification import as_expert_stack

TargetSlot = Literal["code", "neg_scale", "neg_inf"]
HardestNegative = Literal["mean", "min", "mean_margin"]
KLReduction = Literal["mean", "batchmean"]

_TARGET_SLOTS = ("code", "neg_scale", "neg_inf")
_HARDEST_NEGATIVES = ("mean", "min", "mean_margin")
_REDUCTIONS = ("mean", "batchmean")


def _reduce_kl(kl_sum: Tensor, batch: int, num_classes: int, reduction: str) -> Tensor:
    """Turn an element sum of P·(log P − log Q) into the requested reduction (see module doc)."""
    if reduction == "mean":
        return kl_sum / (batch * num_classes)
    if reduction == "batchmean":
        return kl_sum / batch
    raise ValueError(f"unknown KL reduction {reduction!r}; expected one of {_REDUCTIONS}")


def dkt_teacher(
    logits: Tensor,
    target: Tensor,
    *,
    hardest_negative: HardestNegative = "mean",
    margin: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """DKT teacher logits *before* the target slot is set, and the hardest negative h.

    t_c = ν_c for every c ≠ h and t_h = μ_h ("mean"), min_m z_m,h ("min") or μ_h − margin
    ("mean_margin"). The returned teacher still carries ν_y in the target slot; the caller
    decides what goes there (``target_slot``). Returns (teacher (B, C), h (B,)).
    """
    z = as_expert_stack(logits)
    num_classes = z.shape[-1]
    is_target = F.one_hot(target, num_classes).bool()  # (B, C), True at y

    mu = z.mean(dim=0)  # μ: consensus of the experts
    nu = z.max(dim=0).values  # ν: per-class max; its gradient goes to the max-holding expert

    # h = argmax_{c≠y} μ_c. The code writes −s into μ_y before the argmax; −inf is used here so
    # that the target can never be chosen, whatever the logits' range (identical whenever some
    # non-target μ_c > −s, which a cosine head guarantees unless every negative sits exactly at
    # −s). Ties go to the lowest class index (torch.argmax returns the first maximum).
    hard = mu.detach().masked_fill(is_target, float("-inf")).argmax(dim=-1)
    is_hard = F.one_hot(hard, num_classes).bool()

    if hardest_negative == "mean":
        hard_value = mu
    elif hardest_negative == "min":
        hard_value = z.min(dim=0).values
    elif hardest_negative == "mean_margin":
        hard_value = mu - margin
    else:
        raise ValueError(
            f"unknown hardest_negative {hardest_negative!r}; expected one of {_HARDEST_NEGATIVES}"
        )
    # torch.where keeps both branches differentiable: μ (or min) at h, ν elsewhere.
    teacher = torch.where(is_hard, hard_value, nu)
    return teacher, hard


def dkt_loss(
    logits: Tensor,
    target: Tensor,
    *,
    scale: float = 30.0,
    temperature: float = 1.0,
    teacher_detach: bool = False,
    target_slot: TargetSlot = "code",
    hardest_negative: HardestNegative = "mean",
    margin: float = 0.0,
    reduction: KLReduction = "mean",
) -> Tensor:
    """Dynamic Knowledge Transfer: L_DKT = T² · Σ_m KL(P ‖ Q_m)  (SHIKE.md §2.2(b)).

    Target slot y of (teacher t, student u_m):

    * ``"code"``      — (0, −s): the released code's asymmetric quirk (the default).
    * ``"neg_scale"`` — (−s, −s).
    * ``"neg_inf"``   — both masked: column y is dropped from both softmaxes and from the KL
      sum, so P and Q_m are distributions over the C − 1 negatives and no 0·log 0 / ∞ − ∞ terms
      arise. ``"mean"`` still divides by B·C (the dropped elements count as zero), so the scale
      matches the other modes.

    ``margin`` is used only with ``hardest_negative="mean_margin"``.
    """
    if target_slot not in _TARGET_SLOTS:
        raise ValueError(f"unknown target_slot {target_slot!r}; expected one of {_TARGET_SLOTS}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = as_expert_stack(logits)
    num_experts, batch, num_classes = z.shape
    if batch == 0:
        return z.sum() * 0.0

    teacher, _ = dkt_teacher(z, target, hardest_negative=hardest_negative, margin=margin)
    if teacher_detach:
        teacher = teacher.detach()

    if target_slot == "neg_inf":
        # Keep only the C − 1 negative columns of every row, in order: column j of the kept
        # block is class j, or j + 1 from the target on (a gather, so shapes stay static).
        cols = torch.arange(num_classes - 1, device=z.device)
        keep = cols + (cols >= target[:, None])  # (B, C − 1)
        teacher = teacher.gather(1, keep)
        student = z.gather(2, keep.expand(num_experts, batch, num_classes - 1))
    else:
        is_target = F.one_hot(target, num_classes).bool()  # (B, C)
        teacher_fill = 0.0 if target_slot == "code" else -scale
        teacher = teacher.masked_fill(is_target, teacher_fill)  # t_y
        student = z.masked_fill(is_target, -scale)  # u_m,y = −s for every expert m

    log_p = F.log_softmax(teacher / temperature, dim=-1)  # log P, (B, C')
    log_q = F.log_softmax(student / temperature, dim=-1)  # log Q_m, (M, B, C')
    # Σ_m Σ_b Σ_c P (log P − log Q_m); P broadcasts over the expert axis.
    kl_sum = (log_p.exp() * (log_p - log_q)).sum()
    return _reduce_kl(kl_sum, batch, num_classes, reduction) * temperature**2


def mutual_distillation_loss(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: KLReduction = "mean",
) -> Tensor:
    """L_MD = T² · Σ_m Σ_{j≠m} KL(softmax(z_j/T) ‖ softmax(z_m/T))  (SHIKE.md §2.2(c)).

    All M·(M − 1) ordered pairs; teacher j and student m both carry gradients. Zero for M = 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = as_expert_stack(logits)
    num_experts, batch, num_classes = z.shape
    if num_experts < 2 or batch == 0:
        return z.sum() * 0.0

    log_p = F.log_softmax(z / temperature, dim=-1)  # (M, B, C)
    p = log_p.exp()
    # pair_kl[j, m] = Σ_b Σ_c p_j (log p_j − log p_m): teacher j, student m.
    pair_kl = (p.unsqueeze(1) * (log_p.unsqueeze(1) - log_p.unsqueeze(0))).sum(dim=(2, 3))
    # The diagonal (j = m) is exactly 0 in value and gradient (p·(a − a)); masking it by a
    # product rather than boolean indexing keeps the shape static (capturable in a CUDA graph).
    off_diagonal = ~torch.eye(num_experts, dtype=torch.bool, device=z.device)
    kl_sum = (pair_kl * off_diagonal).sum()
    return _reduce_kl(kl_sum, batch, num_classes, reduction) * temperature**2
