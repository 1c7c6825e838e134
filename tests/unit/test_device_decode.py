"""Source images decoded where the model trains (`data.decode_on`,
pipeline.data.readers.device_decode): the readers hand over encoded bytes, the training device
decodes and crops them. Here the device is the CPU (the same decoder as the CPU readers, so the
crops must be equal); on CUDA (nvJPEG) within the decoders' rounding (bench/gpu_session.sh runs
the CUDA test)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import SourceFormatError
from pipeline.data.manifest import read_manifest
from pipeline.data.readers.device_decode import decode_crops, decoded_batches, decodes_on_device
from pipeline.data.readers.stream_reader import make_stream_loader
from pipeline.seeding import epoch_seed
from pipeline.training.engine import run
from tests.helpers.jpeg_shards import write_source_dataset

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 24
CPU = torch.device("cpu")


def _data_cfg(**settings):
    overrides = {"data.augment": "imagenet", "data.image_size": SIZE, "data.loader_workers": 0}
    overrides |= settings
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()]).data


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 30 images, about one in eight each a grayscale JPEG, a CMYK JPEG or a PNG
    splits = {"train": [12, 9, 6, 3], "test": [2, 2, 2, 2]}
    uri, _ = write_source_dataset(tmp_path_factory.mktemp("src"), splits, rows_per_shard=7)
    return read_manifest(uri)


def test_decoding_on_the_device_gives_the_cpu_readers_crops(manifest):
    """The encoded batches of the streaming reader, decoded and cropped by `decoded_batches`,
    equal the uint8 crops the reader makes itself for the same epoch seed: same boxes, flips,
    pixels and batch order, PNG, grayscale and CMYK images included."""
    seed = epoch_seed(7, 2)
    cfg = _data_cfg()
    on_cpu = make_stream_loader(manifest, "train", cfg, 8, train=True, seed=seed)
    encoded = make_stream_loader(manifest, "train", cfg, 8, train=True, seed=seed, encoded=True)
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    pairs = list(zip(on_cpu, decoded_batches(encoded, seed, SIZE, CPU), strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's generator was used"
    assert len(pairs) == 4
    for (want, want_labels), (got, got_labels) in pairs:
        assert got.dtype == torch.uint8 and got.shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(got_labels, want_labels) and torch.equal(got, want)


def test_an_undecodable_image_is_named():
    blobs = [b"\xff\xd8\xff\xe0 not a jpeg", b"neither is this"]
    with pytest.raises(SourceFormatError, match="sample n01/a.JPEG"):
        decode_crops(blobs, ["n01/a.JPEG", "n02/b.JPEG"], [1, 2], SIZE, CPU)


@pytest.mark.parametrize(
    ("decode_on", "encoding", "cuda", "augment_on", "expected"),
    [
        ("cpu", "source", True, "auto", False),
        ("auto", "source", True, "auto", True),
        ("auto", "source", False, "auto", False),  # no CUDA: auto means cpu
        ("auto", "png", True, "auto", False),
        ("auto", "source", True, "loader", False),
        ("device", "source", True, "device", True),
        ("device", "source", False, "auto", "the training device is not CUDA"),
        ("device", "png", True, "auto", "s3://b/ds holds png images, not source JPEGs"),
        ("device", "source", True, "loader", "data.augment_on=loader augments on the CPU"),
    ],
)
def test_decode_on_resolves_or_says_why_it_cannot(decode_on, encoding, cuda, augment_on, expected):
    cfg = _data_cfg(**{"data.decode_on": decode_on, "data.augment_on": augment_on})
    if isinstance(expected, bool):
        assert decodes_on_device(cfg, encoding, cuda, "s3://b/ds") is expected
        return
    with pytest.raises(ConfigError) as err:
        decodes_on_device(cfg, encoding, cuda, "s3://b/ds")
    message = str(err.value)
    assert message.startswith("data.decode_on=device, but ") and expected in message
    assert message.endswith("use data.decode_on=auto or cpu")


def test_the_engine_refuses_decode_on_device_without_cuda(manifest):
    overrides = {"data.uri": manifest.uri, "data.decode_on": "device", "train.device": "cpu"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()] + ["data.augment=imagenet"])
    with pytest.raises(ConfigError, match="the training device is not CUDA"):
        run(cfg, log=lambda line: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_crops_match_the_cpu_decoders_within_rounding(manifest):
    """nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo: the same
    boxes and flips, pixels within a few levels on average."""
    seed = epoch_seed(7, 2)
    cfg = _data_cfg()
    on_cpu = make_stream_loader(manifest, "train", cfg, 8, train=True, seed=seed)
    encoded = make_stream_loader(manifest, "train", cfg, 8, train=True, seed=seed, encoded=True)
    cuda = torch.device("cuda")
    for (want, _), (got, _) in zip(on_cpu, decoded_batches(encoded, seed, SIZE, cuda), strict=True):
        assert got.device.type == "cuda"
        diff = (got.cpu().float() - want.float()).abs()
        assert diff.mean() < 2.0, f"mean difference {diff.mean():.2f} levels"
