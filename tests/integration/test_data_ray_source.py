"""Ray Data over "source" datasets (original JPEGs of varying sizes): read, decoded and brought
to `image_size` in one task per shard, so Ray Train workers get fixed-size batches; each image
augmented exactly as the Ray-free streaming reader augments it in the same epoch, the shards
read in a new order each epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.data.manifest import read_manifest
from pipeline.data.readers.device_decode import decoded_batches
from pipeline.data.readers.stream_reader import make_stream_loader
from pipeline.data.shards import read_split_table
from pipeline.seeding import epoch_seed
from tests.helpers.jpeg_shards import write_source_dataset

pytestmark = [
    pytest.mark.integration,
    # torchvision.io's decoders warn on every call that 0.29 deprecated them (pipeline.data.codec)
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]

SIZE = 24


def test_source_images_reach_the_trainer_as_fixed_size_batches(ray_cluster, tmp_path):
    from pipeline.data.readers.ray_reader import training_datasets

    splits = {"train": [9, 5, 3, 1], "val": [1, 1, 1, 1], "test": [2, 2, 2, 2]}
    uri, _ = write_source_dataset(tmp_path, splits, rows_per_shard=5)
    manifest = read_manifest(uri)
    datasets = training_datasets(manifest, "imagenet_jitter", seed=0, image_size=SIZE)
    assert set(datasets) == {"train", "val", "test"}
    for split, dataset in datasets.items():
        labels = []
        for batch in dataset.iter_torch_batches(batch_size=4):
            images = batch["image"]
            assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
            assert batch["label"].dtype == torch.int64
            labels += batch["label"].tolist()
        assert np.bincount(labels, minlength=4).tolist() == manifest.splits[split].class_counts


def test_source_training_split_reads_its_shards_in_a_new_order_each_epoch(ray_cluster, tmp_path):
    """Task i of an epoch reads the i-th shard of an order drawn from (seed, epoch); Ray's
    output order is pinned (preserve_order), so only that order can differ between epochs. An
    evaluation split keeps manifest order."""
    from ray.data import DataContext

    from pipeline.data.readers.ray_reader import split_dataset

    splits = {"train": [9, 5, 3, 1], "test": [2, 2, 2, 2]}
    uri, _ = write_source_dataset(tmp_path, splits, rows_per_shard=3)
    manifest = read_manifest(uri)
    assert len(manifest.splits["train"].shards) == 6  # 720 orders: a repeat is no accident
    options = DataContext.get_current().execution_options
    was, options.preserve_order = options.preserve_order, True
    kwargs = {"augment": "imagenet", "image_size": SIZE, "uint8": True, "with_ids": True}
    try:
        train = split_dataset(manifest, "train", train=True, seed=0, **kwargs)
        test = split_dataset(manifest, "test", train=False, **kwargs)
        epochs = [
            [[str(i) for b in ds.iter_batches() for i in b["sample_id"]] for _ in range(2)]
            for ds in (train, test)
        ]
    finally:
        options.preserve_order = was
    (first, second), (test_first, test_second) = epochs
    assert sorted(first) == sorted(second) and len(first) == 18
    assert first != second, "the training split must be read in a new order each epoch"
    stored = read_split_table(manifest, "test").column("sample_id").to_pylist()
    assert test_first == test_second == [str(i) for i in stored]


@pytest.mark.parametrize("augment_on", ["device", "loader", "device, decoded there"])
def test_ray_data_augments_each_image_as_the_ray_free_reader_does(
    ray_cluster, tmp_path, augment_on
):
    """One image per class, so a label names its image: the first execution (epoch 0) of the
    Ray dataset and the streaming loader at epoch_seed(seed, 0) give every image the same
    pixels (uint8 crops for the device, or the whole preset as floats), batches and task
    boundaries notwithstanding; also when Ray Data ships the encoded images and the training
    device crops them (`data.decode_on`, here on the CPU)."""
    from pipeline.data.readers.ray_reader import as_nchw, split_dataset

    uri, _ = write_source_dataset(tmp_path, {"train": [1] * 16}, rows_per_shard=3)
    manifest = read_manifest(uri)
    encoded = augment_on == "device, decoded there"
    dataset = split_dataset(
        manifest,
        "train",
        augment="randaugment",
        train=True,
        seed=3,
        batch_size=5,
        image_size=SIZE,
        uint8=augment_on != "loader",
        encoded=encoded,
    )
    if encoded:  # as a Ray Train worker reads and decodes them (data.decode_on)
        from pipeline.distributed.worker import encoded_batches

        cpu = torch.device("cpu")
        batches = decoded_batches(encoded_batches(dataset, 5), epoch_seed(3, 0), SIZE, cpu)
    else:
        batches = (
            (as_nchw(b["image"]), b["label"]) for b in dataset.iter_torch_batches(batch_size=5)
        )
    ray_pixels = {
        int(label): image
        for images, labels in batches
        for image, label in zip(images, labels, strict=True)
    }
    settings = ["data.augment=randaugment", f"data.image_size={SIZE}"]
    cfg = load_config(None, [*settings, f"data.augment_on={augment_on.split(',')[0]}"]).data
    loader = make_stream_loader(manifest, "train", cfg, 4, train=True, seed=epoch_seed(3, 0))
    stream_pixels = {
        int(label): image
        for images, labels in loader
        for image, label in zip(images, labels, strict=True)
    }
    assert ray_pixels.keys() == stream_pixels.keys() == set(range(16))
    for label, pixels in ray_pixels.items():
        torch.testing.assert_close(pixels, stream_pixels[label], msg=f"image of class {label}")


def test_source_datasets_need_an_image_size_and_a_resizing_preset(tmp_path):
    from pipeline.data.readers.ray_reader import split_dataset

    uri, _ = write_source_dataset(tmp_path, {"train": [2, 1]}, rows_per_shard=3)
    manifest = read_manifest(uri)
    with pytest.raises(ValueError, match="need an image_size"):
        split_dataset(manifest, "train", augment="imagenet", train=True)
    with pytest.raises(DataError, match="data.augment='shike'"):
        split_dataset(manifest, "train", augment="shike", train=True, image_size=SIZE)


def test_a_split_held_back_by_backpressure_leaves_the_cores_to_the_trainers(ray_cluster, tmp_path):
    """Ray Train's workers read a split through Ray Data's SplitCoordinator actor, which runs
    the executor: it reads ahead within its object store budget, then waits for the trainers.
    Unpaced, its loop goes round without waiting while backpressure holds its tasks, spinning
    on a core beside the trainers (`ray_reader._pace_the_scheduling_loop`). Here both consumers
    pause after a batch: over 2 s the coordinator uses a fraction of a core, and the whole
    split still arrives."""
    import os
    import threading
    import time

    import psutil
    import ray
    from ray.data import DataContext, ExecutionResources

    from pipeline.data.readers.ray_reader import split_dataset

    uri, _ = write_source_dataset(tmp_path, {"train": [24, 24]}, rows_per_shard=4)
    # A budget of a few images: the executor reads a little ahead, then holds the rest back.
    context = DataContext.get_current()
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = ExecutionResources(object_store_memory=20_000)
    try:
        dataset = split_dataset(read_manifest(uri), "train", image_size=SIZE, augment="imagenet")
    finally:
        context.execution_options.resource_limits = limits
    splits = dataset.streaming_split(2, equal=True)
    paused, resume, rows = threading.Barrier(3), threading.Event(), [0, 0]

    def consume(k: int) -> None:
        for i, batch in enumerate(splits[k].iter_batches(batch_size=1, prefetch_batches=0)):
            if i == 0:
                paused.wait()
                resume.wait()
            rows[k] += len(batch["label"])

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    paused.wait(timeout=60)
    time.sleep(1.0)  # the read tasks it may run have run
    pid = ray.get(splits[0]._coord_actor.__ray_call__.remote(lambda _: os.getpid()))
    coordinator = psutil.Process(pid)
    cpu_before, wall_before = sum(coordinator.cpu_times()[:2]), time.perf_counter()
    time.sleep(2.0)
    busy = (sum(coordinator.cpu_times()[:2]) - cpu_before) / (time.perf_counter() - wall_before)
    resume.set()
    for thread in threads:
        thread.join(timeout=60)
    assert busy < 0.25, f"the coordinator kept {busy:.0%} of a core busy, held back"
    assert sum(rows) == 48
