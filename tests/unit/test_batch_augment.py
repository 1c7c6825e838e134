"""The batched, on-device CIFAR augmentation against today's per-image path.

Equivalence is tested on the same parameters: torchvision's per-image transforms draw theirs
from torch's default generator in a fixed order, which `_replay` reads back from the same seed;
the batched path given those draws must produce the per-image path's pixels. The batched
path's own draws are then tested statistically against the policy.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from pipeline.data.readers.batch_augment import (
    CIFAR10_POLICY,
    CROP_PADDING,
    SIGNED_OPS,
    BatchAugment,
    Draws,
    augmented_batches,
    draw,
    shuffled_batches,
)
from pipeline.data.readers.transforms import CIFAR_STD, build_transform, transform_seeded

SIZE = 32


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 NCHW images with structure (gradients, a bright square) and noise, so that every
    op (equalize, autocontrast, sharpness, geometry) changes them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, SIZE)
    base = ramp[None, None, :, None] * torch.rand(n, 3, 1, 1, generator=g) * 160
    base = base + ramp[None, None, None, :] * torch.rand(n, 3, 1, 1, generator=g) * 60
    base[:, :, 8:20, 10:22] += 50
    noise = torch.randint(0, 40, (n, 3, SIZE, SIZE), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _replay(seed: int) -> dict:
    """The draws `build_transform("shike", train=True)` makes after `transform_seeded(..., seed)`,
    read from the default generator in the order torchvision's transforms make them:
    RandomCrop (top, left), RandomHorizontalFlip, AutoAugment (sub-policy; per op: applies?,
    and for a signed op its sign), then Cutout (centre row, column)."""
    torch.default_generator.manual_seed(seed)
    span = 2 * CROP_PADDING + 1
    top, left = int(torch.randint(0, span, size=())), int(torch.randint(0, span, size=()))
    flip = bool(torch.rand(1) < 0.5)
    policy = int(torch.randint(len(CIFAR10_POLICY), ()))
    applied, negative = [False, False], [False, False]
    for slot, (op, probability, _) in enumerate(CIFAR10_POLICY[policy]):
        applied[slot] = bool(torch.rand(()) <= probability)
        if applied[slot] and op in SIGNED_OPS:
            negative[slot] = bool(torch.rand(()) <= 0.5)
    cy, cx = int(torch.randint(SIZE, (1,))), int(torch.randint(SIZE, (1,)))
    return dict(top=top, left=left, flip=flip, policy=policy, applied=applied,
                negative=negative, cy=cy, cx=cx)  # fmt: skip


def _draws(replays: list[dict]) -> Draws:
    def column(key, dtype=torch.int64):
        return torch.tensor([r[key] for r in replays], dtype=dtype)

    return Draws(
        crop_top=column("top"),
        crop_left=column("left"),
        flip=column("flip", torch.bool),
        policy=column("policy"),
        applied=column("applied", torch.bool),
        negative=column("negative", torch.bool),
        cutout_y=column("cy"),
        cutout_x=column("cx"),
    )


def _seeds_covering_every_step(extra: int) -> list[int]:
    """Seeds whose replayed draws, together, apply every (sub-policy, slot, sign) of the
    policy at least once (`extra` more seeds on top, taken in order)."""
    wanted = {
        (p, slot, neg)
        for p, sub_policy in enumerate(CIFAR10_POLICY)
        for slot, (op, probability, _) in enumerate(sub_policy)
        if probability > 0
        for neg in ((False, True) if op in SIGNED_OPS else (False,))
    }
    chosen = list(range(extra))
    for seed in range(extra, 200_000):
        if not wanted:
            break
        r = _replay(seed)
        hits = {(r["policy"], s, r["negative"][s]) for s in (0, 1) if r["applied"][s]}
        if hits & wanted:
            wanted -= hits
            chosen.append(seed)
    assert not wanted, f"no seed applies {sorted(wanted)}"
    return chosen


def test_batched_shike_preset_equals_the_per_image_transform_on_the_same_draws():
    """Every op, magnitude and sign of the policy, plus crop, flip, Cutout and normalisation:
    pixel for pixel (tolerance 1e-5 after normalising, i.e. none at the uint8 level)."""
    seeds = _seeds_covering_every_step(extra=200)
    images = _images(len(seeds))
    per_image = build_transform("shike", train=True)
    expected = torch.stack(
        [transform_seeded(per_image, img, seed) for img, seed in zip(images, seeds, strict=True)]
    )
    draws = _draws([_replay(seed) for seed in seeds])
    got = BatchAugment("shike")(images, draws)
    assert got.shape == expected.shape and got.dtype == torch.float32
    bad = (got - expected).abs().amax(dim=(1, 2, 3)) > 1e-5
    differing = [seed for seed, b in zip(seeds, bad.tolist(), strict=True) if b]
    assert not differing, f"images differ for seeds {differing[:10]}"


def test_the_policy_is_torchvisions_cifar10_policy():
    assert list(CIFAR10_POLICY) == list(
        v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies  # the reference's own table
    )


@pytest.mark.parametrize("kind", ["basic", "none"])
def test_other_cifar_presets_equal_their_per_image_transform(kind):
    images = _images(64, seed=1)
    replays = [_replay(seed) for seed in range(64)]
    expected = torch.stack(
        [
            transform_seeded(build_transform(kind, train=True), img, seed)
            for seed, img in enumerate(images)
        ]
    )
    got = BatchAugment(kind)(images, _draws(replays))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_evaluation_is_the_test_transform():
    images = _images(8)
    expected = torch.stack([build_transform("shike", train=False)(img) for img in images])
    torch.testing.assert_close(BatchAugment("shike")(images, None), expected, atol=1e-6, rtol=0)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_draws_follow_the_policy_statistically():
    """Each image draws its own sub-policy (uniform over 25), each op applies with the
    policy's probability, signs are fair, crops, flips and Cutout centres uniform: counts
    within 5 standard deviations over 200,000 images (chi-square for the uniform ones)."""
    n = 200_000
    d = draw(n, torch.Generator().manual_seed(7), SIZE)

    def chi_square_ok(values: torch.Tensor, bins: int) -> bool:
        counts = torch.bincount(values, minlength=bins).double()
        expected = len(values) / bins
        statistic = float(((counts - expected) ** 2 / expected).sum())
        # mean bins-1, sd sqrt(2(bins-1)): 6 sd above the mean fails
        return counts.numel() == bins and statistic < bins - 1 + 6 * math.sqrt(2 * (bins - 1))

    assert chi_square_ok(d.policy, len(CIFAR10_POLICY))
    assert chi_square_ok(d.crop_top, 2 * CROP_PADDING + 1)
    assert chi_square_ok(d.crop_left, 2 * CROP_PADDING + 1)
    assert chi_square_ok(d.cutout_y, SIZE) and chi_square_ok(d.cutout_x, SIZE)
    assert _within(int(d.flip.sum()), n, 0.5)
    assert _within(int(d.negative.sum()), 2 * n, 0.5)
    for p, sub_policy in enumerate(CIFAR10_POLICY):
        chosen = d.policy == p
        for slot, (op, probability, _) in enumerate(sub_policy):
            count = int(d.applied[chosen, slot].sum())
            assert _within(count, int(chosen.sum()), probability), (p, slot, op, count)


def test_epochs_are_a_function_of_their_seed():
    images, labels = _images(50), torch.arange(50) % 10
    augment = BatchAugment("shike")

    def epoch(seed):
        batches = shuffled_batches(images, labels, 16, seed)
        return list(augmented_batches(batches, augment, seed, torch.device("cpu")))

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert [len(lab) for _, lab in first] == [16, 16, 16, 2]  # last partial batch kept
    assert sorted(torch.cat([lab for _, lab in first]).tolist()) == sorted(labels.tolist())
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(first[0][0], other[0][0])


def test_refuses_what_it_cannot_augment():
    with pytest.raises(ValueError, match="supports the presets.*not 'autoaugment'"):
        BatchAugment("autoaugment")
    with pytest.raises(ValueError, match="uint8 NCHW"):
        BatchAugment("shike")(torch.zeros(2, 3, 32, 32), None)
    with pytest.raises(ValueError, match="uint8 NCHW"):  # one channel: not what it normalises
        BatchAugment("shike")(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), None)
    images = _images(4)
    with pytest.raises(ValueError, match="3 images' draws for a batch of 4"):
        BatchAugment("shike")(images, draw(3, torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="'shike' takes Draws"):
        BatchAugment("shike")(images, BatchAugment("randaugment").draw(4, torch.Generator()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_equals_the_cpu_path():
    """The same draws on the GPU: at least 99.9% of the values within one uint8 level of the
    CPU's (CUDA's float rounding may move a resampled pixel or a colour level by one)."""
    seeds = _seeds_covering_every_step(extra=500)
    images = _images(len(seeds))
    draws = _draws([_replay(seed) for seed in seeds])
    augment = BatchAugment("shike")
    cpu = augment(images, draws)
    gpu = augment(images.cuda(), draws).cpu()
    one_level = 1 / 255 / min(CIFAR_STD) + 1e-6
    close = (gpu - cpu).abs() <= one_level
    assert close.float().mean() >= 0.999, f"{100 * (1 - close.float().mean()):.3f}% differ"


@pytest.mark.parametrize("kind", ["shike", "imagenet", "imagenet_jitter", "randaugment"])
def test_batches_in_channels_last_memory_augment_as_planar_ones(kind):
    """The readers hand uint8 crops over in channels-last memory (`collate_crops`, `as_nchw`):
    augmented, they equal the same batch held planar, and leave planar NCHW for the model."""
    augment = BatchAugment(kind)
    planar = _images(16)
    channels_last = planar.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    draws = augment.draw(16, torch.Generator().manual_seed(0), SIZE)
    out = augment(channels_last, draws)
    assert out.is_contiguous()
    assert torch.equal(out, augment(planar, draws))
