"""pipeline.evaluation.evaluate + pipeline.evaluation.promotion + jobs/evaluate.py + jobs/promote.py against a real
MLflow SQLite store.

One small prepared dataset (generated images -> Parquet shards + manifest; 10 classes, 60 val
images) and one registered model `shike-promo` with three versions of known, clearly different
val accuracy, made without training: a real SHIKE ResNet-32 (stage 2) whose cosine heads are set
to the class means of its own (random-init) val features ("good"), then the same heads with
some class rows swapped ("medium": classes 0<->1, 2<->3) or all rows shifted by one ("bad").
A 5-class model `shike-five` (no aliases) covers the class-count mismatch and a missing
candidate. The shike-promo versions record the dataset they were trained on ("cifar10");
shike-five, like versions registered before the dataset was recorded, does not. The Ray Data path (workers > 1) is in tests/integration/test_evaluate_ray.py.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.data.manifest import MANIFEST_NAME, read_manifest, seal_document
from pipeline.data.prepare.from_raw import prepare_dataset
from pipeline.data.readers.transforms import CIFAR_MEAN, CIFAR_STD
from pipeline.data.shards import load_split
from pipeline.models import ImageClassifier, build_model
from tests.helpers.cifar_archives import write_parquet_folder

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from jobs import evaluate as evaluate_job  # noqa: E402
from jobs import promote as promote_job  # noqa: E402
from pipeline.evaluation import evaluate, promotion, reports  # noqa: E402
from pipeline.evaluation.scoring import EvaluationError  # noqa: E402
from pipeline.tracking import lineage, registry, runs, versions  # noqa: E402
from pipeline.tracking.versions import RegistryError  # noqa: E402
from tests.helpers.mlflow_env import isolated_mlflow_env  # noqa: E402

MODEL = "shike-promo"
FIVE = "shike-five"


@pytest.fixture(scope="module", autouse=True)
def _mlflow_env(tmp_path_factory):
    # One intra-op thread: on a busy 2-core machine, OpenMP threads spinning against other
    # processes make these tiny forward passes 20-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with isolated_mlflow_env(tmp_path_factory.mktemp("cwd")):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(uri, manifest, val split): 10 classes, train 30..10 per class, 6 val images per class,
    in several shards."""
    base = tmp_path_factory.mktemp("data")
    write_parquet_folder(base / "raw", train_per_class=40, test_per_class=4)
    out = base / "shards"
    manifest = prepare_dataset(
        "cifar10", str(base / "raw"), str(out), 3.0, n_max=30, val_per_class=6, shard_mb=0.01
    )
    assert len(manifest.splits["val"].shards) > 1
    return str(out), manifest, load_split(read_manifest(str(out)), "val")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _nets(images: np.ndarray, labels: np.ndarray) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = build_model(ModelConfig(), 10)
    base.set_stage(2)
    base.eval()
    y = torch.from_numpy(labels)
    with torch.no_grad():
        feats = base.forward_features(_pixels(images))
        means = [
            torch.stack([F.normalize(h, dim=1)[y == c].mean(0) for c in range(10)]) for h in feats
        ]
    perms = {
        "good": list(range(10)),
        "medium": [1, 0, 3, 2, 4, 5, 6, 7, 8, 9],
        "bad": [*range(1, 10), 0],
    }
    nets = {}
    for kind, perm in perms.items():
        net = copy.deepcopy(base)
        with torch.no_grad():
            for head, w in zip(net.rt_classifiers, means, strict=True):
                head.weight.copy_(w[perm])
        nets[kind] = net
    return nets


def _probs(clf: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return clf(torch.from_numpy(images))


@pytest.fixture(scope="module")
def models(dataset, store):
    """Registers shike-promo v1 (medium), v2 (bad), v3 (good) and shike-five v1, all without
    aliases. Returns {kind: (version, run_id, expected val accuracy)}."""
    _, manifest, val = dataset
    names = manifest.class_names
    nets = _nets(val.images, val.labels)
    out = {}
    for version, kind in enumerate(("medium", "bad", "good"), start=1):
        net = nets[kind]
        clf = ImageClassifier(net, CIFAR_MEAN, CIFAR_STD, names).eval()
        acc = float((_probs(clf, val.images).argmax(1).numpy() == val.labels).mean())
        run_id = runs.start_or_resume_run(store, "shike-train", f"train-{kind}")
        mv = registry.log_and_register(
            run_id, net, names, MODEL, mean=CIFAR_MEAN, std=CIFAR_STD, alias=None,
            tracking_uri=store, dataset=manifest.dataset,
        )  # fmt: skip
        assert str(mv.version) == str(version)
        out[kind] = (str(version), run_id, acc)
    # The three versions are far apart (a 0.2% margin cannot blur them).
    assert out["good"][2] > out["medium"][2] + 0.1 > out["bad"][2] + 0.2

    torch.manual_seed(5)
    five = build_model(ModelConfig(), 5)
    five.set_stage(2)
    run_id = runs.start_or_resume_run(store, "shike-train", "train-five")
    registry.log_and_register(
        run_id, five.eval(), [f"c{i}" for i in range(5)], FIVE, mean=CIFAR_MEAN, std=CIFAR_STD,
        alias=None, tracking_uri=store,
    )  # fmt: skip
    return out


def _state(store: str, name: str) -> dict[str, object]:
    """Aliases of the model and every version's aliases + full tag set."""
    client = MlflowClient(store)
    state: dict[str, object] = {"aliases": dict(client.get_registered_model(name).aliases)}
    for mv in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, mv.version)
        state[str(full.version)] = (sorted(full.aliases), dict(full.tags))
    return state


def _same(a: dict, b: dict) -> bool:
    """Equality of two results dicts where NaN == NaN."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
        for u, v in zip(xs, ys, strict=True):
            if not (u == v or (math.isnan(u) and math.isnan(v))):
                return False
    return True


# ---- evaluate --------------------------------------------------------------------------------


def test_evaluate_by_alias_version_and_run_agree_with_a_hand_count(dataset, store, models):
    uri, manifest, val = dataset
    version, run_id, expected_acc = models["good"]
    versions.set_alias(MODEL, "under-test", version, tracking_uri=store)

    by_alias = evaluate.evaluate_model(
        f"models:/{MODEL}@under-test", uri, tracking_uri=store, batch_size=7
    )
    by_version = evaluate.evaluate_model(f"models:/{MODEL}/{version}", uri, tracking_uri=store)
    by_run = evaluate.evaluate_model(f"runs:/{run_id}/model", uri, tracking_uri=store)
    for report in (by_alias, by_version, by_run):
        assert (report.model_name, report.version, report.source_run_id) == (
            MODEL, version, run_id,
        )  # fmt: skip
        assert report.split == "val" and report.results["num_samples"] == len(val.labels) == 60
    # Batches of 7 (ragged last batch) and one batch of 60 give the same counts.
    for name in ("class_total", "class_top1", "class_top5", "bin_count", "bin_correct"):
        assert torch.equal(getattr(by_alias.counts, name), getattr(by_version.counts, name))
    assert _same(by_version.results, by_run.results)
    for key in ("acc", "top5", "acc_many", "acc_medium", "acc_few", "per_class_acc"):
        assert _same({key: by_alias.results[key]}, {key: by_version.results[key]})
    assert by_alias.results["ece"] == pytest.approx(by_version.results["ece"], abs=1e-12)

    # Independent count: the registered classifier on the decoded split, argmax by hand.
    clf = registry.load_classifier(f"models:/{MODEL}/{version}", tracking_uri=store)
    probs = _probs(clf, val.images).double()
    conf, pred = probs.max(1)
    hit = pred.numpy() == val.labels
    assert by_version.results["acc"] == pytest.approx(hit.mean(), abs=0) == expected_acc
    for c in range(10):
        assert by_version.results["per_class_acc"][c] == hit[val.labels == c].mean()
        row = by_version.rows[c]
        assert row["class_name"] == manifest.class_names[c] and row["eval_samples"] == 6
        assert row["correct"] == int(hit[val.labels == c].sum())
        assert row["train_images"] == manifest.class_counts[c]
    top5 = (probs.topk(5, dim=1).indices.numpy() == val.labels[:, None]).any(1)
    assert by_version.results["top5"] == top5.mean()
    # Training counts 30, 26, 23, 20 (medium: 20..100), then 18 .. 10 (few: < 20).
    medium = np.array([manifest.class_counts[y] >= 20 for y in val.labels])
    assert medium.sum() == 24
    assert by_version.results["acc_medium"] == hit[medium].mean()
    assert by_version.results["acc_few"] == hit[~medium].mean()
    assert math.isnan(by_version.results["acc_many"])  # no class has > 100 training images
    bins = np.clip(np.ceil(conf.numpy() * 15).astype(int) - 1, 0, 14)
    ece = sum(
        (bins == b).mean() * abs(hit[bins == b].mean() - conf.numpy()[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    assert by_version.results["ece"] == pytest.approx(ece, abs=1e-6)

    table = reports.format_table(by_version)
    assert f"{MODEL} v{version}" in table
    assert f"{100 * expected_acc:.2f}%" in table
    for label in ("overall", "many", "medium", "few", "ECE"):
        assert label in table


def test_class_count_mismatch_is_a_clear_error(dataset, store, models):
    uri, _, _ = dataset
    with pytest.raises(EvaluationError, match=r"predicts 5 classes .* has 10 classes"):
        evaluate.evaluate_model(f"models:/{FIVE}/1", uri, tracking_uri=store)


def _renamed_copy(uri: str, dest: Path, name: str) -> str:
    """The prepared dataset under another dataset name (same classes, same shards), its
    manifest sealed again as publishing would: only the dataset check can tell."""
    shutil.copytree(uri, dest)
    doc = json.loads((dest / MANIFEST_NAME).read_text())
    (dest / MANIFEST_NAME).write_text(json.dumps(seal_document({**doc, "dataset": name})))
    return str(dest)


def test_evaluate_refuses_a_dataset_the_model_was_not_trained_on(
    dataset, store, models, tmp_path, capsys
):
    uri, manifest, _ = dataset
    assert registry.model_metadata(f"models:/{MODEL}/1", tracking_uri=store)["dataset"] == (
        manifest.dataset
    )
    other = _renamed_copy(uri, tmp_path / "other", "cifar10_relabelled")
    with pytest.raises(
        EvaluationError,
        match=(
            rf"^dataset mismatch: model models:/{MODEL}/1 \(version 1\) was trained on dataset "
            rf"'cifar10' but {other} holds dataset 'cifar10_relabelled'$"
        ),
    ):
        evaluate.evaluate_model(f"models:/{MODEL}/1", other, tracking_uri=store)
    argv = ["--model", f"models:/{MODEL}/1", "--data", other, "--tracking-uri", store, "--no-log"]
    assert evaluate_job.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: dataset mismatch:") and "'cifar10_relabelled'" in line
    # A model without the dataset in its metadata: the class names decide (5 vs 10 here).
    with pytest.raises(EvaluationError, match="predicts 5 classes"):
        evaluate.evaluate_model(f"models:/{FIVE}/1", other, tracking_uri=store)


def test_evaluate_job_prints_writes_csv_and_logs_one_run(dataset, store, models, tmp_path, capsys):
    uri, manifest, _ = dataset
    version, run_id, acc = models["medium"]
    out = tmp_path / "per_class.csv"
    argv = [
        "--model", f"models:/{MODEL}/{version}", "--data", uri, "--split", "val",
        "--output", str(out), "--tracking-uri", store, "--batch-size", "16",
    ]  # fmt: skip
    assert evaluate_job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and f"{100 * acc:.2f}%" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["class_name"] for r in rows] == manifest.class_names
    assert float(rows[0]["accuracy"]) == 0.0  # class 0 is predicted as class 1 (swapped rows)

    # Re-evaluating the same version on the same data reuses its MLflow run.
    assert evaluate_job.main(argv) == 0
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(evaluate.EVAL_EXPERIMENT)
    eval_runs = client.search_runs([exp.experiment_id])
    assert len(eval_runs) == 1
    run = eval_runs[0]
    digest = runs.manifest_hash(manifest)
    assert run.info.run_name == f"eval-{MODEL}-v{version}-val-{digest}"
    assert run.data.tags[evaluate.TAG_EVAL_MODEL_NAME] == MODEL
    assert run.data.tags[evaluate.TAG_EVAL_MODEL_VERSION] == version
    assert run.data.tags[evaluate.TAG_EVAL_SOURCE_RUN] == run_id
    assert run.data.tags[runs.TAG_MANIFEST_HASH] == digest
    assert run.data.metrics["val/acc"] == pytest.approx(acc)
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "val")}
    assert {"val/per_class.csv", "val/per_class_accuracy.png", "val/reliability.png"} <= artifacts
    tags = client.get_model_version(MODEL, version).tags
    assert float(tags["eval_val_acc"]) == pytest.approx(acc)
    # The evaluated split is the run's one dataset input, logged once over both evaluations.
    [entry] = run.inputs.dataset_inputs
    assert entry.dataset.name == "cifar10-lt-if3-val"
    assert entry.dataset.digest == lineage.split_digest(manifest, "val")  # the split's own
    assert json.loads(entry.dataset.source) == {"uri": Path(uri).resolve().as_uri()}
    profile = json.loads(entry.dataset.profile)
    assert profile["num_rows"] == 60 and profile["class_counts"] == [6] * 10
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "validation")]

    # --no-log: nothing is written to MLflow.
    bad_version = models["bad"][0]
    before = client.get_model_version(MODEL, bad_version).tags
    argv = ["--model", f"models:/{MODEL}/{bad_version}", "--data", uri, "--no-log",
            "--tracking-uri", store]  # fmt: skip
    assert evaluate_job.main(argv) == 0
    assert client.get_model_version(MODEL, bad_version).tags == before
    assert len(client.search_runs([exp.experiment_id])) == 1


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (f"models:/{MODEL}@nope", None, rf"model '{MODEL}' has no alias 'nope'"),
        (f"models:/{MODEL}/42", None, rf"model '{MODEL}' has no version 42 \(versions: 1, 2, 3\)"),
        ("models:/no-such-model@candidate", None, "no registered model named 'no-such-model'"),
        (f"models:/{FIVE}/1", None, "predicts 5 classes but dataset .* has 10 classes"),
        (f"models:/{MODEL}/1", "missing", "no manifest.json at"),
    ],
)
def test_evaluate_job_errors_are_one_line(
    dataset, store, models, tmp_path, capsys, model, data, message
):
    uri = str(tmp_path / "empty") if data == "missing" else dataset[0]
    argv = ["--model", model, "--data", uri, "--tracking-uri", store, "--no-log"]
    assert evaluate_job.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0])
    assert captured.out == ""


def test_unreachable_tracking_server_is_one_line(dataset, capsys):
    from tests.helpers.s3_server import free_port

    argv = ["--model", f"models:/{MODEL}@candidate", "--data", dataset[0],
            "--tracking-uri", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    assert evaluate_job.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0] and err[0].startswith("error: ")


# ---- promote ---------------------------------------------------------------------------------


def _promote(capsys, *args: str) -> tuple[int, str, str]:
    code = promote_job.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_promotion_lifecycle(dataset, store, models, capsys):
    uri, manifest, _ = dataset
    common = ["--model-name", MODEL, "--data", uri, "--tracking-uri", store]
    v_medium, _, acc_medium = models["medium"]
    v_bad, _, acc_bad = models["bad"]
    v_good, _, acc_good = models["good"]
    client = MlflowClient(store)

    def champion() -> str | None:
        mv = versions.get_alias_version(MODEL, "champion", tracking_uri=store)
        return None if mv is None else str(mv.version)

    # 1. First promotion: a candidate and no champion.
    versions.set_alias(MODEL, "candidate", v_medium, tracking_uri=store)
    assert champion() is None
    code, out, _ = _promote(capsys, *common)
    assert code == 0 and "first-promotion" in out
    assert champion() == v_medium
    tags = client.get_model_version(MODEL, v_medium).tags
    assert tags["promotion.decision"] == "first-promotion"
    assert tags["promotion.role"] == "candidate"
    assert float(tags["promotion.candidate_score"]) == pytest.approx(acc_medium)
    assert tags["promotion.champion_score"] == "none"
    assert tags["promotion.split"] == "val" and tags["promotion.margin"] == "0.002"
    assert tags["promotion.dataset_manifest_hash"] == runs.manifest_hash(manifest)
    assert tags["promotion.timestamp"].endswith("Z")

    # 2. Idempotent: the same candidate again changes nothing.
    before = _state(store, MODEL)
    code, out, _ = _promote(capsys, *common)
    assert code == 0 and "already-champion" in out
    assert _state(store, MODEL) == before

    # 3. A worse candidate is refused; the decision is recorded on both versions.
    versions.set_alias(MODEL, "candidate", v_bad, tracking_uri=store)
    code, out, _ = _promote(capsys, *common)
    assert code == 0 and "keep" in out
    assert f"{100 * acc_bad:.2f}%" in out and f"{100 * acc_medium:.2f}%" in out
    assert champion() == v_medium
    for version, role in ((v_bad, "candidate"), (v_medium, "champion")):
        tags = client.get_model_version(MODEL, version).tags
        assert tags["promotion.decision"] == "keep" and tags["promotion.role"] == role
        assert float(tags["promotion.candidate_score"]) == pytest.approx(acc_bad)
        assert float(tags["promotion.champion_score"]) == pytest.approx(acc_medium)
        assert tags["promotion.candidate_version"] == v_bad
        assert tags["promotion.champion_version"] == v_medium

    # 4. --dry-run of a promotion that would happen: aliases and all tags stay as they were.
    versions.set_alias(MODEL, "candidate", v_good, tracking_uri=store)
    before = _state(store, MODEL)
    code, out, _ = _promote(capsys, *common, "--dry-run")
    assert code == 0 and "promote:" in out and "dry run" in out
    assert _state(store, MODEL) == before
    # A margin the candidate does not clear keeps the champion (still a dry run).
    code, out, _ = _promote(capsys, *common, "--dry-run", "--margin", "0.9")
    assert code == 0 and "keep" in out
    assert _state(store, MODEL) == before

    # 5. A better candidate is promoted (through the API: the decision object).
    decision = promotion.promote(MODEL, uri, tracking_uri=store)
    assert decision.action == "promote"
    assert (decision.candidate_version, decision.champion_version) == (v_good, v_medium)
    assert decision.candidate_score == acc_good and decision.champion_score == acc_medium
    assert champion() == v_good
    assert client.get_model_version(MODEL, v_medium).tags["promotion.decision"] == "promote"
    assert client.get_model_version(MODEL, v_good).tags["promotion.role"] == "candidate"

    # 6. And again: already champion, nothing changes.
    before = _state(store, MODEL)
    decision = promotion.promote(MODEL, uri, tracking_uri=store)
    assert decision.action == "already-champion"
    assert decision.candidate_score == decision.champion_score == acc_good
    assert _state(store, MODEL) == before


def test_promote_errors(dataset, store, models, capsys):
    uri, _, _ = dataset
    code, out, err = _promote(capsys, "--model-name", FIVE, "--data", uri, "--tracking-uri", store)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines == [
        f"error: model '{FIVE}' has no 'candidate' alias: nothing to promote "
        "(a finished training run sets it)"
    ]
    code, _, err = _promote(
        capsys, "--model-name", "nobody", "--data", uri, "--tracking-uri", store
    )
    assert code == 1 and "no registered model named 'nobody'" in err
    with pytest.raises(EvaluationError, match="margin must be"):
        promotion.promote(MODEL, uri, margin=-0.1, tracking_uri=store)
    with pytest.raises(SystemExit):
        promote_job.build_parser().parse_args(
            ["--model-name", "x", "--data", uri, "--margin", "-1"]
        )
    assert promotion.split_warning("val") is None
    assert "test" in promotion.split_warning("test")


@pytest.mark.parametrize("job", ["jobs.evaluate", "jobs.promote"])
def test_jobs_run_as_modules(job):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", job, "--help"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--tracking-uri" in done.stdout


def test_decision_rule():
    assert promotion.decide(0.5, None, 0.002)[0] == "first-promotion"
    assert promotion.decide(0.6, 0.598, 0.002)[0] == "promote"  # exactly the margin
    assert promotion.decide(0.5999, 0.598, 0.002)[0] == "keep"
    assert promotion.decide(0.7, 0.5, 0.0)[0] == "promote"
    assert promotion.decide(0.5, 0.5, 0.0)[0] == "promote"


def test_registry_errors_reach_the_api(store, models, dataset):
    with pytest.raises(RegistryError, match="has no alias 'champion'"):
        evaluate.evaluate_model(f"models:/{FIVE}@champion", dataset[0], tracking_uri=store)
