"""Losses against hand computations written independently from SHIKE.md §2 (explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.losses import (
    LossTerms,
    balanced_softmax_loss,
    build_objective,
    ce_loss,
    dkt_loss,
    dkt_teacher,
    mutual_distillation_loss,
)

S = 30.0

# M=3 experts, B=2 samples, C=4 classes. In both samples the target has the highest mean logit,
# so the hardest negative must be picked among the other classes.
Z = [
    [[9.0, 5.0, 1.0, -3.0], [2.0, 8.0, -4.0, 6.0]],  # expert 0
    [[7.0, 2.0, 4.0, -1.0], [0.0, 3.0, 1.0, 9.0]],  # expert 1
    [[8.0, 6.0, -2.0, 0.0], [5.0, -1.0, 7.0, 2.0]],  # expert 2
]
Y = [0, 3]
# Sample 0: μ = [8, 13/3, 1, -4/3] -> h = 1; ν = [9, 6, 4, 0].
# Sample 1: μ = [7/3, 10/3, 4/3, 17/3] -> h = 1 (target 3 excluded); ν = [5, 8, 7, 9].


def logits(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(Z, dtype=torch.float32, requires_grad=requires_grad)


def target() -> torch.Tensor:
    return torch.tensor(Y, dtype=torch.int64)


# ---------------------------------------------------------------- independent references


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_teacher_student(z, y, b, m, s, slot, hn, margin):
    """Teacher and student logit lists for sample b, expert m (SHIKE.md §2.2(b))."""
    num_experts, num_classes = len(z), len(z[0][0])
    mu = [sum(z[k][b][c] for k in range(num_experts)) / num_experts for c in range(num_classes)]
    nu = [max(z[k][b][c] for k in range(num_experts)) for c in range(num_classes)]
    h, best = None, -math.inf
    for c in range(num_classes):
        if c != y[b] and mu[c] > best:
            h, best = c, mu[c]
    teacher = list(nu)
    if hn == "mean":
        teacher[h] = mu[h]
    elif hn == "min":
        teacher[h] = min(z[k][b][h] for k in range(num_experts))
    else:
        teacher[h] = mu[h] - margin
    student = list(z[m][b])
    cols = list(range(num_classes))
    if slot == "code":
        teacher[y[b]], student[y[b]] = 0.0, -s
    elif slot == "neg_scale":
        teacher[y[b]], student[y[b]] = -s, -s
    else:  # neg_inf: drop the target column
        cols = [c for c in cols if c != y[b]]
    return [teacher[c] for c in cols], [student[c] for c in cols]


def ref_dkt(z, y, s=S, T=1.0, slot="code", hn="mean", margin=0.0, reduction="mean"):
    num_experts, batch, num_classes = len(z), len(z[0]), len(z[0][0])
    total = 0.0
    for m in range(num_experts):
        acc = 0.0
        for b in range(batch):
            t, u = ref_teacher_student(z, y, b, m, s, slot, hn, margin)
            acc += kl(softmax([x / T for x in t]), softmax([x / T for x in u]))
        total += acc / (batch * num_classes if reduction == "mean" else batch)
    return total * T * T


def ref_md(z, T=1.0, reduction="mean"):
    num_experts, batch, num_classes = len(z), len(z[0]), len(z[0][0])
    total = 0.0
    for m in range(num_experts):
        for j in range(num_experts):
            if j == m:
                continue
            acc = sum(
                kl(softmax([x / T for x in z[j][b]]), softmax([x / T for x in z[m][b]]))
                for b in range(batch)
            )
            total += acc / (batch * num_classes if reduction == "mean" else batch)
    return total * T * T


def ref_ce(z, y, adjust=None):
    total = 0.0
    for zm in z:
        acc = 0.0
        for b, row in enumerate(zm):
            row = [v + (adjust[c] if adjust else 0.0) for c, v in enumerate(row)]
            acc += -math.log(softmax(row)[y[b]])
        total += acc / len(zm)
    return total


# ---------------------------------------------------------------- DKT


def test_teacher_is_max_except_hardest_negative_mean_among_non_targets() -> None:
    teacher, hard = dkt_teacher(logits(), target())
    assert hard.tolist() == [1, 1]  # never the target, although the target has the top mean
    expected = [[9.0, 13 / 3, 4.0, 0.0], [5.0, 10 / 3, 7.0, 9.0]]  # slot y still holds ν_y
    assert torch.allclose(teacher, torch.tensor(expected), atol=1e-6)
    teacher_min, _ = dkt_teacher(logits(), target(), hardest_negative="min")
    assert teacher_min[:, 1].tolist() == [2.0, -1.0]
    teacher_margin, _ = dkt_teacher(logits(), target(), hardest_negative="mean_margin", margin=2.0)
    assert torch.allclose(teacher_margin[:, 1], torch.tensor([13 / 3 - 2, 10 / 3 - 2]))


def test_hardest_negative_tie_goes_to_lowest_index() -> None:
    z = torch.tensor([[[1.0, 5.0, 5.0, 9.0]]])
    _, hard = dkt_teacher(z, torch.tensor([3]))
    assert hard.tolist() == [1]


@pytest.mark.parametrize("slot", ["code", "neg_scale", "neg_inf"])
@pytest.mark.parametrize("hn", ["mean", "min", "mean_margin"])
def test_dkt_matches_hand_computation(slot: str, hn: str) -> None:
    got = dkt_loss(logits(), target(), scale=S, target_slot=slot, hardest_negative=hn, margin=1.5)
    want = ref_dkt(Z, Y, slot=slot, hn=hn, margin=1.5)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dkt_code_defaults_teacher_slot_zero_student_slot_minus_s() -> None:
    # The default call is the code's variant: teacher t_y = 0, student u_y = -30.
    got = dkt_loss(logits(), target())
    manual = 0.0
    for m in range(3):
        for b in range(2):
            t, u = ref_teacher_student(Z, Y, b, m, S, "code", "mean", 0.0)
            assert t[Y[b]] == 0.0 and u[Y[b]] == -30.0
            manual += kl(softmax(t), softmax(u)) / (2 * 4)
    assert got.item() == pytest.approx(manual, rel=1e-5)
    # ... and differs from the symmetric variants.
    assert got.item() != pytest.approx(dkt_loss(logits(), target(), target_slot="neg_scale").item())


def test_dkt_realistic_cosine_logits() -> None:
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(3, 5, 10, generator=g) * 2 - 1) * S
    y = torch.randint(0, 10, (5,), generator=g)
    got = dkt_loss(z, y, scale=S)
    assert got.item() == pytest.approx(ref_dkt(z.tolist(), y.tolist()), rel=1e-4)


def test_dkt_temperature_and_reduction() -> None:
    for slot in ("code", "neg_inf"):
        t2 = dkt_loss(logits(), target(), temperature=2.0, target_slot=slot)
        assert t2.item() == pytest.approx(ref_dkt(Z, Y, T=2.0, slot=slot), rel=1e-5)
        # T² factor: 4 × the plain KL of the softened distributions.
        plain = ref_dkt(Z, Y, T=2.0, slot=slot) / 4.0
        assert t2.item() == pytest.approx(4.0 * plain, rel=1e-5)
    mean = dkt_loss(logits(), target(), reduction="mean")
    batchmean = dkt_loss(logits(), target(), reduction="batchmean")
    assert batchmean.item() == pytest.approx(4 * mean.item(), rel=1e-6)  # C × "mean"


def test_dkt_neg_inf_is_finite_with_finite_gradients() -> None:
    z = logits(requires_grad=True)
    loss = dkt_loss(z * 3, target(), target_slot="neg_inf")  # very peaked distributions
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def _grad(**kwargs) -> torch.Tensor:
    z = logits(requires_grad=True)
    dkt_loss(z, target(), **kwargs).backward()
    return z.grad


def test_dkt_teacher_gradient_reaches_every_expert() -> None:
    free, detached = _grad(), _grad(teacher_detach=True)
    for m in range(3):
        # Every expert feeds μ_h, so the teacher side changes every expert's gradient.
        assert not torch.allclose(free[m], detached[m])
    teacher_side = free - detached
    # ν: sample 0, class 2 (non-target, not h) is held by expert 1 only (4 > 1, -2).
    assert teacher_side[1, 0, 2].abs() > 1e-6
    assert teacher_side[0, 0, 2] == 0 and teacher_side[2, 0, 2] == 0
    # μ at h: each expert gets 1/M of dL/dt_h.
    h_grads = teacher_side[:, 0, 1]
    assert torch.allclose(h_grads, h_grads[0].expand(3)) and h_grads[0].abs() > 1e-6
    # Target slots are constants in teacher (0) and student (-s): no gradient at all.
    assert free[:, 0, 0].abs().max() == 0 and free[:, 1, 3].abs().max() == 0


def test_dkt_teacher_detach_leaves_only_student_gradient() -> None:
    got = _grad(teacher_detach=True)
    # Student-only gradient of KL(P ‖ softmax(u_m)) / (B·C): (Q_m,c − P_c) / (B·C), 0 at y.
    want = torch.zeros(3, 2, 4)
    for m in range(3):
        for b in range(2):
            t, u = ref_teacher_student(Z, Y, b, m, S, "code", "mean", 0.0)
            p, q = softmax(t), softmax(u)
            for c in range(4):
                if c != Y[b]:
                    want[m, b, c] = (q[c] - p[c]) / 8
    assert torch.allclose(got, want, atol=1e-7)


def test_dkt_rejects_unknown_options() -> None:
    with pytest.raises(ValueError):
        dkt_loss(logits(), target(), target_slot="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dkt_loss(logits(), target(), hardest_negative="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dkt_loss(logits(), target(), reduction="sum")  # type: ignore[arg-type]


# ---------------------------------------------------------------- mutual distillation


def test_md_matches_hand_computation_and_options() -> None:
    assert mutual_distillation_loss(logits()).item() == pytest.approx(ref_md(Z), rel=1e-5)
    t2 = mutual_distillation_loss(logits(), temperature=2.0)
    assert t2.item() == pytest.approx(ref_md(Z, T=2.0), rel=1e-5)
    bm = mutual_distillation_loss(logits(), reduction="batchmean")
    assert bm.item() == pytest.approx(4 * mutual_distillation_loss(logits()).item(), rel=1e-6)


def test_md_sums_both_directions_and_trains_both_experts() -> None:
    z = logits()[:2].clone().requires_grad_(True)
    loss = mutual_distillation_loss(z)
    zl = Z[:2]
    both = sum(
        kl(softmax(zl[j][b]), softmax(zl[m][b])) / 8 for m, j in ((0, 1), (1, 0)) for b in range(2)
    )
    assert loss.item() == pytest.approx(both, rel=1e-5)
    # Symmetric in the experts: swapping them changes nothing.
    assert mutual_distillation_loss(z.flip(0)).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert z.grad[0].abs().sum() > 0 and z.grad[1].abs().sum() > 0


def test_md_single_expert_is_zero() -> None:
    assert mutual_distillation_loss(logits()[:1]).item() == 0.0


# ---------------------------------------------------------------- classification


def test_ce_is_sum_over_experts_of_batch_mean() -> None:
    assert ce_loss(logits(), target()).item() == pytest.approx(ref_ce(Z, Y), rel=1e-5)


def test_balanced_softmax_is_ce_of_adjusted_logits() -> None:
    counts = [500, 50, 5, 1]
    log_n = [math.log(n) for n in counts]
    got = balanced_softmax_loss(logits(), target(), torch.tensor(counts), tau=1.0)
    assert got.item() == pytest.approx(ref_ce(Z, Y, adjust=log_n), rel=1e-5)
    half = balanced_softmax_loss(logits(), target(), counts, tau=0.5)
    assert half.item() == pytest.approx(ref_ce(Z, Y, adjust=[0.5 * v for v in log_n]), rel=1e-5)
    adjusted = logits() + torch.tensor(log_n)
    via_torch = sum(F.cross_entropy(adjusted[m], target()) for m in range(3))
    assert got.item() == pytest.approx(via_torch.item(), rel=1e-6)
    assert balanced_softmax_loss(logits(), target(), counts, tau=0.0).item() == pytest.approx(
        ce_loss(logits(), target()).item()
    )


# ---------------------------------------------------------------- objective

COUNTS = [500, 120, 30, 6]


def test_objective_stage1_default_weights() -> None:
    objective = build_objective(LossConfig(), stage=1, class_counts=COUNTS, scale=S)
    z = logits(requires_grad=True)
    terms = objective(z, target())
    assert isinstance(terms, LossTerms)
    ce, dkt, md = ref_ce(Z, Y), ref_dkt(Z, Y), ref_md(Z)
    assert terms.total.item() == pytest.approx(ce + 10 * dkt + md, rel=1e-5)
    parts = terms.as_dict()
    assert set(parts) == {"loss", "loss_ce", "loss_dkt", "loss_md"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["loss_ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["loss_dkt"] == pytest.approx(dkt, rel=1e-5)
    assert parts["loss_md"] == pytest.approx(md, rel=1e-5)
    assert all(not p.requires_grad for p in terms.parts.values())
    terms.total.backward()
    assert torch.isfinite(z.grad).all()


def test_objective_uses_config_fields() -> None:
    cfg = LossConfig(
        ce_weight=0.5,
        dkt_weight=3.0,
        md_weight=0.0,
        temperature=2.0,
        target_slot="neg_inf",
        hardest_negative="min",
        kl_reduction="batchmean",
    )
    terms = build_objective(cfg, stage=1, class_counts=COUNTS, scale=S)(logits(), target())
    dkt = ref_dkt(Z, Y, T=2.0, slot="neg_inf", hn="min", reduction="batchmean")
    md = ref_md(Z, T=2.0, reduction="batchmean")
    assert terms.total.item() == pytest.approx(0.5 * ref_ce(Z, Y) + 3 * dkt, rel=1e-5)
    assert terms.as_dict()["loss_md"] == pytest.approx(md, rel=1e-5)  # logged, weight 0


def test_objective_stage2_has_no_distillation() -> None:
    objective = build_objective(LossConfig(), stage=2, class_counts=COUNTS, scale=S)
    z = logits(requires_grad=True)
    terms = objective(z, target())
    want = ref_ce(Z, Y, adjust=[math.log(n) for n in COUNTS])
    assert terms.total.item() == pytest.approx(want, rel=1e-5)
    parts = terms.as_dict()
    assert parts["loss_dkt"] == 0.0 and parts["loss_md"] == 0.0
    assert parts["loss_ce"] == pytest.approx(want, rel=1e-5)
    ce2 = build_objective(LossConfig(stage2="ce"), stage=2, class_counts=COUNTS, scale=S)
    assert ce2(logits(), target()).total.item() == pytest.approx(ref_ce(Z, Y), rel=1e-5)


def test_objective_stage1_baselines_and_single_expert() -> None:
    ce_only = build_objective(LossConfig(stage1="ce"), stage=1, class_counts=COUNTS, scale=S)
    assert ce_only(logits(), target()).total.item() == pytest.approx(ref_ce(Z, Y), rel=1e-5)
    bal_cfg = LossConfig(stage1="balanced_softmax", tau=0.5)
    bal = build_objective(bal_cfg, stage=1, class_counts=COUNTS, scale=S)
    want = ref_ce(Z, Y, adjust=[0.5 * math.log(n) for n in COUNTS])
    assert bal(logits(), target()).total.item() == pytest.approx(want, rel=1e-5)
    single = build_objective(LossConfig(), stage=1, class_counts=COUNTS, scale=S)
    terms = single(logits()[:1], target())
    assert terms.as_dict()["loss_dkt"] == 0.0 and terms.as_dict()["loss_md"] == 0.0
    assert terms.total.item() == pytest.approx(ref_ce(Z[:1], Y), rel=1e-5)
    with pytest.raises(ValueError):
        build_objective(LossConfig(), stage=3, class_counts=COUNTS, scale=S)


def test_objective_half_precision_logits_computed_in_float32() -> None:
    objective = build_objective(LossConfig(), stage=1, class_counts=COUNTS, scale=S)
    terms = objective(logits().half(), target())
    assert terms.total.dtype == torch.float32
    assert terms.total.item() == pytest.approx(
        ref_ce(Z, Y) + 10 * ref_dkt(Z, Y) + ref_md(Z), rel=1e-4
    )
