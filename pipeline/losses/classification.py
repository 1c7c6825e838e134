"""Per-expert classification losses (SHIKE.md §2.2(a) and §2.3).

Conventions shared by every loss in this package:

* ``logits`` is the stack of expert logits, shape (M, B, C), already scaled (×s for a cosine
  head). A single expert may also be passed as (B, C); it is treated as M = 1.
* ``target`` holds int64 class indices, shape (B,).
* Losses are *summed* over experts and averaged over the batch, as in the released code:
  L = Σ_m mean_b ℓ(z_m, y).
* Everything is computed in float32 (logits are cast with ``.float()``), so the losses are
  stable under autocast / fp16 forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def as_expert_stack(logits: Tensor) -> Tensor:
    """Return ``logits`` as a float32 (M, B, C) tensor; a (B, C) tensor becomes M = 1."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    if logits.dim() != 3:
        raise ValueError(f"expected expert logits of shape (M, B, C), got {tuple(logits.shape)}")
    return logits.float()


def _check_target(target: Tensor, logits: Tensor) -> None:
    if target.dim() != 1 or target.shape[0] != logits.shape[1]:
        raise ValueError(
            f"target must have shape (B,) = ({logits.shape[1]},), got {tuple(target.shape)}"
        )


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """L_CE = Σ_m mean_b [−log softmax(z_m)_y]  (plain softmax cross-entropy per expert)."""
    z = as_expert_stack(logits)
    _check_target(target, z)
    num_experts, batch, num_classes = z.shape
    if batch == 0:
        return z.sum() * 0.0
    # One cross_entropy over the flattened (M·B, C) batch averages over M·B; ×M turns the
    # average over experts into the sum over experts.
    per_pair = F.cross_entropy(
        z.reshape(num_experts * batch, num_classes), target.repeat(num_experts)
    )
    return per_pair * num_experts


def log_prior(class_counts: Tensor | Sequence[int], device: torch.device | None = None) -> Tensor:
    """log n_c as a float32 (C,) tensor.

    Counts are clamped at 1: a class without training images gets the smallest finite prior
    (log 1 = 0) instead of −inf, which would give NaN for τ = 0 and an infinite loss if that
    class ever appeared as a target.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=device)
    if counts.dim() != 1:
        raise ValueError(f"class_counts must be 1-D, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be non-negative")
    return counts.clamp_min(1.0).log()


def logit_adjustment(
    class_counts: Tensor | Sequence[int], tau: float = 1.0, device: torch.device | None = None
) -> Tensor:
    """τ·log n: what balanced softmax adds to the logits in training (SHIKE.md §2.3), and what
    post-hoc logit adjustment subtracts from them at evaluation."""
    return tau * log_prior(class_counts, device=device)


def adjusted_ce_loss(logits: Tensor, target: Tensor, adjustment: Tensor) -> Tensor:
    """L = Σ_m mean_b CE(z_m + adjustment, y), with `adjustment` a (C,) tensor."""
    z = as_expert_stack(logits)
    if adjustment.shape[0] != z.shape[-1]:
        raise ValueError(
            f"class_counts has {adjustment.shape[0]} entries but the logits have "
            f"{z.shape[-1]} classes"
        )
    return ce_loss(z + adjustment.to(z.device), target)


def balanced_softmax_loss(
    logits: Tensor,
    target: Tensor,
    class_counts: Tensor | Sequence[int],
    tau: float = 1.0,
) -> Tensor:
    """Balanced Softmax / logit-adjusted CE: L = Σ_m mean_b CE(z_m + τ·log n, y).

    n is the per-class training-count vector (the stage-2 prior of SHIKE.md §2.3, τ = 1 there).
    At test time nothing is added: the adjustment only shapes training.
    """
    return adjusted_ce_loss(logits, target, logit_adjustment(class_counts, tau))
