import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from pipeline.data import DataError
from pipeline.data.readers.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cutout,
    apply_to_batch,
    build_transform,
    evaluation_crop,
    normalization,
    require_resizing_preset,
    transform_seeded,
)


def _images(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_test_transform_is_exact_normalisation():
    imgs = _images()
    out = apply_to_batch(build_transform("shike", train=False), imgs)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)


def test_train_transform_is_random_but_seedable():
    imgs = _images()
    t = build_transform("shike", train=True)
    torch.manual_seed(1)
    a = apply_to_batch(t, imgs)
    torch.manual_seed(1)
    b = apply_to_batch(t, imgs)
    c = apply_to_batch(t, imgs)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    cut = Cutout(16)
    sizes = set()
    for _ in range(200):
        out = cut(torch.ones(3, 32, 32))
        zero = (out == 0).all(dim=0)
        rows, cols = zero.any(dim=1).sum().item(), zero.any(dim=0).sum().item()
        assert zero.sum().item() == rows * cols  # a rectangle
        assert 1 <= rows <= 16 and 1 <= cols <= 16
        sizes.add((rows, cols))
    assert (16, 16) in sizes and any(r < 16 or c < 16 for r, c in sizes)  # clipped at borders


# ------------------------------------------------- ImageNet-style presets (images of any size)

IMAGENET_PRESETS = ("imagenet", "imagenet_jitter", "randaugment")


def _any_size_images(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(375, 500), (500, 333), (64, 64), (30, 200), (17, 23)]
    return [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("kind", IMAGENET_PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_imagenet_presets_bring_any_size_to_image_size(kind, train):
    t = build_transform(kind, train=train, image_size=40)
    for image in _any_size_images():
        out = transform_seeded(t, image, 5)
        assert out.shape == (3, 40, 40) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", IMAGENET_PRESETS)
def test_imagenet_training_transform_is_a_function_of_the_seed(kind):
    t = build_transform(kind, train=True, image_size=32)
    image = _any_size_images()[0]
    a, b = transform_seeded(t, image, 11), transform_seeded(t, image, 11)
    assert torch.equal(a, b)
    assert sum(not torch.equal(a, transform_seeded(t, image, s)) for s in range(12, 20)) >= 7


def test_imagenet_evaluation_resizes_the_shorter_side_then_centre_crops():
    image = _any_size_images()[0]  # 375 x 500
    out = build_transform("randaugment", train=False, image_size=224)(image)
    resized = v2.functional.resize(image, [256], antialias=True)  # round(224 / 0.875)
    assert resized.shape[-2:] == (256, 341)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (v2.functional.center_crop(resized, [224]).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)
    crop = evaluation_crop(224)(image)  # what the registered model is fed
    assert crop.dtype == torch.uint8
    assert torch.equal(crop, v2.functional.center_crop(resized, [224]))


def test_each_preset_names_its_normalisation():
    assert normalization("shike") == (CIFAR_MEAN, CIFAR_STD)
    assert normalization("imagenet_jitter") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="autoaugment"):
        normalization("autoaugment")


def test_images_of_varying_size_need_a_resizing_preset():
    require_resizing_preset("imagenet", "s3://b/imagenet_lt")
    with pytest.raises(DataError, match="data.augment='basic'.*s3://b/imagenet_lt"):
        require_resizing_preset("basic", "s3://b/imagenet_lt")
