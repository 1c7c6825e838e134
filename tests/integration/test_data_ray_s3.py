"""Prepared shards on a real S3 server (moto, 127.0.0.1) streamed by Ray Data into a 2-worker
Ray Train run: each worker gets a disjoint part, together they cover the split once per epoch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers.cifar_archives import write_parquet_folder

pytestmark = pytest.mark.integration


@pytest.fixture
def own_s3(monkeypatch):
    """A moto server of this test's own: the Ray Data readers must not load the session's one."""
    from tests.helpers.s3_server import FAKE_CREDENTIALS, MotoServer

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in FAKE_CREDENTIALS.items():
        if value:
            monkeypatch.setenv(key, value)
    server = MotoServer().start()
    yield server
    server.stop()


def test_two_train_workers_cover_the_s3_split_once_per_epoch(ray_cluster, own_s3, tmp_path):
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import split_dataset
    from pipeline.data.shards import load_split
    from pipeline.storage import S3Options, create_bucket

    write_parquet_folder(tmp_path / "raw", train_per_class=20, test_per_class=2)
    options = S3Options(endpoint_url=own_s3.endpoint_url, region="us-east-1")
    create_bucket("s3://ray-stream", options)
    uri = "s3://ray-stream/datasets/tiny"
    # IF 1 keeps all 200 training images: an even count, so Ray's equal split drops nothing.
    prepare_dataset(
        "cifar10", str(tmp_path / "raw"), uri, 1.0, val_per_class=0, shard_mb=0.05, s3=options
    )
    manifest = read_manifest(uri, options)
    assert len(manifest.splits["train"].shards) > 1  # several shards to distribute
    expected = sorted(load_split(manifest, "train").sample_ids.tolist())  # through pyarrow
    assert len(expected) == 200

    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def loop(config):
        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            ids = []
            for batch in shard.iter_batches(batch_size=16, batch_format="numpy"):
                assert (
                    batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == np.float32
                )
                ids += [str(i) for i in batch["sample_id"]]
            (config["out"] / f"{epoch}-{rank}.json").write_text(json.dumps(ids))
            ray.train.report({"epoch": epoch})

    dataset = split_dataset(manifest, "train", augment="shike", train=True, seed=0, with_ids=True)
    TorchTrainer(
        loop,
        train_loop_config={"out": out_dir},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name="s3-stream", storage_path=str(tmp_path / "runs")),
    ).fit()

    for epoch in range(2):
        a = json.loads((out_dir / f"{epoch}-0.json").read_text())
        b = json.loads((out_dir / f"{epoch}-1.json").read_text())
        assert a and b and not set(a) & set(b), "workers must receive disjoint rows"
        assert sorted(a + b) == expected, "together the workers cover the split exactly once"


def test_training_split_reshuffles_its_shards_every_epoch(ray_cluster, tmp_path):
    """Each execution (epoch) of a training split reads the shards in a new seeded order; an
    evaluation split keeps manifest order. Ray's output order is pinned (preserve_order) so
    that only the file order can differ between the two epochs."""
    from ray.data import DataContext

    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import split_dataset

    write_parquet_folder(tmp_path / "raw", train_per_class=20, test_per_class=2)
    uri = str(tmp_path / "tiny")
    prepare_dataset("cifar10", str(tmp_path / "raw"), uri, 1.0, val_per_class=0, shard_mb=0.01)
    manifest = read_manifest(uri)
    assert len(manifest.splits["train"].shards) >= 6  # 720 orders: a repeat is no accident

    options = DataContext.get_current().execution_options
    was, options.preserve_order = options.preserve_order, True
    try:

        def epochs(ds) -> list[list[str]]:
            return [
                [str(i) for b in ds.iter_batches(batch_format="numpy") for i in b["sample_id"]]
                for _ in range(2)
            ]

        train = epochs(split_dataset(manifest, "train", train=True, seed=0, with_ids=True))
        test = epochs(split_dataset(manifest, "test", train=False, with_ids=True))
    finally:
        options.preserve_order = was
    assert sorted(train[0]) == sorted(train[1]) and len(train[0]) == 200
    assert train[0] != train[1], "the training split must be read in a new order each epoch"
    assert test[0] == test[1]


def test_training_split_of_one_shard_streams_in_several_blocks(ray_cluster, tmp_path):
    """A split stored as one shard must still reach the trainer a few hundred rows at a time:
    Ray 2.60's default (V2) Parquet reader read such a shard as a single block, so the epoch's
    whole augmentation ran in one task and the first batch waited for all of it. The reader
    choice stays inside our datasets: the caller's DataContext is left as it was."""
    from ray.data import DataContext

    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import split_dataset

    write_parquet_folder(tmp_path / "raw", train_per_class=300, test_per_class=1)
    uri = str(tmp_path / "one-shard")
    prepare_dataset("cifar10", str(tmp_path / "raw"), uri, 1.0, val_per_class=0)
    manifest = read_manifest(uri)
    assert len(manifest.splits["train"].shards) == 1 and manifest.splits["train"].num_rows == 3000

    context = DataContext.get_current()
    reader_before = context.use_datasource_v2
    dataset = split_dataset(manifest, "train", train=True, seed=0)
    assert context.use_datasource_v2 == reader_before
    blocks = [bundle.num_rows() for bundle in dataset.iter_internal_ref_bundles()]
    assert sum(blocks) == 3000
    assert len(blocks) >= 3, f"one shard arrived in {len(blocks)} block(s) of {blocks} rows"


def test_training_augmentation_is_a_function_of_seed_epoch_and_image(ray_cluster, tmp_path):
    """Ray Data tasks augment each image from (run seed, epoch, sample id): two datasets of one
    seed give every image the same pixels in the same epoch, however the rows are cut into
    batches for the tasks; the next epoch and another seed give new ones."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import split_dataset

    write_parquet_folder(tmp_path / "raw", train_per_class=10, test_per_class=1)
    uri = str(tmp_path / "tiny")
    prepare_dataset("cifar10", str(tmp_path / "raw"), uri, 1.0, val_per_class=0)
    manifest = read_manifest(uri)

    def epochs(seed: int, task_batch: int) -> list[dict[str, bytes]]:
        ds = split_dataset(
            manifest, "train", train=True, seed=seed, batch_size=task_batch, with_ids=True
        )
        return [
            {
                str(i): image.tobytes()
                for b in ds.iter_batches(batch_format="numpy")
                for i, image in zip(b["sample_id"], b["image"], strict=True)
            }
            for _ in range(2)
        ]

    run, rerun, other_seed = epochs(0, 256), epochs(0, 7), epochs(1, 256)
    assert len(run[0]) == len(run[1]) == 100
    assert rerun == run, "the same seed must give each image the same augmentation per epoch"
    for a, b in [(run[0], run[1]), (run[0], other_seed[0])]:
        changed = sum(a[i] != b[i] for i in a)
        assert changed > 90, f"only {changed} of 100 images changed with the epoch or the seed"


def test_uint8_training_split_is_the_decoded_images_unaugmented(ray_cluster, tmp_path):
    """For workers that augment on their own device (data.augment_on=device), the training
    split arrives as the stored images, decoded to uint8 (H, W, 3), each once, untouched."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import split_dataset
    from pipeline.data.shards import load_split

    write_parquet_folder(tmp_path / "raw", train_per_class=12, test_per_class=2)
    uri = str(tmp_path / "tiny")
    prepare_dataset("cifar10", str(tmp_path / "raw"), uri, 1.0, val_per_class=0)
    manifest = read_manifest(uri)
    rows = list(split_dataset(manifest, "train", train=True, seed=0, uint8=True).iter_rows())
    assert {(r["image"].dtype, r["image"].shape) for r in rows} == {
        (np.dtype(np.uint8), (32, 32, 3))
    }
    stored = load_split(manifest, "train")
    expected = sorted(
        (int(label), image.tobytes())
        for image, label in zip(stored.images, stored.labels, strict=True)
    )
    assert sorted((int(r["label"]), r["image"].tobytes()) for r in rows) == expected
