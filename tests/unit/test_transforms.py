import numpy as np
import torch

from pipeline.data.transforms import CIFAR_MEAN, CIFAR_STD, Cutout, apply_to_batch, build_transform


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
