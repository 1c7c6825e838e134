"""A run's data is part of its identity (issue 35).

Points 1 and 3 of the issue: a relaunch of a run name with other data (a CIFAR-10-LT IF-10
split where the run was started on IF 100) resumed the IF-100 checkpoint without a word and
logged the other splits into the same MLflow run. Now the launch's preflight compares the data
with the record the first launch left in the run's folder, and the checkpoint itself carries
the manifest hash; and each split's MLflow dataset input has its own digest (from its shards'
checksums), so two datasets sharing a split share that split's digest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare.from_raw import prepare_dataset
from pipeline.distributed import run_storage
from pipeline.distributed.preflight import preflight
from pipeline.tracking import lineage, runs
from pipeline.training.checkpoint import CheckpointError
from pipeline.training.session import TrainingSession
from tests.helpers.cifar_archives import write_parquet_folder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


class LaunchRefused(RuntimeError):
    """The caller's error type: what `preflight` raises a failed check as."""


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    """Two small CIFAR-10-LT datasets prepared from the same images: IF 10 and IF 5."""
    base = tmp_path_factory.mktemp("identity")
    write_parquet_folder(base / "raw", train_per_class=20, test_per_class=2)
    out = {}
    for name, factor in (("if10", 10.0), ("if5", 5.0)):
        prepare_dataset("cifar10", str(base / "raw"), str(base / name), factor, val_per_class=2)
        out[name] = str(base / name)
    return out


def _cfg(tmp_path: Path, data_uri: str, **extra):
    values = {
        "data.uri": data_uri,
        "cluster.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _launch(cfg, name: str = "run-a"):
    """A launch that passed its checks and started its run."""
    with preflight(cfg, name, LaunchRefused) as launch:
        launch.record_data()
        return launch


def test_a_launch_refused_after_its_checks_records_no_data(datasets, tmp_path):
    with preflight(_cfg(tmp_path, datasets["if10"]), "run-a", LaunchRefused):
        pass  # e.g. refused for want of Ray's State API: the run never started
    assert run_storage.data_record(_cfg(tmp_path, datasets["if10"]), "run-a") is None
    _launch(_cfg(tmp_path, datasets["if5"]))  # so other data is no relaunch to refuse


def test_first_launch_records_the_data_and_the_same_data_is_accepted(datasets, tmp_path):
    launch = _launch(_cfg(tmp_path, datasets["if10"]))
    record = json.loads((tmp_path / "runs" / "run-a" / run_storage.DATA_RECORD).read_text())
    assert record["dataset"] == "cifar10" and record["imbalance_factor"] == 10.0
    # The hash MLflow tags the run with (`shike.dataset_manifest_hash`): one name for the data.
    assert record["manifest_hash"] == runs.manifest_hash(launch.manifest)
    assert record["uri"] == datasets["if10"]
    assert launch.data == record

    # The same data again (even moved elsewhere: the hash is of the manifest's content).
    moved = shutil.copytree(datasets["if10"], tmp_path / "moved")
    _launch(_cfg(tmp_path, datasets["if10"]))
    _launch(_cfg(tmp_path, str(moved)))
    again = json.loads((tmp_path / "runs" / "run-a" / run_storage.DATA_RECORD).read_text())
    assert again == record  # the first launch's record is kept


def test_other_data_is_refused_in_one_line_naming_both(datasets, tmp_path):
    first = _launch(_cfg(tmp_path, datasets["if10"]))
    other = read_manifest(datasets["if5"])
    with pytest.raises(LaunchRefused) as refused:
        _launch(_cfg(tmp_path, datasets["if5"]))
    line = str(refused.value)
    assert "\n" not in line
    old, new = runs.manifest_hash(first.manifest), runs.manifest_hash(other)
    assert "'run-a'" in line
    assert f"cifar10 IF 10 (manifest {old[:12]}" in line, line
    assert f"cifar10 IF 5 (manifest {new[:12]}" in line, line
    assert f"--set data.uri={datasets['if10']}" in line, line  # way out 1: the original data
    assert "new run name" in line, line  # way out 2
    # Refused without taking the run over: the record still names the first data, and the
    # lease was given back (the original data launches at once).
    record = json.loads((tmp_path / "runs" / "run-a" / run_storage.DATA_RECORD).read_text())
    assert record["manifest_hash"] == old
    _launch(_cfg(tmp_path, datasets["if10"]))
    # Another run name is free to train the other data.
    assert _launch(_cfg(tmp_path, datasets["if5"]), "run-b").data["manifest_hash"] == new


def test_a_run_folder_from_before_the_record_resumes_and_gets_one(datasets, tmp_path):
    folder = tmp_path / "runs" / "old-run"
    (folder / "checkpoint_2026-11-30_00-00-00.000000").mkdir(parents=True)
    launch = _launch(_cfg(tmp_path, datasets["if10"]), "old-run")
    record = json.loads((folder / run_storage.DATA_RECORD).read_text())
    assert record["manifest_hash"] == launch.data["manifest_hash"]
    with pytest.raises(LaunchRefused, match="IF 5"):
        _launch(_cfg(tmp_path, datasets["if5"]), "old-run")


def test_the_record_of_a_run_on_s3(datasets, tmp_path, s3_env, monkeypatch):
    from pipeline.storage import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)  # how a launch finds the store
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    storage = {"cluster.storage_path": s3_env.uri("runs")}
    first = _launch(_cfg(tmp_path, datasets["if10"], **storage))
    stored = s3_client(s3_env.options).get_object(
        Bucket=s3_env.bucket, Key=f"runs/run-a/{run_storage.DATA_RECORD}"
    )
    assert json.loads(stored["Body"].read()) == first.data
    _launch(_cfg(tmp_path, datasets["if10"], **storage))
    with pytest.raises(LaunchRefused, match=r"IF 10 .* but this launch reads cifar10 IF 5"):
        _launch(_cfg(tmp_path, datasets["if5"], **storage))


# ---- the checkpoint ----------------------------------------------------------------------------

COUNTS = [12, 10, 8, 6, 5, 4, 3, 3, 2, 2]
IF100 = {"dataset": "cifar10", "imbalance_factor": 100.0, "manifest_hash": "a" * 16, "uri": "/a"}
IF10 = {"dataset": "cifar10", "imbalance_factor": 10.0, "manifest_hash": "b" * 16, "uri": "/b"}


def _session(data_identity=None) -> TrainingSession:
    cfg = load_config(None, ["model.arch=resnet32", "optim.epochs=2", "optim.stage2_start=1"])
    if data_identity is None:
        return TrainingSession(cfg, COUNTS, torch.device("cpu"))
    return TrainingSession(cfg, COUNTS, torch.device("cpu"), data_identity=data_identity)


def test_checkpoint_records_the_data_and_refuses_other_data(tmp_path):
    written = _session(IF100)
    assert written.state_dict()["data"] == IF100
    written.save(tmp_path)

    with pytest.raises(CheckpointError) as refused:
        _session(IF10).restore(tmp_path)
    line = str(refused.value)
    assert "\n" not in line and str(tmp_path) in line
    assert "cifar10 IF 100 (manifest aaaaaaaaaaaa" in line, line
    assert "cifar10 IF 10 (manifest bbbbbbbbbbbb" in line, line

    _session(IF100).restore(tmp_path)  # the same data resumes
    moved = {**IF100, "uri": "s3://bucket/moved"}
    _session(moved).restore(tmp_path)  # ... wherever it lives now
    _session().restore(tmp_path)  # a caller that passes no identity checks nothing


def test_a_checkpoint_from_before_the_record_resumes(tmp_path):
    _session().save(tmp_path)  # no data recorded, as in checkpoints from before issue 35
    resumed = _session(IF10)
    resumed.restore(tmp_path)
    assert resumed.state_dict()["data"] == IF10  # the next checkpoint records it


# ---- dataset inputs: one digest per split ------------------------------------------------------


def _manifest(folder: Path, train_sha: str | None = None):
    """The CIFAR-10 fixture manifest (unsealed, so editable), its first training shard's
    checksum replaced by `train_sha`: another training split, the same val and test splits."""
    doc = json.loads((FIXTURES / "manifest_cifar10_v1.json").read_text())
    if train_sha:
        doc["splits"]["train"]["shards"][0]["sha256"] = train_sha
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return read_manifest(str(folder))


def test_each_split_has_its_own_digest_from_its_shards(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.helpers.mlflow_env import isolated_mlflow_env

    one = _manifest(tmp_path / "one")
    two = _manifest(tmp_path / "two", train_sha="0" * 64)
    assert runs.manifest_hash(one) != runs.manifest_hash(two)
    store = f"sqlite:///{tmp_path}/mlflow.db"

    def digests(manifest, run_name: str) -> dict[str, str]:
        """The digests MLflow holds for the run's dataset inputs, by split."""
        run_id = runs.start_or_resume_run(store, "exp-digests", run_name)
        runs.RunLogger(store, run_id).log_datasets(manifest, ["train", "val", "test"])
        inputs = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
        return {i.dataset.name.rsplit("-", 1)[1]: i.dataset.digest for i in inputs}

    (tmp_path / "cwd").mkdir()
    with isolated_mlflow_env(tmp_path / "cwd"):
        a, b = digests(one, "one"), digests(two, "two")
    assert a["val"] == b["val"] and a["test"] == b["test"]  # the same shards: the same data
    assert a["train"] != b["train"]
    assert len({a["train"], a["val"], a["test"]}) == 3  # not the manifest's one hash
    assert all(0 < len(d) <= 36 for d in a.values())  # MLflow's digest column holds 36
    # A function of the shards' checksums only: the same manifest elsewhere, the same digests.
    copy = _manifest(tmp_path / "copy")
    assert {i.dataset.digest for i in lineage.dataset_inputs(copy, ["val"])} == {a["val"]}


def test_the_data_settings_come_from_the_manifest_whatever_the_config_says(datasets, tmp_path):
    """Point 2: a config that says IF 100 and 500 head images, on an IF-5 dataset, launches
    with the manifest's values: they are what the run logs and names its model by."""
    from pipeline.tracking.registry import model_name_for

    cfg = _cfg(tmp_path, datasets["if5"], **{"data.imbalance_factor": 100, "data.n_max": 500})
    manifest = read_manifest(datasets["if5"])
    launched = _launch(cfg).config
    assert launched.data.imbalance_factor == 5.0 == manifest.imbalance_factor
    assert launched.data.n_max == manifest.n_max and launched.data.dataset == "cifar10"
    assert launched.data.val_per_class == manifest.val_per_class == 2
    assert model_name_for(launched) == "shike-cifar10-lt-if5"
    assert model_name_for(cfg) != model_name_for(launched)  # what the config alone would name
