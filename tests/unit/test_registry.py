"""pipeline.tracking.registry and pipeline.tracking.versions against a real MLflow SQLite store: register,
aliases, load, lookup errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, build_config
from pipeline.data.readers.transforms import CIFAR_MEAN, CIFAR_STD
from pipeline.models import ImageClassifier, build_model

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.tracking import registry, runs, versions  # noqa: E402
from pipeline.tracking.store import mlflow_uris  # noqa: E402
from pipeline.tracking.versions import RegistryError  # noqa: E402
from tests.helpers.mlflow_env import isolated_mlflow_env  # noqa: E402

NAMES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module", autouse=True)
def _mlflow_env(tmp_path_factory):
    with isolated_mlflow_env(tmp_path_factory.mktemp("cwd")):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tiny_shike(seed: int) -> torch.nn.Module:
    """The real SHIKE ResNet-32 (3 experts, DKF) for 10 classes, in its final (stage-2) heads."""
    torch.manual_seed(seed)
    net = build_model(ModelConfig(), 10)
    net.set_stage(2)
    return net.eval()


def images(n: int = 6, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def registered(store):
    """A run with one registered version (v1) of model `shike-unit`."""
    run_id = runs.start_or_resume_run(store, "exp-registry", "reg-run")
    net = tiny_shike(0)
    mv = registry.log_and_register(
        run_id, net, NAMES, "shike-unit", mean=CIFAR_MEAN, std=CIFAR_STD,
        metrics={"val/acc": 0.4125, "test/acc": 0.39}, tracking_uri=store,
    )  # fmt: skip
    eager = ImageClassifier(net, CIFAR_MEAN, CIFAR_STD, NAMES).eval()
    return run_id, mv, eager


# ---- names -----------------------------------------------------------------------------------


def test_model_name_for():
    assert registry.model_name_for(build_config()) == "shike-cifar100-lt-if100"
    cfg = build_config({"data": {"dataset": "cifar10", "imbalance_factor": 50}})
    assert registry.model_name_for(cfg) == "shike-cifar10-lt-if50"
    cfg = build_config({"data": {"dataset": "cifar10"}, "model": {"arch": "resnet32"}})
    assert registry.model_name_for(cfg) == "shike-cifar10-lt-if100-resnet32"
    cfg = build_config({"data": {"imbalance_factor": 12.5}})
    assert registry.model_name_for(cfg) == "shike-cifar100-lt-if12p5"
    cfg = build_config({"tracking": {"model_name": "custom"}})
    assert registry.model_name_for(cfg) == "custom"
    cfg = build_config({"data": {"dataset": "imagenet_lt"}, "model": {"arch": "shike_resnext50"}})
    assert registry.model_name_for(cfg) == "shike-imagenet-lt-resnext50"


# ---- register --------------------------------------------------------------------------------


def test_first_registration_is_version_1_with_candidate(registered, store):
    run_id, mv, _ = registered
    assert str(mv.version) == "1"
    assert mv.aliases == ["candidate"]
    assert mv.run_id == run_id
    assert mv.tags["val_acc"] == "0.4125" and mv.tags["test_acc"] == "0.39"
    assert mv.tags["shike.run_id"] == run_id
    assert mv.tags["shike.run_name"] == "reg-run"
    assert (
        str(versions.get_alias_version("shike-unit", "candidate", tracking_uri=store).version)
        == "1"
    )
    assert versions.get_alias_version("shike-unit", "champion", tracking_uri=store) is None
    # The model's artifacts live beside the SQLite file, not in the working directory.
    source = versions.resolve_model_version("models:/shike-unit@candidate", tracking_uri=store)
    loc = MlflowClient(store).get_model_version_download_uri("shike-unit", source.version)
    assert loc.startswith(Path(store[len("sqlite:///") :]).parent.as_uri() + "/mlartifacts/")


def test_pyfunc_and_pytorch_loads_predict_like_the_eager_model(registered, store):
    _, _, eager = registered
    x = images()
    with torch.no_grad():
        expected = eager(torch.from_numpy(x)).numpy()
    assert expected.shape == (6, 10)
    np.testing.assert_allclose(expected.sum(1), 1.0, rtol=1e-5)

    # Plain MLflow, as a user would call it.
    with mlflow_uris(store):
        pyfunc = mlflow.pyfunc.load_model("models:/shike-unit@candidate")
        torch_model = mlflow.pytorch.load_model("models:/shike-unit@candidate")
    np.testing.assert_allclose(pyfunc.predict(x), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    assert pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"] == {
        "dtype": "uint8",
        "shape": (-1, 32, 32, 3),
    }

    # Our helpers.
    clf = registry.load_classifier("models:/shike-unit@candidate", tracking_uri=store)
    assert isinstance(clf, ImageClassifier) and not clf.training
    assert clf.class_names == NAMES
    with torch.no_grad():
        np.testing.assert_allclose(clf(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    via_helper = registry.load_pyfunc("models:/shike-unit/1", tracking_uri=store)
    np.testing.assert_allclose(via_helper.predict(x[:1]), expected[:1], atol=1e-5)
    assert registry.class_names_of("models:/shike-unit@candidate", tracking_uri=store) == NAMES


def test_second_registration_moves_candidate(store):
    run_a = runs.start_or_resume_run(store, "exp-registry", "move-a")
    run_b = runs.start_or_resume_run(store, "exp-registry", "move-b")
    kwargs = dict(mean=CIFAR_MEAN, std=CIFAR_STD, tracking_uri=store)
    v1 = registry.log_and_register(run_a, tiny_shike(1), NAMES, "shike-move", **kwargs)
    v2 = registry.log_and_register(run_b, tiny_shike(2), NAMES, "shike-move", **kwargs)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    current = versions.get_alias_version("shike-move", "candidate", tracking_uri=store)
    assert str(current.version) == "2" and current.run_id == run_b
    assert MlflowClient(store).get_model_version("shike-move", "1").aliases == []
    # The two versions hold different weights: loading by alias gives the second.
    x = torch.from_numpy(images(3))
    by_alias = registry.load_classifier("models:/shike-move@candidate", tracking_uri=store)
    first = registry.load_classifier("models:/shike-move/1", tracking_uri=store)
    assert not torch.allclose(by_alias(x), first(x))
    # runs:/ URIs resolve to the version registered from that run.
    assert (
        str(versions.resolve_model_version(f"runs:/{run_a}/model", tracking_uri=store).version)
        == "1"
    )

    versions.set_alias("shike-move", "champion", 1, tracking_uri=store)
    assert (
        str(versions.get_alias_version("shike-move", "champion", tracking_uri=store).version) == "1"
    )
    with pytest.raises(
        RegistryError, match=r"model 'shike-move' has no version 7 \(versions: 1, 2\)"
    ):
        versions.set_alias("shike-move", "champion", 7, tracking_uri=store)


def test_registering_an_image_classifier_and_a_wrong_class_count(store):
    run_id = runs.start_or_resume_run(store, "exp-registry", "wrapper-run")
    with pytest.raises(RegistryError, match="3 class names given"):
        registry.log_and_register(
            run_id, tiny_shike(3), NAMES[:3], "shike-bad", mean=CIFAR_MEAN, std=CIFAR_STD,
            tracking_uri=store,
        )  # fmt: skip
    with pytest.raises(RegistryError, match="no registered model named 'shike-bad'"):
        versions.resolve_model_version("models:/shike-bad@candidate", tracking_uri=store)
    # An ImageClassifier is registered as is; alias=None leaves the aliases alone.
    wrapper = ImageClassifier(tiny_shike(4), CIFAR_MEAN, CIFAR_STD, NAMES).eval()
    mv = registry.log_and_register(
        run_id, wrapper, NAMES, "shike-wrapper", mean=CIFAR_MEAN, std=CIFAR_STD, alias=None,
        tracking_uri=store,
    )  # fmt: skip
    assert str(mv.version) == "1" and mv.aliases == []
    x = torch.from_numpy(images(2))
    loaded = registry.load_classifier("models:/shike-wrapper/1", tracking_uri=store)
    torch.testing.assert_close(loaded(x), wrapper(x), atol=1e-5, rtol=0)


def test_version_description_states_recipe_data_and_scores(store, tmp_path):
    from pipeline.data.manifest import read_manifest

    data = tmp_path / "c10-lt"
    data.mkdir()
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "manifest_cifar10_v1.json"
    (data / "manifest.json").write_bytes(fixture.read_bytes())
    manifest = read_manifest(str(data))
    cfg = build_config(
        {
            "name": "smoke-desc",
            "data": {"dataset": "cifar10", "imbalance_factor": 10, "uri": "c10-lt"},
            "optim": {"epochs": 4, "stage2_start": 3},
            "train": {"seed": 7},
        }
    )
    metrics = {
        "test/acc": 0.4125, "test/acc_many": float("nan"), "test/acc_medium": 0.5,
        "test/acc_few": 0.3, "test/ece": 0.0531, "val/acc": 0.45,
    }  # fmt: skip
    text = registry.version_description(cfg, manifest, metrics, run_name="described-run")
    text += "\nRe-run: `--set data.uri=s3://rd:pw1234@bkt/c10`\n"  # a password is masked
    run_id = runs.start_or_resume_run(store, "exp-registry", "described-run")
    mv = registry.log_and_register(
        run_id, tiny_shike(5), manifest.class_names, "shike-described", mean=CIFAR_MEAN,
        std=CIFAR_STD, metrics=metrics, tracking_uri=store, description=text,
    )  # fmt: skip
    client = MlflowClient(store)
    stored = client.get_model_version("shike-described", mv.version).description
    assert stored == mv.description == text.replace("rd:pw1234@", "rd:***@")
    for part in (
        "SHIKE image classifier for the 10 classes of `cifar10`, trained by run `described-run`.",
        "config `smoke-desc`",  # recipe
        f"hash `{cfg.config_hash()}`",
        "arch `shike_resnet32`",
        "loss stage 1 `shike` (CE 1, DKT 10, MD 1), stage 2 `balanced_softmax` for the last 1 epoch",
        "4 epochs, seed 7",
        "`cifar10` (imbalance factor 10)",  # data
        f"at `{data.as_uri()}`, manifest hash `{runs.manifest_hash(manifest)}`",
        "s3://rd:***@bkt/c10",
        "118 training images",
        "**Test**: top-1 41.25%; many n/a / medium 50.00% / few 30.00%; ECE 0.0531.",  # scores
        "**Validation**: top-1 45.00%",
    ):
        assert part in stored, part
    assert "pw1234" not in stored
    # The registered model is described once; a user's own text is kept.
    assert client.get_registered_model("shike-described").description == registry.MODEL_DESCRIPTION
    client.update_registered_model("shike-described", description="ours")
    sweep_text = registry.version_description(cfg, manifest, {"val/acc": 0.4})
    assert "**Test**: not evaluated in this run" in sweep_text
    assert "**Validation**: top-1 40.00%." in sweep_text
    v2 = registry.log_and_register(
        run_id, tiny_shike(6), manifest.class_names, "shike-described", mean=CIFAR_MEAN,
        std=CIFAR_STD, tracking_uri=store, description=sweep_text,
    )  # fmt: skip
    assert v2.description == sweep_text
    assert client.get_registered_model("shike-described").description == "ours"


# ---- lookup errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "models:/shike-unit@nope",
            r"model 'shike-unit' has no alias 'nope' \(aliases: candidate -> v1\)",
        ),
        ("models:/shike-unit/9", r"model 'shike-unit' has no version 9 \(versions: 1\)"),
        ("models:/no-such-model@candidate", r"no registered model named 'no-such-model'"),
        ("models:/shike-unit/Production", r"version must be a number or 'latest'"),
        ("s3://bucket/model", r"unsupported model URI"),
        ("runs:/0123456789abcdef/model", r"no registered model version comes from run"),
    ],
)
def test_unknown_alias_version_name_are_clear_errors(registered, store, uri, message):
    with pytest.raises(RegistryError, match=message):
        versions.resolve_model_version(uri, tracking_uri=store)


def test_load_with_unknown_alias_is_a_clear_error(registered, store):
    with pytest.raises(RegistryError, match="has no alias 'champion'"):
        registry.load_classifier("models:/shike-unit@champion", tracking_uri=store)
    with pytest.raises(RegistryError, match="has no version 5"):
        registry.class_names_of("models:/shike-unit/5", tracking_uri=store)
    with pytest.raises(RegistryError, match="no registered model named"):
        versions.get_alias_version("missing-model", "candidate", tracking_uri=store)


def test_latest_and_run_uris(registered, store):
    run_id, _, _ = registered
    assert (
        str(versions.resolve_model_version("models:/shike-unit/latest", tracking_uri=store).version)
        == "1"
    )
    assert (
        versions.resolve_model_version(f"runs:/{run_id}/model", tracking_uri=store).name
        == "shike-unit"
    )
