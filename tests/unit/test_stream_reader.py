"""The Ray-free streaming reader of source-image datasets (pipeline.data.readers.stream_reader), its
decoder (pipeline.data.codec) and the engine on such a dataset. Datasets are generated JPEGs
of varying sizes in Parquet shards (tests/helpers/jpeg_shards.py)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import DataError, IntegrityError, SourceFormatError
from pipeline.data.codec import decode_rgb
from pipeline.data.manifest import read_manifest
from pipeline.data.readers.stream_reader import make_stream_loader
from pipeline.seeding import epoch_seed
from pipeline.training.engine import run
from tests.helpers.jpeg_shards import write_source_dataset

# torchvision.io's decoders warn on every call that 0.29 deprecated them (pipeline.data.codec).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 24
# One image per class: a label names its image, so augmented pixels can be matched by image.
UNIQUE = {"train": [1] * 20, "test": [1] * 20}


def _data_cfg(workers: int = 0, augment: str = "imagenet", augment_on: str = "auto"):
    overrides = [f"data.augment={augment}", f"data.image_size={SIZE}"]
    overrides += [f"data.loader_workers={workers}", f"data.augment_on={augment_on}"]
    return load_config(None, overrides).data


def _epoch(manifest, split="train", *, workers=0, seed=0, batch=4, augment_on="auto", **kwargs):
    cfg = _data_cfg(workers, augment_on=augment_on)
    loader = make_stream_loader(
        manifest, split, cfg, batch, train=split == "train", seed=seed, **kwargs
    )
    return list(loader)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


def _by_label(batches) -> dict[int, torch.Tensor]:
    return {int(y): x for images, labels in batches for x, y in zip(images, labels, strict=True)}


@pytest.fixture(scope="module")
def unique(tmp_path_factory):
    uri, _ = write_source_dataset(tmp_path_factory.mktemp("unique"), UNIQUE, rows_per_shard=3)
    return read_manifest(uri)


@pytest.fixture(scope="module")
def longtailed(tmp_path_factory):
    splits = {"train": [12, 7, 4, 2], "val": [2, 2, 2, 2], "test": [5, 5, 5, 5]}
    uri, encoded = write_source_dataset(tmp_path_factory.mktemp("lt"), splits, rows_per_shard=5)
    return read_manifest(uri), encoded


# ----------------------------------------------------------------------------------- decoding


def _encoded(mode: str, fmt: str, size=(37, 23)) -> tuple[bytes, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue(), image


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("RGB", "BMP"),
    ],
)
def test_every_image_decodes_to_rgb_uint8_with_pillows_pixels(mode, fmt):
    blob, image = _encoded(mode, fmt)
    pixels = decode_rgb(blob)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 37, 23)
    expected = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected)


def test_an_undecodable_image_is_an_error_naming_it():
    blob, _ = _encoded("RGB", "JPEG")
    for bad in (b"not an image", blob[: len(blob) // 3]):
        with pytest.raises(SourceFormatError, match="train/c1/7.jpg"):
            decode_rgb(bad, "train/c1/7.jpg")


# ---------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("augment_on, dtype", [("auto", torch.uint8), ("loader", torch.float32)])
def test_training_batches_are_fixed_size_crops_covering_the_split_once(
    longtailed, augment_on, dtype
):
    """uint8 crops for a device that finishes the preset (the default), else normalised floats."""
    manifest, _ = longtailed
    batches = _epoch(manifest, batch=4, augment_on=augment_on)
    assert all(x.shape[1:] == (3, SIZE, SIZE) and x.dtype == dtype for x, _ in batches)
    # uint8 crops in channels-last memory, each image's pixels interleaved as decoded
    channels_last = dtype == torch.uint8
    assert all(x.permute(0, 2, 3, 1).is_contiguous() == channels_last for x, _ in batches)
    assert all(y.dtype == torch.int64 for _, y in batches)
    assert [len(y) for _, y in batches] == [4] * 6 + [1]
    labels = Counter(int(v) for _, y in batches for v in y)
    assert [labels[c] for c in range(4)] == manifest.class_counts


@pytest.mark.parametrize("split", ["train", "test"])
def test_uint8_crops_are_the_loader_paths_pixels_before_normalising(unique, split):
    """Same seed, same draws: the uint8 crop (or evaluation crop) of each image is what the
    per-image preset ("imagenet": crop + flip) turns into its float output."""
    seed = epoch_seed(5, 2)
    crops = _by_label(_epoch(unique, split, seed=seed))
    floats = _by_label(_epoch(unique, split, seed=seed, augment_on="loader"))
    assert crops.keys() == floats.keys() and crops[0].dtype == torch.uint8
    for label, crop in crops.items():
        torch.testing.assert_close(_normalised(crop), floats[label])


def test_an_epoch_is_a_function_of_seed_and_epoch(unique):
    first, again = _epoch(unique, seed=epoch_seed(0, 0)), _epoch(unique, seed=epoch_seed(0, 0))
    second = _epoch(unique, seed=epoch_seed(0, 1))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    order = [int(v) for _, y in first for v in y]
    assert order != [int(v) for _, y in second for v in y], "each epoch reads in a new order"
    a, b = _by_label(first), _by_label(second)
    assert sum(not torch.equal(a[k], b[k]) for k in a) >= 18, "each epoch augments afresh"


def test_augmentation_depends_on_seed_epoch_and_image_not_on_the_workers(unique):
    seed = epoch_seed(7, 3)
    main = _epoch(unique, seed=seed, workers=0)
    one = _epoch(unique, seed=seed, workers=1)
    two = _epoch(unique, seed=seed, workers=2)
    # 0 and 1 workers read as one stream: the very same batches
    assert len(main) == len(one)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(main, one, strict=True)
    )
    # 2 workers share the shards out (other batches), each image augmented the same
    by_image, by_image_two = _by_label(main), _by_label(two)
    assert by_image.keys() == by_image_two.keys() == set(range(20))
    assert all(torch.equal(by_image[k], by_image_two[k]) for k in by_image)


def test_streaming_leaves_the_callers_rng_alone(unique):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _epoch(unique, seed=1, workers=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_evaluation_is_deterministic_resize_and_centre_crop(longtailed):
    manifest, encoded = longtailed
    first, again = _epoch(manifest, "test"), _epoch(manifest, "test")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    images = torch.cat([x for x, _ in first])
    assert images.shape == (20, 3, SIZE, SIZE) and images.dtype == torch.uint8
    # the first stored row, through Resize(round(24 / 0.875)) + CenterCrop(24)
    from torchvision.transforms import v2

    pixels = decode_rgb(encoded["test"][0])
    resized = v2.functional.center_crop(v2.functional.resize(pixels, [27], antialias=True), [SIZE])
    assert torch.equal(images[0], resized)


def test_per_class_keeps_the_first_images_of_each_class(longtailed):
    manifest, _ = longtailed
    batches = _epoch(manifest, "test", per_class=2, workers=2)
    labels = Counter(int(v) for _, y in batches for v in y)
    assert labels == {0: 2, 1: 2, 2: 2, 3: 2}


def test_an_altered_shard_is_an_error_naming_it(tmp_path):
    uri, _ = write_source_dataset(tmp_path, UNIQUE, rows_per_shard=5)
    manifest = read_manifest(uri)
    victim = Path(uri) / manifest.splits["train"].shards[2].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    for workers in (0, 1):  # across the worker boundary too
        with pytest.raises(IntegrityError, match=victim.name):
            _epoch(manifest, workers=workers)
    victim.unlink()
    missing = f"{victim.name} listed in the manifest is missing"
    with pytest.raises(IntegrityError, match=missing):
        _epoch(manifest)
    with pytest.raises(IntegrityError, match=missing):  # the per-class selection reads labels
        make_stream_loader(manifest, "train", _data_cfg(), 4, False, per_class=1)


def test_shards_are_read_as_the_stream_reaches_them(tmp_path):
    """Many shards, a buffer of 3 rows: the first batch arrives after one or two shards were
    read. Every shard altered after that fails the epoch when the stream reaches it, which it
    could not if the reader had loaded the split before handing out its first batch."""
    uri, _ = write_source_dataset(tmp_path, {"train": [4] * 12, "test": [1] * 12}, rows_per_shard=4)
    manifest = read_manifest(uri)
    assert len(manifest.splits["train"].shards) == 12
    batches = iter(make_stream_loader(manifest, "train", _data_cfg(), 2, True, buffer_size=3))
    first = next(batches)
    assert first[0].shape == (2, 3, SIZE, SIZE)
    for shard in manifest.splits["train"].shards:
        path = Path(uri) / shard.path
        path.write_bytes(path.read_bytes()[::-1])
    with pytest.raises(IntegrityError, match="altered or corrupt"):
        list(batches)


def test_a_loader_hashes_each_shard_once_and_checks_its_size_every_epoch(tmp_path):
    """The sha256 of a shard is checked the first time the loader's workers read it, as the Ray
    Data path verifies a split once per run: a later rewrite of the same size reaches the next
    epoch (its workers are new processes: they learn the shard was hashed), a new loader refuses
    it, and one of another size fails the next epoch."""
    uri, encoded = write_source_dataset(tmp_path, UNIQUE, rows_per_shard=5)
    manifest = read_manifest(uri)
    loader = make_stream_loader(manifest, "train", _data_cfg(workers=2), 4, True, encoded=True)
    assert sorted(b for batch in loader for b in batch[0]) == sorted(encoded["train"])
    blob = encoded["train"][0]
    victim = next(
        Path(uri) / s.path
        for s in manifest.splits["train"].shards
        if blob[-200:] in (Path(uri) / s.path).read_bytes()
    )
    data = bytearray(victim.read_bytes())
    at = data.find(blob[-200:]) + 50
    data[at] ^= 0xFF
    victim.write_bytes(bytes(data))
    altered = bytearray(blob)
    altered[len(blob) - 150] ^= 0xFF
    loader.dataset.set_seed(1)
    assert bytes(altered) in [b for batch in loader for b in batch[0]]
    with pytest.raises(IntegrityError, match="altered or corrupt"):
        list(make_stream_loader(manifest, "train", _data_cfg(workers=2), 4, True, encoded=True))
    victim.write_bytes(bytes(data) + b"\0")
    with pytest.raises(IntegrityError, match=f"{victim.name} is .* bytes but the manifest says"):
        list(loader)


def test_a_cifar_preset_or_class_ordered_rows_are_refused(tmp_path, longtailed):
    manifest, _ = longtailed
    with pytest.raises(DataError, match="data.augment='shike'.*varying size"):
        make_stream_loader(manifest, "train", _data_cfg(augment="shike"), 4, True)
    uri, _ = write_source_dataset(tmp_path, UNIQUE, train_row_order="class")
    with pytest.raises(DataError, match="'class' order"):
        make_stream_loader(read_manifest(uri), "train", _data_cfg(), 4, True)


# ------------------------------------------------------------------------------------ engine


def test_the_engine_trains_a_4_stage_shike_on_streamed_source_images(longtailed):
    manifest, _ = longtailed
    overrides = {
        "data.uri": manifest.uri,
        "data.augment": "imagenet",
        "data.image_size": 32,
        "data.loader_workers": 0,
        "data.test_per_class": 2,
        "model.arch": "shike_resnet50",
        "optim.epochs": 1,
        "optim.stage2_start": 1,
        "optim.batch_size": 13,
        "optim.warmup_epochs": 0,
        "train.device": "cpu",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    lines: list[str] = []
    result = run(cfg, log=lines.append)
    assert lines[0].startswith("data: generated_lt train 25 / val 8 / test 8 images (streamed")
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["loss"])
    assert result["test"]["num_samples"] == 8


@pytest.mark.parametrize(
    ("augment", "decode_on_device"),
    [("imagenet_jitter", False), ("randaugment", False), ("imagenet_jitter", True)],
)
def test_resume_with_uint8_crops_finished_on_the_device_is_bit_identical(
    tmp_path, longtailed, augment, decode_on_device
):
    """Streamed uint8 crops, the colour ops drawn per batch on the device: a run stopped after
    each epoch and resumed from its checkpoint ends with the uninterrupted run's weights; also
    with the crops made on the device from encoded batches (`data.decode_on`)."""
    from pipeline.training.engine import streamed_inputs
    from pipeline.training.session import TrainingSession

    manifest, _ = longtailed
    overrides = {
        "data.uri": manifest.uri,
        "data.augment": augment,
        "data.image_size": 32,
        "data.loader_workers": 0,
        "model.arch": "resnet32",  # any model: the input path is under test
        "optim.epochs": 3,
        "optim.stage2_start": 2,
        "optim.batch_size": 5,  # 25 training images: no batch of one for BatchNorm
        "optim.warmup_epochs": 0,
        "train.device": "cpu",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    cpu = torch.device("cpu")
    counts = list(manifest.class_counts)
    straight = TrainingSession(cfg, counts, cpu)
    straight.start(None)
    for _ in range(3):
        straight.run_epoch(streamed_inputs(cfg, manifest, cpu, decode_on_device).train_batches)

    session = TrainingSession(cfg, counts, cpu)
    session.start(None)
    for _ in range(3):  # each epoch in a fresh session from the last checkpoint
        session.run_epoch(streamed_inputs(cfg, manifest, cpu, decode_on_device).train_batches)
        session.save(tmp_path)
        torch.manual_seed(12345)  # the resumed run must not depend on the global RNG
        session = TrainingSession(cfg, counts, cpu)
        session.start(tmp_path)

    a, b = straight.model.state_dict(), session.model.state_dict()
    assert session.epoch == 3 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
