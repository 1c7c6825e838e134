"""Augmentation presets applied to whole batches on the training device (`data.augment_on=device`).

The per-image path (pipeline.data.readers.transforms, in loader workers or Ray Data tasks) runs each
image through torchvision's transforms on a CPU core; on a GPU node it delivers a fraction of
what the captured training step consumes. Here a uint8 NCHW batch that already sits on the
device is augmented with tensor ops, with the same distribution as the per-image path.

The CIFAR presets, whole:

- RandomCrop 32, padding 4 (zeros): a per-image offset gathered from the padded batch;
- horizontal flip: per-image;
- AutoAugment, CIFAR-10 policy, fill 128: each image draws its own sub-policy, and for each of
  the sub-policy's two ops whether it applies and (signed ops) its sign, as torchvision's
  AutoAugment does. The ops themselves are torchvision's functional ops (which take batches)
  with AutoAugment's magnitudes, applied once per group of images that drew the same op,
  magnitude and sign: about 40 groups a slot, whatever the batch size;
- to float in [0, 1], Cutout (one 16x16 hole, centre uniform, clipped at the borders), then
  normalisation with CIFAR-10 statistics.

The ImageNet-style presets, after the readers' RandomResizedCrop and flip on the CPU (their
inputs vary in size; `transforms.imagenet_geometry`):

- "imagenet_jitter": ColorJitter(brightness, contrast, saturation 0.4), each image its own
  factors and order of the three ops; the blends are computed here with per-image factors,
  with torchvision's uint8 arithmetic, so an image equals torchvision's ops on the same draws;
- "randaugment": RandAugment (2 ops, magnitude 9 of 31 bins, fill None), each image its own
  ops and signs, applied by groups as AutoAugment's are;
- "imagenet": nothing random left; then, for all three, to float and ImageNet normalisation.

The random draws come from a CPU `torch.Generator` the caller seeds (`BatchAugment.draw`), so
a batch's augmentation is a function of that seed on any device, and grouping the images needs
no device-to-host sync: each grouped op slot uploads one small index tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from pipeline.data.readers.transforms import CIFAR_AUGMENTS, IMAGENET_AUGMENTS, normalization
from pipeline.seeding import augmentation_seed

CROP_PADDING = 4
CUTOUT_SIZE = 16
FILL = 128  # AutoAugment's fill for pixels that geometric ops move in from outside
NUM_BINS = 10  # AutoAugment's magnitude bins

# The CIFAR-10 AutoAugment policy (Cubuk et al. 2019, as torchvision states it): 25
# sub-policies of two (op, probability, magnitude bin) steps.
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

# Signed ops are applied with a random sign (probability 1/2), as in AutoAugment.
SIGNED_OPS = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color"}
    | {"Contrast", "Sharpness"}
)


@functools.cache
def magnitude(op: str, bin_index: int | None, size: int, num_bins: int = NUM_BINS) -> float:
    """AutoAugment's (and RandAugment's) magnitude of `op` at `bin_index` of `num_bins`,
    unsigned; `size`: the image's width for TranslateX, height for TranslateY. Computed with
    the same float32 linspace as torchvision's tables."""
    if bin_index is None:
        return 0.0
    top = {
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateX": 150.0 / 331.0 * size,
        "TranslateY": 150.0 / 331.0 * size,
        "Rotate": 30.0,
        "Brightness": 0.9,
        "Color": 0.9,
        "Contrast": 0.9,
        "Sharpness": 0.9,
    }
    if op in top:
        return float(torch.linspace(0.0, top[op], num_bins)[bin_index])
    if op == "Posterize":  # bits: 8 down to 4
        return float((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int()[bin_index])
    if op == "Solarize":  # threshold as a fraction of 255: 1 down to 0
        return float(torch.linspace(1.0, 0.0, num_bins)[bin_index])
    raise ValueError(f"{op} takes no magnitude")


def apply_op(images: Tensor, op: str, mag: float, fill: float | None = FILL) -> Tensor:
    """One AutoAugment / RandAugment op at signed magnitude `mag` on a uint8 (..., 3, H, W)
    batch, with torchvision's functional op and the arguments its auto-augment transforms pass
    (nearest interpolation; `fill`: FILL for the CIFAR preset, None (zeros) for RandAugment's
    default)."""
    if op == "ShearX" or op == "ShearY":
        shear = math.degrees(math.atan(mag))
        return F.affine(
            images,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0] if op == "ShearX" else [0.0, shear],
            interpolation=F.InterpolationMode.NEAREST,
            fill=fill,
            center=[0, 0],
        )
    if op == "TranslateX" or op == "TranslateY":
        return F.affine(
            images,
            angle=0.0,
            translate=[int(mag), 0] if op == "TranslateX" else [0, int(mag)],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=F.InterpolationMode.NEAREST,
            fill=fill,
        )
    if op == "Rotate":
        return F.rotate(images, angle=mag, interpolation=F.InterpolationMode.NEAREST, fill=fill)
    colour: dict[str, Callable[[Tensor], Tensor]] = {
        "Brightness": lambda x: F.adjust_brightness(x, brightness_factor=1.0 + mag),
        "Color": lambda x: F.adjust_saturation(x, saturation_factor=1.0 + mag),
        "Contrast": lambda x: F.adjust_contrast(x, contrast_factor=1.0 + mag),
        "Sharpness": lambda x: F.adjust_sharpness(x, sharpness_factor=1.0 + mag),
        "Posterize": lambda x: F.posterize(x, bits=int(mag)),
        "Solarize": lambda x: F.solarize(x, threshold=255.0 * mag),
        "AutoContrast": F.autocontrast,
        "Equalize": F.equalize,
        "Invert": F.invert,
        "Identity": lambda x: x,
    }
    return colour[op](images)


@dataclass(frozen=True)
class Step:
    """One (op, magnitude bin, sign) of the policy: the unit that images are grouped by."""

    op: str
    bin_index: int | None
    negative: bool


def _policy_steps(slot: int) -> tuple[list[Step], Tensor]:
    """The distinct steps of AutoAugment slot `slot` (0 or 1) and, per sub-policy and sign,
    the index of its step: table[policy, negative]."""
    steps: list[Step] = []
    table = torch.empty(len(CIFAR10_POLICY), 2, dtype=torch.int64)
    for p, sub_policy in enumerate(CIFAR10_POLICY):
        op, _, bin_index = sub_policy[slot]
        for negative in (False, True):
            step = Step(op, bin_index, negative and op in SIGNED_OPS)
            if step not in steps:
                steps.append(step)
            table[p, int(negative)] = steps.index(step)
    return steps, table


_STEPS = (_policy_steps(0), _policy_steps(1))
_PROBABILITIES = torch.tensor([[sp[0][1], sp[1][1]] for sp in CIFAR10_POLICY])


@dataclass(frozen=True)
class Draws:
    """A batch's random augmentation parameters, one entry per image (CPU tensors)."""

    crop_top: Tensor  # (N,) in [0, 2 * CROP_PADDING]: row of the padded image the crop starts
    crop_left: Tensor  # (N,)
    flip: Tensor  # (N,) bool
    policy: Tensor  # (N,) AutoAugment sub-policy in [0, 25)
    applied: Tensor  # (N, 2) bool: whether each of the sub-policy's two ops applies
    negative: Tensor  # (N, 2) bool: the sign of a signed op's magnitude
    cutout_y: Tensor  # (N,) centre row of the Cutout hole
    cutout_x: Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.policy)


def draw(n: int, generator: torch.Generator, size: int = 32) -> Draws:
    """Per-image parameters of the "shike" preset for `n` images of side `size`, drawn from
    `generator` (the other presets use a subset)."""
    span = 2 * CROP_PADDING + 1

    def uniform_int(high: int, *shape: int) -> Tensor:
        return torch.randint(high, shape or (n,), generator=generator)

    policy = uniform_int(len(CIFAR10_POLICY))
    return Draws(
        crop_top=uniform_int(span),
        crop_left=uniform_int(span),
        flip=torch.rand(n, generator=generator) < 0.5,
        policy=policy,
        applied=torch.rand(n, 2, generator=generator) < _PROBABILITIES[policy],
        negative=torch.rand(n, 2, generator=generator) < 0.5,
        cutout_y=uniform_int(size),
        cutout_x=uniform_int(size),
    )


def random_crop(images: Tensor, top: Tensor, left: Tensor) -> Tensor:
    """Per-image crop of each image's own size from the zero-padded batch."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, [CROP_PADDING] * 4)
    rows = top.to(images.device)[:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = left.to(images.device)[:, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # advanced indices (N,1,1), (N,H,1), (N,1,W) around the channel slice give (N, H, W, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def horizontal_flip(images: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def apply_grouped(
    images: Tensor, step_of: Tensor, apply: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """`apply(slice, step)` on the images of each step: `step_of` (N,) on the CPU, -1 where an
    image takes no step. The batch is sorted by step, each group of equal steps is transformed
    as one slice (the ops take batches), then unsorted."""
    order = torch.argsort(step_of, stable=True)
    sorted_steps = step_of[order]
    groups, counts = torch.unique_consecutive(sorted_steps, return_counts=True)
    order_device = order.to(images.device, non_blocking=True)
    grouped = images.index_select(0, order_device)
    start = 0
    for step_index, count in zip(groups.tolist(), counts.tolist(), strict=True):
        if step_index >= 0:
            grouped[start : start + count] = apply(grouped[start : start + count], step_index)
        start += count
    return torch.empty_like(grouped).index_copy_(0, order_device, grouped)


def autoaugment(images: Tensor, draws: Draws) -> Tensor:
    """The CIFAR-10 AutoAugment policy with each image's own draws, slot by slot."""
    size = images.shape[-1]
    for slot, (steps, table) in enumerate(_STEPS):

        def apply(part: Tensor, step_index: int, steps: list[Step] = steps) -> Tensor:
            step = steps[step_index]
            mag = magnitude(step.op, step.bin_index, size)
            return apply_op(part, step.op, -mag if step.negative else mag)

        step_of = table[draws.policy, draws.negative[:, slot].long()]
        step_of = torch.where(draws.applied[:, slot], step_of, -1)  # -1: the op is skipped
        images = apply_grouped(images, step_of, apply)
    return images


def cutout(images: Tensor, centre_y: Tensor, centre_x: Tensor) -> Tensor:
    """Zero one CUTOUT_SIZE square per image, centred at (centre_y, centre_x), clipped at the
    borders (the per-image `transforms.Cutout` for the same centre)."""
    h, w = images.shape[-2:]
    half = CUTOUT_SIZE // 2
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    cy = centre_y.to(images.device)[:, None]
    cx = centre_x.to(images.device)[:, None]
    in_rows = (ys >= cy - half) & (ys < cy + half)  # (N, H)
    in_cols = (xs >= cx - half) & (xs < cx + half)  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(hole, 0.0)


# ColorJitter of the "imagenet_jitter" preset: brightness, contrast and saturation factors
# uniform in [1 - JITTER, 1 + JITTER], hue untouched (transforms._imagenet_steps).
JITTER = 0.4
JITTER_OPS = ("brightness", "contrast", "saturation")  # indices of JitterDraws.order

# torchvision's RandAugment table, in its order (an image's op index points into it), and the
# defaults the "randaugment" preset keeps.
RANDAUGMENT_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
RANDAUGMENT_NUM_OPS = 2
RANDAUGMENT_MAGNITUDE = 9  # the bin, of RANDAUGMENT_BINS
RANDAUGMENT_BINS = 31
_UNBINNED = frozenset({"Identity", "AutoContrast", "Equalize"})  # ops without a magnitude


@dataclass(frozen=True)
class JitterDraws:
    """A batch's ColorJitter parameters, one row per image (CPU tensors)."""

    order: Tensor  # (N, 3) int64: the op (index into JITTER_OPS) at each position, a permutation
    factors: Tensor  # (N, 3) float32: each op's factor, in JITTER_OPS order

    def __len__(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class RandAugmentDraws:
    """A batch's RandAugment parameters, one row per image (CPU tensors)."""

    op: Tensor  # (N, RANDAUGMENT_NUM_OPS) int64: index into RANDAUGMENT_OPS, per slot
    negative: Tensor  # (N, RANDAUGMENT_NUM_OPS) bool: the sign of a signed op's magnitude

    def __len__(self) -> int:
        return len(self.op)


AugmentDraws = Draws | JitterDraws | RandAugmentDraws


def draw_jitter(n: int, generator: torch.Generator) -> JitterDraws:
    """ColorJitter's draws for `n` images. torchvision draws a permutation of its four ops and
    skips hue, which leaves the three others in uniformly random order: the argsort of three
    uniform numbers is such a permutation."""
    order = torch.rand(n, len(JITTER_OPS), generator=generator).argsort(dim=1)
    factors = torch.empty(n, len(JITTER_OPS)).uniform_(1 - JITTER, 1 + JITTER, generator=generator)
    return JitterDraws(order=order, factors=factors)


def draw_randaugment(n: int, generator: torch.Generator) -> RandAugmentDraws:
    """RandAugment's draws for `n` images: each slot's op uniform over the table (Identity
    included) and a fair sign, used by the signed ops only."""
    shape = (n, RANDAUGMENT_NUM_OPS)
    return RandAugmentDraws(
        op=torch.randint(len(RANDAUGMENT_OPS), shape, generator=generator),
        negative=torch.rand(shape, generator=generator) < 0.5,
    )


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's uint8 `_blend(images, other, ratio)` with a ratio per image (N, 1, 1, 1):
    images * ratio in float32, plus other * (1 - ratio), clamped and truncated to uint8.

    torchvision adds the second term with `add_(other, alpha=1 - ratio)`, which its kernels
    compute as one fused multiply-add (a single rounding to float32). float64 holds that sum
    exactly for these operands (24-bit factors, integer pixels; only a contrast mean's far
    fraction is rounded, below anything float32 resolves), so rounding it to float32 once gives
    the same value; a float32 multiply then add would move some pixels by one level.
    Brightness is the blend with other = 0: images * ratio rounded once, as torchvision's."""
    scaled = images.to(torch.float32) * ratio
    alpha = (1.0 - ratio.double()).float().double()  # the float32 alpha the kernel uses
    out = torch.addcmul(scaled.double(), other.double(), alpha).float()
    return out.clamp_(0, 255).to(torch.uint8)


def colour_jitter(images: Tensor, draws: JitterDraws) -> Tensor:
    """ColorJitter on a uint8 (N, 3, H, W) batch, each image with its own factors and order.
    Each of the three ops is a blend (brightness with zeros, contrast with the mean of the
    image's grayscale, saturation with the grayscale), so each position is one blend whose
    partner and factor are picked per image, computed from that position's input."""
    device = images.device
    factors = draws.factors.to(device, non_blocking=True)
    order = draws.order.to(device, non_blocking=True)
    for position in range(len(JITTER_OPS)):
        op = order[:, position, None, None, None]  # (N, 1, 1, 1)
        # torchvision's grayscale in float32, floored for uint8 images (== truncation: >= 0)
        gray = F.rgb_to_grayscale(images).to(torch.float32)
        # the floored grayscale sums to integers below 2**24 for images up to 257 x 257, so
        # the batched mean equals the per-image one whatever the summation order
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        other = torch.where(op == 1, mean, gray).masked_fill(op == 0, 0.0)
        ratio = factors.gather(1, order[:, position, None])[:, :, None, None]
        images = _blend(images, other, ratio)
    return images


def _randaugment_steps() -> tuple[list[Step], Tensor]:
    """The distinct (op, sign) steps of RandAugment and table[op, negative], the index of
    each op's step for each sign (-1 for Identity: nothing to do)."""
    steps: list[Step] = []
    table = torch.full((len(RANDAUGMENT_OPS), 2), -1, dtype=torch.int64)
    for i, op in enumerate(RANDAUGMENT_OPS):
        if op == "Identity":
            continue
        bin_index = None if op in _UNBINNED else RANDAUGMENT_MAGNITUDE
        for negative in (False, True):
            step = Step(op, bin_index, negative and op in SIGNED_OPS)
            if step not in steps:
                steps.append(step)
            table[i, int(negative)] = steps.index(step)
    return steps, table


_RANDAUGMENT_STEPS = _randaugment_steps()


def randaugment(images: Tensor, draws: RandAugmentDraws) -> Tensor:
    """RandAugment on a uint8 (N, 3, H, W) batch with each image's own ops and signs, slot by
    slot, with torchvision's functional ops grouped (fill None: zeros, RandAugment's default)."""
    height, width = images.shape[-2:]
    steps, table = _RANDAUGMENT_STEPS

    def apply(part: Tensor, step_index: int) -> Tensor:
        step = steps[step_index]
        size = height if step.op == "TranslateY" else width
        mag = magnitude(step.op, step.bin_index, size, RANDAUGMENT_BINS)
        return apply_op(part, step.op, -mag if step.negative else mag, fill=None)

    for slot in range(RANDAUGMENT_NUM_OPS):
        step_of = table[draws.op[:, slot], draws.negative[:, slot].long()]
        images = apply_grouped(images, step_of, apply)
    return images


class BatchAugment:
    """An augmentation preset for uint8 NCHW batches on any device, random parameters from
    `draw`, float normalised output. CIFAR presets ("shike", "basic", "none"): the whole
    preset. ImageNet-style presets ("imagenet", "imagenet_jitter", "randaugment"): what
    follows the readers' crop and flip (colour ops, then to float and normalise)."""

    def __init__(self, kind: str) -> None:
        if kind not in CIFAR_AUGMENTS + IMAGENET_AUGMENTS:
            raise ValueError(
                f"augmenting on the device supports the presets "
                f"{CIFAR_AUGMENTS + IMAGENET_AUGMENTS}, not {kind!r}"
            )
        self.kind = kind
        self.mean, self.std = normalization(kind)

    def draw(self, n: int, generator: torch.Generator, size: int = 32) -> AugmentDraws | None:
        """The preset's random parameters for `n` images of side `size` from `generator`; None
        for "imagenet", whose random work (crop and flip) the readers did."""
        if self.kind in CIFAR_AUGMENTS:
            return draw(n, generator, size)
        if self.kind == "imagenet_jitter":
            return draw_jitter(n, generator)
        if self.kind == "randaugment":
            return draw_randaugment(n, generator)
        return None

    def _check(self, images: Tensor, draws: AugmentDraws | None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a uint8 NCHW batch of RGB images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if draws is None:
            return
        expected = {"imagenet_jitter": JitterDraws, "randaugment": RandAugmentDraws}.get(
            self.kind, Draws if self.kind in CIFAR_AUGMENTS else type(None)
        )
        if not isinstance(draws, expected):
            raise TypeError(f"{self.kind!r} takes {expected.__name__}, not {type(draws).__name__}")
        if len(draws) != len(images):
            raise ValueError(f"{len(draws)} images' draws for a batch of {len(images)}")

    def __call__(self, images: Tensor, draws: AugmentDraws | None) -> Tensor:
        """`images`: uint8 (N, 3, H, W). `draws` (from `draw`) for a random preset; None
        means evaluation (to float and normalise only)."""
        self._check(images, draws)
        # The readers batch crops in channels-last memory (stream_reader.collate_crops); the
        # ops below, and the model, take planar NCHW, a cheap copy on the device.
        images = images.contiguous()
        if isinstance(draws, Draws) and self.kind != "none":
            images = random_crop(images, draws.crop_top, draws.crop_left)
            images = horizontal_flip(images, draws.flip)
            if self.kind == "shike":
                images = autoaugment(images, draws)
        elif isinstance(draws, JitterDraws):
            images = colour_jitter(images, draws)
        elif isinstance(draws, RandAugmentDraws):
            images = randaugment(images, draws)
        out = F.to_dtype(images, torch.float32, scale=True)
        if isinstance(draws, Draws) and self.kind == "shike":
            out = cutout(out, draws.cutout_y, draws.cutout_x)
        return F.normalize(out, self.mean, self.std)


def augmented_batches(
    batches: Iterable[tuple[Tensor, Tensor]],
    augment: BatchAugment,
    seed: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """uint8 NCHW (images, labels) batches -> augmented float batches on `device`. The draws
    of the whole pass come from one generator seeded with `augmentation_seed(seed, "batches")`
    (seed: the epoch's, pipeline.seeding), so an epoch's augmentation is a function of its
    seed and batch order: a resumed run draws what an uninterrupted one would have."""
    generator = torch.Generator().manual_seed(augmentation_seed(seed, "batches"))
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        draws = augment.draw(len(images), generator, images.shape[-1])
        yield augment(images, draws), labels.to(device, non_blocking=True)


class FinishedBatches:
    """An evaluation split's batches on `device`, the uint8 ones finished as `augment`
    evaluates (to float, normalised; readers that already normalised hand over float, which
    passes as it is): re-iterable, one pass of `batches` per iteration, as the evaluation
    loops read a split once per evaluation."""

    def __init__(
        self, batches: Iterable[tuple[Tensor, Tensor]], augment: BatchAugment, device: torch.device
    ) -> None:
        self.batches = batches
        self.augment = augment
        self.device = device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.batches:
            images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = self.augment(images, None)
            yield images, labels.to(self.device, non_blocking=True)


def shuffled_batches(
    images: Tensor, labels: Tensor, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """An epoch of batches of a split kept whole (on the device): the order is the per-image
    loader's (`torch_reader.EpochSampler`, same seed), the last partial batch kept."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield images.index_select(0, index), labels.index_select(0, index)
