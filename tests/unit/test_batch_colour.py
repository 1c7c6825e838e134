"""The batched, on-device colour work of the ImageNet-style presets against torchvision.

The readers crop and flip; the device then applies ColorJitter ("imagenet_jitter") or
RandAugment ("randaugment") per image, and normalises. Equivalence is tested pixel for pixel on
the same parameters, twice: the batch's own draws against torchvision's functional ops applied
image by image, and draws replayed from torch's default generator against the preset's own
torchvision transform (as tests/unit/test_batch_augment.py does for the CIFAR presets). The
draws are then tested statistically.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.readers.batch_augment import (
    JITTER,
    JITTER_OPS,
    RANDAUGMENT_BINS,
    RANDAUGMENT_MAGNITUDE,
    RANDAUGMENT_NUM_OPS,
    RANDAUGMENT_OPS,
    SIGNED_OPS,
    BatchAugment,
    FinishedBatches,
    JitterDraws,
    RandAugmentDraws,
    augmented_batches,
    colour_jitter,
    randaugment,
    shuffled_batches,
)
from pipeline.data.readers.transforms import (
    IMAGENET_AUGMENTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    transform_seeded,
)

SIZES = [(32, 32), (28, 36)]  # square, and not (TranslateX takes the width, TranslateY the height)


def _noise(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Uniform uint8 pixels: every level, so blends land next to every rounding boundary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g, dtype=torch.uint8)


def _images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Structured uint8 images (gradients, a bright square, noise), so that every RandAugment
    op (equalize, autocontrast, sharpness, geometry) changes them."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, height)[None, None, :, None]
    cols = torch.linspace(0, 1, width)[None, None, None, :]
    base = rows * torch.rand(n, 3, 1, 1, generator=g) * 160
    base = base + cols * torch.rand(n, 3, 1, 1, generator=g) * 60
    base[:, :, height // 4 : height // 2, width // 4 : width // 2] += 50
    noise = torch.randint(0, 40, (n, 3, height, width), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _preset_step(kind: str, cls: type) -> v2.Transform:
    """The preset's own `cls` step (its per-image train transform), so a change of the preset's
    parameters shows here."""
    steps = [t for t in build_transform(kind, train=True).transforms if isinstance(t, cls)]
    assert len(steps) == 1, steps
    return steps[0]


def _finish(images: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


# ColorJitter


def _jitter_one(image: torch.Tensor, order: list[int], factors: list[float]) -> torch.Tensor:
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for op in order:
        image = ops[op](image, factors[op])
    return image


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_jitter_equals_torchvisions_ops_on_its_draws(height, width):
    """Each image: torchvision's adjust_* in the drawn order with the drawn factors, equal
    to the uint8 level (a float32 multiply-then-add blend would miss by one level on some
    pixels of uniform noise), and the preset's output is that, to float and normalised."""
    images = _noise(64, height, width)
    augment = BatchAugment("imagenet_jitter")
    draws = augment.draw(64, torch.Generator().manual_seed(1))
    assert isinstance(draws, JitterDraws)
    assert len({tuple(row) for row in draws.order.tolist()}) == 6  # every order is tested
    expected = torch.stack(
        [
            _jitter_one(img, order, factors)
            for img, order, factors in zip(
                images, draws.order.tolist(), draws.factors.tolist(), strict=True
            )
        ]
    )
    got = colour_jitter(images, draws)
    assert got.dtype == torch.uint8
    differ = (got != expected).sum().item()
    assert differ == 0, f"{differ} values differ"
    assert torch.equal(augment(images, draws), _finish(expected))


def test_jitter_equals_the_presets_colorjitter_on_replayed_draws():
    """torchvision's ColorJitter draws a permutation of its four ops (hue, 3, is skipped),
    then the brightness, contrast and saturation factors: replayed from the same seed, the
    batch gives the preset's transform's pixels."""
    jitter = _preset_step("imagenet_jitter", v2.ColorJitter)
    band = (1 - JITTER, 1 + JITTER)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        band, band, band, None,
    )  # fmt: skip
    seeds = range(64)
    orders, factors = [], []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        orders.append([i for i in torch.randperm(4).tolist() if i != 3])
        factors.append([float(torch.empty(1).uniform_(*band)) for _ in JITTER_OPS])
    draws = JitterDraws(order=torch.tensor(orders), factors=torch.tensor(factors))
    images = _noise(len(seeds), seed=2)
    expected = torch.stack(
        [transform_seeded(jitter, img, seed) for img, seed in zip(images, seeds, strict=True)]
    )
    differ = (colour_jitter(images, draws) != expected).sum().item()
    assert differ == 0, f"{differ} values differ"


# RandAugment


def _randaugment_one(
    ra: v2.RandAugment, image: torch.Tensor, ops: list[int], negative: list[bool]
) -> torch.Tensor:
    """torchvision's own per-op application (RandAugment's) of the drawn ops and signs."""
    height, width = image.shape[-2:]
    for op_index, neg in zip(ops, negative, strict=True):
        op = RANDAUGMENT_OPS[op_index]
        magnitudes_fn, signed = ra._AUGMENTATION_SPACE[op]
        magnitudes = magnitudes_fn(ra.num_magnitude_bins, height, width)
        mag = 0.0 if magnitudes is None else float(magnitudes[ra.magnitude])
        mag = -mag if signed and neg else mag
        image = ra._apply_image_or_video_transform(
            image, op, mag, interpolation=ra.interpolation, fill=ra._fill
        )
    return image


def test_the_randaugment_table_is_the_presets():
    ra = _preset_step("randaugment", v2.RandAugment)
    assert tuple(ra._AUGMENTATION_SPACE) == RANDAUGMENT_OPS
    signed = {op for op, (_, is_signed) in ra._AUGMENTATION_SPACE.items() if is_signed}
    assert signed == set(SIGNED_OPS)
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (
        RANDAUGMENT_NUM_OPS, RANDAUGMENT_MAGNITUDE, RANDAUGMENT_BINS,
    )  # fmt: skip
    assert (
        ra.fill is None and v2.InterpolationMode(ra.interpolation) == v2.InterpolationMode.NEAREST
    )


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_randaugment_equals_torchvisions_ops_on_its_draws(height, width):
    """Every op and sign of the table, each image its own: pixel for pixel."""
    ra = _preset_step("randaugment", v2.RandAugment)
    n = 160
    images = _images(n, height, width)
    augment = BatchAugment("randaugment")
    draws = augment.draw(n, torch.Generator().manual_seed(3))
    assert isinstance(draws, RandAugmentDraws)
    drawn = {
        (RANDAUGMENT_OPS[op], neg and RANDAUGMENT_OPS[op] in SIGNED_OPS)
        for op, neg in zip(
            draws.op.flatten().tolist(), draws.negative.flatten().tolist(), strict=True
        )
    }
    assert len(drawn) == len(RANDAUGMENT_OPS) + len(SIGNED_OPS)  # every step is tested
    expected = torch.stack(
        [
            _randaugment_one(ra, img, ops, neg)
            for img, ops, neg in zip(
                images, draws.op.tolist(), draws.negative.tolist(), strict=True
            )
        ]
    )
    got = randaugment(images, draws)
    bad = (got != expected).flatten(1).any(dim=1)
    assert not bad.any(), f"images differ: {bad.nonzero().flatten().tolist()[:10]}"
    assert torch.equal(augment(images, draws), _finish(expected))


def test_randaugment_equals_the_presets_randaugment_on_replayed_draws():
    """torchvision's RandAugment draws, per op, its index in the table, then for a signed op
    with magnitudes its sign: replayed from the same seed, the batch gives its pixels."""
    ra = _preset_step("randaugment", v2.RandAugment)
    space = ra._AUGMENTATION_SPACE
    seeds = range(96)
    ops, negative = [], []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        ops.append([])
        negative.append([])
        for _ in range(ra.num_ops):
            ops[-1].append(int(torch.randint(len(space), ())))
            magnitudes_fn, signed = space[RANDAUGMENT_OPS[ops[-1][-1]]]
            draws_sign = signed and magnitudes_fn(ra.num_magnitude_bins, 32, 32) is not None
            negative[-1].append(draws_sign and bool(torch.rand(()) <= 0.5))
    draws = RandAugmentDraws(op=torch.tensor(ops), negative=torch.tensor(negative))
    images = _images(len(seeds), seed=4)
    expected = torch.stack(
        [transform_seeded(ra, img, seed) for img, seed in zip(images, seeds, strict=True)]
    )
    bad = (randaugment(images, draws) != expected).flatten(1).any(dim=1)
    assert not bad.any(), f"seeds differ: {bad.nonzero().flatten().tolist()[:10]}"


# The draws


def _chi_square_ok(values: torch.Tensor, bins: int) -> bool:
    counts = torch.bincount(values, minlength=bins).double()
    expected = len(values) / bins
    statistic = float(((counts - expected) ** 2 / expected).sum())
    # mean bins-1, sd sqrt(2(bins-1)): 6 sd above the mean fails
    return counts.numel() == bins and statistic < bins - 1 + 6 * math.sqrt(2 * (bins - 1))


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_jitter_draws_follow_colorjitter():
    """Factors uniform in [1 - JITTER, 1 + JITTER] (ten equal bins), each row of the order a
    permutation, the six permutations equally likely: over 100,000 images."""
    n = 100_000
    d = BatchAugment("imagenet_jitter").draw(n, torch.Generator().manual_seed(7))
    assert d.factors.dtype == torch.float32 and d.factors.shape == (n, 3)
    assert float(d.factors.min()) >= 1 - JITTER and float(d.factors.max()) <= 1 + JITTER
    for column in d.factors.T:
        bins = ((column - (1 - JITTER)) / (2 * JITTER) * 10).long().clamp(max=9)
        assert _chi_square_ok(bins, 10)
        assert abs(float(column.mean()) - 1.0) < 5 * (2 * JITTER / math.sqrt(12)) / math.sqrt(n)
    assert torch.equal(d.order.sort(dim=1).values, torch.arange(3).expand(n, 3))
    permutations = {p: i for i, p in enumerate(itertools.permutations(range(3)))}
    ids = torch.tensor([permutations[tuple(row)] for row in d.order.tolist()])
    assert _chi_square_ok(ids, 6)


def test_randaugment_draws_follow_randaugment():
    """Each slot's op uniform over the 14 of the table, Identity included, signs fair: over
    100,000 images (200,000 ops)."""
    n = 100_000
    d = BatchAugment("randaugment").draw(n, torch.Generator().manual_seed(8))
    assert d.op.shape == d.negative.shape == (n, RANDAUGMENT_NUM_OPS)
    for slot in range(RANDAUGMENT_NUM_OPS):
        assert _chi_square_ok(d.op[:, slot], len(RANDAUGMENT_OPS))
    assert _within(int(d.negative.sum()), d.negative.numel(), 0.5)
    same = int((d.op[:, 0] == d.op[:, 1]).sum())  # slots independent: P(same op) = 1/14
    assert _within(same, n, 1 / len(RANDAUGMENT_OPS))


# The whole preset


@pytest.mark.parametrize("kind", IMAGENET_AUGMENTS)
def test_evaluation_and_the_imagenet_preset_are_to_float_and_normalise(kind):
    images = _images(8, seed=5)
    expected = torch.stack(
        [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(F.to_dtype(img, scale=True)) for img in images]
    )
    augment = BatchAugment(kind)
    assert torch.equal(augment(images, None), expected)
    if kind == "imagenet":  # nothing random is left on the device for it
        assert augment.draw(8, torch.Generator()) is None


@pytest.mark.parametrize("kind", ["imagenet_jitter", "randaugment"])
def test_epochs_are_a_function_of_their_seed(kind):
    images, labels = _images(40, seed=6), torch.arange(40) % 10
    augment = BatchAugment(kind)

    def epoch(seed):
        batches = shuffled_batches(images, labels, 16, seed)
        return list(augmented_batches(batches, augment, seed, torch.device("cpu")))

    first, again, other = epoch(3), epoch(3), epoch(4)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(first[0][0], other[0][0])
    # augmented: not merely normalised
    unaugmented = augment(images[: len(first[0][1])], None)
    assert not torch.equal(first[0][0], unaugmented)


def test_finished_batches_normalise_each_pass():
    images, labels = _images(20, seed=9), torch.arange(20)
    batches = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    finished = FinishedBatches(batches, BatchAugment("randaugment"), torch.device("cpu"))
    for _ in range(2):  # re-iterable: evaluated once per evaluation
        got = list(finished)
        assert [len(lab) for _, lab in got] == [16, 4]
        assert torch.equal(torch.cat([x for x, _ in got]), _finish(images))


def test_refuses_draws_of_another_preset():
    images = _images(4)
    jitter = BatchAugment("imagenet_jitter").draw(4, torch.Generator())
    with pytest.raises(TypeError, match="'randaugment' takes RandAugmentDraws"):
        BatchAugment("randaugment")(images, jitter)
    with pytest.raises(TypeError, match="'imagenet' takes NoneType"):
        BatchAugment("imagenet")(images, jitter)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_equals_the_cpu_path():
    """ColorJitter's blends are exact on both (the same roundings); RandAugment's resampling
    may move a pixel by CUDA's float rounding: 99.9% of the values within one uint8 level."""
    images = _noise(256)
    generator = torch.Generator().manual_seed(10)
    draws = BatchAugment("imagenet_jitter").draw(256, generator)
    assert torch.equal(colour_jitter(images.cuda(), draws).cpu(), colour_jitter(images, draws))
    images = _images(256)
    draws = BatchAugment("randaugment").draw(256, generator)
    cpu = randaugment(images, draws).int()
    gpu = randaugment(images.cuda(), draws).cpu().int()
    close = (gpu - cpu).abs() <= 1
    assert close.float().mean() >= 0.999, f"{100 * (1 - close.float().mean()):.3f}% differ"
