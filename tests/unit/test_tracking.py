"""pipeline.tracking.runs (with pipeline.tracking.store and pipeline.credentials, which it logs through)
against a real MLflow SQLite store in a temporary folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import build_config
from pipeline.evaluation.metrics import EvalCounts

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import credentials  # noqa: E402
from pipeline.tracking import lineage, runs  # noqa: E402
from pipeline.tracking.driver_guard import TAG_END_REASON, DriverGuard, end_orphaned_run  # noqa: E402
from pipeline.tracking.runs import RunLogger, TrackingError  # noqa: E402
from pipeline.tracking.store import mlflow_uris, sqlite_artifact_root  # noqa: E402
from tests.helpers.mlflow_env import isolated_mlflow_env  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path):
    """Every test runs from an empty folder: nothing may land in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with isolated_mlflow_env(cwd):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def cfg():
    return build_config({"data": {"dataset": "cifar10"}, "optim": {"epochs": 4, "stage2_start": 3}})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- URIs ------------------------------------------------------------------------------------


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    tmp_path = tmp_path / "elsewhere"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = runs.resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert sqlite_artifact_root(default) == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert runs.resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert sqlite_artifact_root("http://host:5000") is None
    assert sqlite_artifact_root("sqlite:////data/m/x.db") == Path("/data/m/mlartifacts")
    assert not list(tmp_path.iterdir())  # resolving creates nothing


def test_redact_uri_masks_password():
    assert credentials.redact_uri("https://bob:hunter2@mlflow.example:443/x") == (
        "https://bob:***@mlflow.example:443/x"
    )
    assert credentials.redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# ---- one run per run name --------------------------------------------------------------------


def test_one_run_per_run_name(store, cfg, tmp_path_factory):
    tags = runs.standard_tags(cfg)
    run_id = runs.start_or_resume_run(store, "exp-runs", "alpha", tags)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["shike.run_name"] == "alpha"
    assert run.data.tags["mlflow.runName"] == "alpha"
    assert run.data.tags["shike.config_hash"] == cfg.config_hash()
    assert run.data.tags["shike.seed"] == str(cfg.train.seed)

    RunLogger(store, run_id).finish("FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
    again = runs.start_or_resume_run(store, "exp-runs", "alpha", tags)
    assert again == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    RunLogger(store, run_id).finish()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert runs.start_or_resume_run(store, "exp-runs", "alpha") == run_id

    other = runs.start_or_resume_run(store, "exp-runs", "beta", tags)
    assert other != run_id
    exp = client.get_experiment_by_name("exp-runs")
    assert len(client.search_runs([exp.experiment_id])) == 2
    # The SQLite default keeps artifacts next to the database, never in the working directory.
    db_dir = Path(store[len("sqlite:///") :]).parent
    assert exp.artifact_location == (db_dir / "mlartifacts" / "exp-runs").as_uri()


def test_driver_guard_ends_only_a_run_its_driver_left_running(store):
    """The guard process (a real one): a pipe closed without "done", as when the driver is
    SIGKILLed, ends a RUNNING run KILLED with the reason and how to resume; "done" leaves the
    run to its driver."""
    client = MlflowClient(store)
    orphan = runs.start_or_resume_run(store, "exp-guard", "orphan")
    guard = DriverGuard.start(store, orphan, "orphan", "python -m jobs.train --run-name orphan")
    guard._process.stdin.close()  # what the driver's death does to the guard's pipe
    assert guard._process.wait(timeout=60) == 0
    run = client.get_run(orphan)
    assert run.info.status == "KILLED"
    reason = run.data.tags[TAG_END_REASON]
    assert "died without ending run 'orphan'" in reason and "--run-name orphan" in reason

    kept = runs.start_or_resume_run(store, "exp-guard", "kept")
    DriverGuard.start(store, kept, "kept", "python -m jobs.train --run-name kept").stop()
    assert client.get_run(kept).info.status == "RUNNING"
    assert not end_orphaned_run(store, orphan, "again")  # an ended run is left as it is


def test_child_run_under_a_parent(store):
    parent = runs.start_or_resume_run(store, "exp-sweep", "sweep-1")
    child = runs.start_or_resume_run(store, "exp-sweep", "sweep-1/trial-0", parent_run_id=parent)
    assert child != parent
    assert MlflowClient(store).get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert runs.start_or_resume_run(store, "exp-sweep", "sweep-1/trial-0") == child


def test_duplicate_runs_for_a_name_are_an_error(store):
    runs.start_or_resume_run(store, "exp-dup", "gamma")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("exp-dup")
    client.create_run(exp.experiment_id, tags={"shike.run_name": "gamma"})
    with pytest.raises(TrackingError, match=r"2 runs tagged shike.run_name=gamma"):
        runs.start_or_resume_run(store, "exp-dup", "gamma")


def test_deleted_run_is_not_resumed(store):
    first = runs.start_or_resume_run(store, "exp-del", "delta")
    MlflowClient(store).delete_run(first)
    assert runs.start_or_resume_run(store, "exp-del", "delta") != first


def test_invalid_run_name_rejected(store):
    with pytest.raises(TrackingError, match="invalid run name"):
        runs.start_or_resume_run(store, "exp-runs", "it's")


# ---- params ----------------------------------------------------------------------------------


def test_log_config_relog_same_ok_and_differing_value_fails(store, cfg, tmp_path):
    run_id = runs.start_or_resume_run(store, "exp-params", "cfg-run")
    log = RunLogger(store, run_id)
    log.log_config(cfg)
    log.log_config(cfg)  # a resumed run re-logs the same config: fine
    client = MlflowClient(store)
    params = client.get_run(run_id).data.params
    flat = cfg.flat()
    assert len(params) == len(flat)
    assert params["loss.dkt_weight"] == str(flat["loss.dkt_weight"])
    assert params["optim.epochs"] == "4"
    path = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == cfg.to_dict()

    changed = build_config(cfg.to_dict(), ["loss.dkt_weight=5"])
    with pytest.raises(TrackingError, match=r"loss\.dkt_weight: logged '10\.0', now '5\.0'"):
        RunLogger(store, run_id).log_config(changed)
    assert client.get_run(run_id).data.params["loss.dkt_weight"] == "10.0"

    # Execution settings may change on resume (as the checkpoint allows): the param keeps its
    # first value, a tag says what changed, config.yaml is the latest launch's.
    workers = cfg.data.loader_workers
    moved = build_config(cfg.to_dict(), [f"data.loader_workers={workers + 3}"])
    RunLogger(store, run_id).log_config(moved)
    run = client.get_run(run_id)
    assert run.data.params["data.loader_workers"] == str(workers)
    assert run.data.tags[runs.TAG_EXECUTION_CHANGES] == (
        f"data.loader_workers={workers + 3} (logged {workers})"
    )
    (tmp_path / "moved").mkdir()
    path = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path / "moved"))
    assert yaml.safe_load(Path(path).read_text())["data"]["loader_workers"] == workers + 3
    RunLogger(store, run_id).log_config(cfg)  # back to the logged values: no change to report
    assert runs.TAG_EXECUTION_CHANGES not in client.get_run(run_id).data.tags


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_with_steps_and_nan_skipped(store):
    run_id = runs.start_or_resume_run(store, "exp-metrics", "m-run")
    log = RunLogger(store, run_id)
    for epoch in range(3):
        log.log_metrics(
            {"train/loss": 2.0 - epoch, "train/lr": 0.1 * (epoch + 1), "val/acc": float("nan")},
            step=epoch,
        )
    client = MlflowClient(store)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 2.0),
        (1, 1.0),
        (2, 0.0),
    ]
    assert len(client.get_metric_history(run_id, "train/lr")) == 3
    assert client.get_metric_history(run_id, "val/acc") == []


# ---- evaluation --------------------------------------------------------------------------------


def _eval_counts(num_classes: int = 10, n: int = 400) -> EvalCounts:
    gen = torch.Generator().manual_seed(0)
    target = torch.arange(n) % num_classes
    logits = torch.randn(n, num_classes, generator=gen)
    logits[torch.arange(n), target] += torch.linspace(0, 4, n)  # some right, some wrong
    counts = EvalCounts(num_classes)
    counts.update(logits, target)
    return counts


def test_log_evaluation_metrics_table_and_plots(store, tmp_path):
    run_id = runs.start_or_resume_run(store, "exp-eval", "e-run")
    class_counts = [500, 300, 180, 101, 100, 60, 20, 19, 8, 5]
    names = [f"class{i}" for i in range(10)]
    counts = _eval_counts()
    results = counts.compute(class_counts=class_counts)
    RunLogger(store, run_id).log_evaluation("test", results, class_counts, names, counts=counts)

    client = MlflowClient(store)
    metrics = client.get_run(run_id).data.metrics
    for key in ("acc", "top5", "ece", "acc_many", "acc_medium", "acc_few"):
        assert math.isclose(metrics[f"test/{key}"], results[key], rel_tol=1e-9), key
    assert metrics["test/num_samples"] == 400

    listed = {a.path for a in client.list_artifacts(run_id, "test")}
    assert listed == {
        "test/per_class.csv",
        "test/per_class_accuracy.png",
        "test/reliability.png",
    }
    local = Path(client.download_artifacts(run_id, "test", dst_path=str(tmp_path)))
    for png in ("per_class_accuracy.png", "reliability.png"):
        data = (local / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    rows = list(csv.DictReader(io.StringIO((local / "per_class.csv").read_text())))
    assert [r["class_name"] for r in rows] == names
    assert [r["group"] for r in rows] == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
    assert [int(r["eval_samples"]) for r in rows] == [40] * 10
    for row, acc in zip(rows, results["per_class_acc"], strict=True):
        assert math.isclose(float(row["accuracy"]), acc, abs_tol=1e-6)


def test_log_evaluation_with_explicit_bins_and_empty_class(store, tmp_path):
    run_id = runs.start_or_resume_run(store, "exp-eval", "e-run-2")
    results = {
        "acc": 0.5, "top5": 0.9, "ece": 0.1, "acc_many": 0.6, "acc_medium": float("nan"),
        "acc_few": 0.2, "per_class_acc": [0.6, float("nan"), 0.2], "num_samples": 20,
    }  # fmt: skip
    RunLogger(store, run_id).log_evaluation(
        "val",
        results,
        [200, 50, 5],
        None,
        bin_counts=[0, 5, 15],
        bin_conf=[float("nan"), 0.5, 0.9],
        bin_acc=[float("nan"), 0.4, 0.8],
        step=7,
    )
    client = MlflowClient(store)
    assert "val/acc_medium" not in client.get_run(run_id).data.metrics  # NaN skipped
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/acc")] == [(7, 0.5)]
    RunLogger(store, run_id).log_evaluation("val", results, [200, 50, 5], scalars=False)
    assert len(client.get_metric_history(run_id, "val/acc")) == 1
    assert {a.path for a in client.list_artifacts(run_id, "val")} == {
        "val/per_class.csv",
        "val/per_class_accuracy.png",
        "val/reliability.png",
    }
    text = Path(client.download_artifacts(run_id, "val/per_class.csv", str(tmp_path))).read_text()
    assert text.splitlines()[2] == "1,1,50,medium,"


# ---- manifest, tags, secrets -------------------------------------------------------------------


def test_log_manifest_artifact_and_hash_tag(store, tmp_path):
    run_id = runs.start_or_resume_run(store, "exp-tags", "manifest-run")
    manifest = {
        "dataset": "cifar10",
        "class_counts": [500, 5],
        "splits": {"train": {"num_rows": 505}},
    }
    digest = RunLogger(store, run_id).log_manifest(manifest)
    assert digest == runs.manifest_hash(dict(reversed(list(manifest.items()))))  # order-free
    client = MlflowClient(store)
    assert client.get_run(run_id).data.tags["shike.dataset_manifest_hash"] == digest
    path = client.download_artifacts(run_id, "dataset/manifest.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == manifest


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _prepared_manifest(folder: Path):
    """The CIFAR-10 fixture manifest published in `folder`, read back as readers read it."""
    from pipeline.data.manifest import read_manifest

    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes((FIXTURES / "manifest_cifar10_v1.json").read_bytes())
    return read_manifest(str(folder))


def _inputs(store: str, run_id: str) -> dict[str, object]:
    """The run's dataset inputs by name."""
    run = MlflowClient(store).get_run(run_id)
    return {d.dataset.name: d for d in run.inputs.dataset_inputs}


def test_dataset_inputs_name_digest_source_profile_and_context(store, tmp_path):
    manifest = _prepared_manifest(tmp_path / "c10-lt")
    run_id = runs.start_or_resume_run(store, "exp-datasets", "inputs-run")
    logged = RunLogger(store, run_id).log_datasets(manifest, ["train", "val", "test"])
    assert len(logged) == 3
    assert runs.run_name_of(store, run_id) == "inputs-run"
    inputs = _inputs(store, run_id)
    assert runs.manifest_hash(manifest) == runs.manifest_hash(manifest.to_dict())  # the run's tag
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    assert set(inputs) == {f"cifar10-lt-if10-{split}" for split in contexts}
    for split, context in contexts.items():
        entry = inputs[f"cifar10-lt-if10-{split}"]
        dataset = entry.dataset
        assert dataset.digest == lineage.split_digest(manifest, split)  # its own shards'
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": (tmp_path / "c10-lt").as_uri()}
        profile = json.loads(dataset.profile)
        assert profile["num_rows"] == manifest.splits[split].num_rows
        assert profile["class_counts"] == manifest.splits[split].class_counts
        assert profile["num_classes"] == 10
        assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", context)]
        schema = json.loads(dataset.schema)["mlflow_colspec"]
        assert [(c["name"], c["type"]) for c in schema] == [
            ("image", "binary"),
            ("label", "long"),
            ("sample_id", "string"),
        ]
    assert len({entry.dataset.digest for entry in inputs.values()}) == 3
    assert json.loads(inputs["cifar10-lt-if10-train"].dataset.profile)["class_counts"] == [
        30, 23, 17, 13, 10, 8, 6, 5, 3, 3,
    ]  # fmt: skip

    # Idempotent: a relaunch (same run name) logs them again; the run still has one per split,
    # and so does the experiment. MLflow's own store deduplicates too (direct client call).
    again = runs.start_or_resume_run(store, "exp-datasets", "inputs-run")
    assert again == run_id
    RunLogger(store, again).log_datasets(manifest, ["train", "val", "test"])
    MlflowClient(store).log_inputs(run_id, datasets=logged)
    run = MlflowClient(store).get_run(run_id)
    assert len(run.inputs.dataset_inputs) == 3
    assert all(len(d.tags) == 1 for d in run.inputs.dataset_inputs)

    # A second run reading the same data shares the experiment's dataset records.
    other = runs.start_or_resume_run(store, "exp-datasets", "inputs-run-2")
    RunLogger(store, other).log_datasets(manifest, ["train"])
    assert list(_inputs(store, other)) == ["cifar10-lt-if10-train"]


def test_dataset_inputs_s3_source_without_credentials(store, tmp_path, monkeypatch):
    manifest = _prepared_manifest(tmp_path / "c10")
    # Another experiment: MLflow keys an experiment's datasets by (name, digest), so the same
    # data logged from another location reuses the record (and source) logged first.
    run_id = runs.start_or_resume_run(store, "exp-datasets-s3", "inputs-s3")
    RunLogger(store, run_id).log_datasets(
        manifest, ["val"], uri="s3://reader:hunter2@bucket/datasets/c10"
    )
    [dataset] = [d.dataset for d in _inputs(store, run_id).values()]
    assert dataset.source_type == "s3"
    assert json.loads(dataset.source) == {"uri": "s3://reader:***@bucket/datasets/c10"}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    with pytest.raises(TrackingError, match="AWS_SECRET_ACCESS_KEY"):
        lineage.dataset_inputs(manifest, ["val"], uri="s3://bucket/s3cr3t-value/c10")


# ---- system metrics ----------------------------------------------------------------------------


def _system_keys(store: str, run_id: str) -> set[str]:
    return {k for k in MlflowClient(store).get_run(run_id).data.metrics if k.startswith("system/")}


def test_system_metrics_logged_while_a_block_runs(store, monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    run_id = runs.start_or_resume_run(store, "exp-system", "monitored")
    with lineage.system_metrics(store, run_id, interval_s=0.2) as on:
        assert on
        time.sleep(1.0)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    keys = _system_keys(store, run_id)
    assert {
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/disk_usage_percentage",
        "system/network_receive_megabytes",
    } <= keys
    client = MlflowClient(store)
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 2
    assert "mlflow.system_metrics" not in capfd.readouterr().err  # its INFO lines, GPU skip

    # A resumed run continues the steps; an error in the block still stops the monitor and
    # logs its last window.
    with pytest.raises(RuntimeError, match="boom"), lineage.system_metrics(store, run_id):
        raise RuntimeError("boom")
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    more = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert more == [*steps, len(steps)]


def test_system_metrics_off(store, monkeypatch):
    run_id = runs.start_or_resume_run(store, "exp-system", "unmonitored")
    with lineage.system_metrics(store, run_id, interval_s=0.1, enabled=False) as on:
        time.sleep(0.3)
    assert on is False
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with lineage.system_metrics(store, run_id, interval_s=0.1) as on:
        time.sleep(0.3)
    assert on is False
    assert _system_keys(store, run_id) == set()


def test_standard_tags(cfg):
    tags = runs.standard_tags(cfg, manifest_hash="abc123")
    assert tags["shike.config_hash"] == cfg.config_hash()
    assert tags["shike.dataset_manifest_hash"] == "abc123"
    assert tags["shike.seed"] == "0"
    assert "shike.dataset_manifest_hash" not in runs.standard_tags(cfg)


def test_standard_tags_commit_from_environment(cfg, monkeypatch):
    monkeypatch.setenv("SHIKE_GIT_COMMIT", "0123abcd")
    assert runs.standard_tags(cfg)["mlflow.source.git.commit"] == "0123abcd"


@pytest.mark.parametrize(
    "key",
    [
        "aws_secret_access_key",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "mlflow_tracking_token",
        "storage.secretKey",
        "db.password",
        "api-key",
        "s3.session_token",
    ],
)
def test_secret_looking_keys_refused(store, key):
    assert credentials.looks_secret(key)
    run_id = runs.start_or_resume_run(store, "exp-tags", "secret-run")
    with pytest.raises(TrackingError, match="looks like a credential"):
        RunLogger(store, run_id).log_tags({key: "value"})
    assert key not in MlflowClient(store).get_run(run_id).data.tags


def test_config_keys_are_not_secret_looking(cfg):
    assert [k for k in cfg.flat() if credentials.looks_secret(k)] == []
    for key in (
        "loss.dkt_weight",
        "tracking.tracking_uri",
        "shike.dataset_manifest_hash",
        "author",
    ):
        assert not credentials.looks_secret(key)


def test_credential_values_refused_and_uri_passwords_masked(store, monkeypatch):
    run_id = runs.start_or_resume_run(store, "exp-tags", "secret-values")
    log = RunLogger(store, run_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    with pytest.raises(TrackingError, match=r"contains \$AWS_SECRET_ACCESS_KEY"):
        log.log_tags({"note": "endpoint?key=s3cr3t-value-xyz"})
    log.log_tags({"server": "https://bob:hunter2@mlflow.example/"})
    tags = MlflowClient(store).get_run(run_id).data.tags
    assert tags["server"] == "https://bob:***@mlflow.example/"
    assert "note" not in tags
    # A config holding a secret in a value is refused as a whole, before anything is logged.
    cfg = build_config({"data": {"uri": "s3://bucket/s3cr3t-value-xyz/data"}})
    with pytest.raises(TrackingError, match="param 'data.uri'"):
        log.log_config(cfg)
    assert MlflowClient(store).get_run(run_id).data.params == {}


# ---- server reachability ---------------------------------------------------------------------


def test_check_tracking_server_closed_port_fails_fast():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        runs.check_tracking_server(uri, timeout_s=3)
    assert time.monotonic() - start < 3.5


def test_check_tracking_server_silent_server_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"http://user:pw@127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingError) as info:
            runs.check_tracking_server(uri, timeout_s=1)
        assert time.monotonic() - start < 2.5
    assert "user:***@127.0.0.1" in str(info.value) and "pw@" not in str(info.value)


def test_a_server_that_answered_is_probed_once_per_minute(monkeypatch):
    import http.server
    import threading

    from pipeline.tracking import store as tracking_store

    probes = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            probes.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(3):  # one job's steps, each guarding its first call
            runs.check_tracking_server(uri, timeout_s=3)
        assert probes == ["/health"]
        monkeypatch.setattr(tracking_store, "HEALTHY_FOR_S", 0.0)  # the minute has passed
        runs.check_tracking_server(uri, timeout_s=3)
        assert probes == ["/health", "/health"]
    finally:
        server.shutdown()
        server.server_close()


def test_check_tracking_server_noop_for_local_stores(store):
    runs.check_tracking_server(store, timeout_s=0.1)
    runs.check_tracking_server("file:///tmp/nowhere", timeout_s=0.1)


def test_start_run_on_unreachable_server_is_a_clear_error():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        runs.start_or_resume_run(uri, "exp", "run")
    assert time.monotonic() - start < 11


def test_mlflow_uris_restores_globals(store):
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    with mlflow_uris(store):
        assert mlflow.get_tracking_uri() == store
        assert mlflow.get_registry_uri() == store
    assert mlflow.get_tracking_uri() == before
    assert os.environ.get("MLFLOW_TRACKING_URI") == before_env
