"""MLflow Model Registry: log and register the inference model, load it back.

The registered artifact is `ImageClassifier` (pipeline/models/inference.py): uint8 RGB images
(N, H, W, 3) in, class probabilities (N, C) out, normalisation baked in, `class_names` attached.
One registered model per dataset setting (`shike-cifar100-lt-if100`); each finished run adds a
version and moves the `candidate` alias to it; only the promotion job moves `champion`.

    mv = log_and_register(run_id, net, class_names, model_name_for(cfg), mean=CIFAR_MEAN,
                          std=CIFAR_STD, metrics={"val/acc": 0.41}, tracking_uri=uri)
    clf = load_classifier("models:/shike-cifar100-lt-if100@candidate", tracking_uri=uri)
    probs = clf(torch.from_numpy(uint8_batch))

Model URIs (`models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/<name>/latest`,
`runs:/<run_id>/<path>`), version lookup, aliases and version tags: `pipeline/tracking/versions.py`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.credentials import redact_uri
from pipeline.data.readers.transforms import normalization
from pipeline.evaluation.reports import format_percent
from pipeline.models import ImageClassifier
from pipeline.tracking.lineage import dataset_location, imbalance_label
from pipeline.tracking.runs import (
    TAG_CONFIG_HASH,
    TAG_MANIFEST_HASH,
    TAG_RUN_NAME,
    manifest_hash,
)
from pipeline.tracking.store import (
    check_tracking_server,
    checked_tags,
    checked_value,
    mlflow_uris,
    resolve_tracking_uri,
)
from pipeline.tracking.versions import (
    CANDIDATE,
    TAG_RUN_ID,
    RegistryError,
    is_missing,
    pinned_model_uri,
)
from pipeline.training.checkpoint import load_trained_model

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.manifest import Manifest

MODEL_ARTIFACT_NAME = "model"
# The registered model's description, set when it has none (each version describes itself).
MODEL_DESCRIPTION = (
    "SHIKE image classifiers (mixture-of-experts ResNet for long-tailed recognition). Input: "
    "uint8 RGB images (N, H, W, 3); output: class probabilities (N, C); class names in the "
    "model's metadata. Each finished training run registers a version and moves the "
    "`candidate` alias to it; `jobs.promote` moves `champion` when the candidate is better on "
    "the held-out split. Each version's description states its recipe, data and test scores.\n"
)
CLASS_NAMES_FILE = "class_names.json"

# Why the pickle format and not MLflow 3.17's default `pt2` (torch.export):
# * pt2 loads back through `mlflow.pytorch.load_model` as a torch.fx GraphModule: the
#   `class_names` attribute is gone, `.eval()`/`.train()` raise "not supported", and the graph
#   is specialised to what the export traced (the batch dimension is only dynamic when the input
#   example has >= 2 images; every other shape is frozen).
# * pickle (`torch.save` of the eager module) loads back as the very `ImageClassifier` that was
#   trained: same code path, bit-identical outputs, `class_names`, `.eval()`, `.to(device)`,
#   and both `mlflow.pyfunc` and `mlflow.pytorch` loaders work (verified in the unit tests).
# Its cost is that unpickling needs the class definitions: the model's own code
# (`pipeline/__init__.py` + `pipeline/models/`, torch/torchvision only) is bundled with the
# model via `code_paths`, so a serving environment without this project can load it too.
# Unpickling runs code from the artifact store, so the registry must be trusted (it is ours);
# a site that sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false gets MLflow's explicit refusal.
SERIALIZATION_FORMAT = "pickle"


# ---- names -----------------------------------------------------------------------------------


BENCHMARK_NAMES = {"imagenet_lt": "imagenet-lt", "inat2018": "inat2018", "places_lt": "places-lt"}


def model_name_for(cfg: Config) -> str:
    """`cfg.tracking.model_name`, else `shike-<dataset>-lt-if<IF>` (+ `-<arch>` when the
    architecture is not the paper's shike_resnet32), e.g. shike-cifar100-lt-if100,
    shike-cifar10-lt-if100-resnet32; the large benchmarks: shike-imagenet-lt-resnext50."""
    if cfg.tracking.model_name:
        return cfg.tracking.model_name
    if cfg.data.dataset in BENCHMARK_NAMES:  # long-tailed by their own lists: no IF to name
        return f"shike-{BENCHMARK_NAMES[cfg.data.dataset]}-{cfg.model.arch.removeprefix('shike_')}"
    name = f"shike-{cfg.data.dataset}-lt-{imbalance_label(cfg.data.imbalance_factor)}"
    if cfg.model.arch != "shike_resnet32":
        name += "-" + cfg.model.arch.replace("_", "-")
    return name


# ---- descriptions ------------------------------------------------------------------------------


def _metric(metrics: Mapping[str, Any], split: str, key: str) -> Any:
    """`metrics["test/acc"]`, or its underscored form `test_acc` (what version tags use)."""
    return metrics.get(f"{split}/{key}", metrics.get(f"{split}_{key}"))


def _scores_line(label: str, metrics: Mapping[str, Any], split: str) -> str | None:
    if _metric(metrics, split, "acc") is None:
        return None
    groups = " / ".join(
        f"{group} {format_percent(_metric(metrics, split, f'acc_{group}'), width=0)}"
        for group in ("many", "medium", "few")
        if _metric(metrics, split, f"acc_{group}") is not None
    )
    line = f"**{label}**: top-1 {format_percent(_metric(metrics, split, 'acc'), width=0)}"
    if groups:
        line += f"; {groups}"
    ece = _metric(metrics, split, "ece")
    try:
        if ece is not None and math.isfinite(float(ece)):
            line += f"; ECE {float(ece):.4f}"
    except (TypeError, ValueError):
        pass
    return line + "."


def version_description(
    cfg: Config,
    manifest: Manifest,
    metrics: Mapping[str, Any] | None = None,
    *,
    run_name: str | None = None,
) -> str:
    """The model version's description (Markdown, shown on its page in the MLflow UI): the
    recipe (config name and hash, architecture, losses, epochs, seed), the data (dataset, URI,
    manifest hash, training images) and the held-out scores in `metrics` (`test/acc`,
    `test/acc_many|medium|few`, `test/ece`; `val/...` too when given)."""
    metrics = metrics or {}
    loss = cfg.loss
    stage1 = f"`{loss.stage1}`"
    if loss.stage1 == "shike":
        stage1 += f" (CE {loss.ce_weight:g}, DKT {loss.dkt_weight:g}, MD {loss.md_weight:g})"
    losses = f"stage 1 {stage1}"
    if cfg.optim.stage2_start < cfg.optim.epochs:
        last = cfg.optim.epochs - cfg.optim.stage2_start  # stage2_start counts from 0
        losses += f", stage 2 `{loss.stage2}` for the last {last} epoch{'s' if last > 1 else ''}"
    trained_by = f", trained by run `{run_name}`" if run_name else ""
    train_rows = manifest.splits["train"].num_rows if "train" in manifest.splits else None
    data_uri = dataset_location(manifest) or cfg.data.uri
    lines = [
        f"SHIKE image classifier for the {manifest.num_classes} classes of "
        f"`{manifest.dataset}`{trained_by}.",
        "",
        f"**Recipe**: config `{cfg.name}` (hash `{cfg.config_hash()}`), arch "
        f"`{cfg.model.arch}`, loss {losses}, {cfg.optim.epochs} epochs, seed {cfg.train.seed}.",
        "",
        f"**Data**: `{manifest.dataset}` (imbalance factor {manifest.imbalance_factor:g}) at "
        f"`{data_uri}`, manifest hash `{manifest_hash(manifest)}`"
        + (f", {train_rows:,} training images." if train_rows is not None else "."),
        "",
        _scores_line("Test", metrics, "test")
        or "**Test**: not evaluated in this run (`jobs.evaluate --split test` scores it).",
    ]
    val = _scores_line("Validation", metrics, "val")
    if val:
        lines += ["", val]
    return "\n".join(lines) + "\n"


# ---- logging and registering -----------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def _pip_requirements() -> list[str]:
    # Explicit requirements skip MLflow's inference (which loads the model in a subprocess).
    import torchvision

    return [
        f"torch=={_base_version(torch.__version__)}",
        f"torchvision=={_base_version(torchvision.__version__)}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def _bundle_model_code(dest: Path) -> Path:
    """Copy `pipeline/__init__.py` and `pipeline/models/*.py` (all the classifier needs) to
    `dest/pipeline`; returns that folder (for `code_paths`)."""
    src = Path(__file__).resolve().parents[1]  # pipeline/
    out = dest / "pipeline"
    (out / "models").mkdir(parents=True)
    shutil.copy2(src / "__init__.py", out / "__init__.py")
    for path in sorted((src / "models").glob("*.py")):
        shutil.copy2(path, out / "models" / path.name)
    return out


def example_images(n: int = 2, image_size: int = 32, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 (n, H, W, 3) batch (the logged input example; n >= 2)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)


def _metric_tags(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if number == number:  # not NaN
            out[re.sub(r"[^A-Za-z0-9_.-]+", "_", key)] = f"{number:.6g}"
    return out


# The run's identity tags (run name, config and data hashes) that follow it to its versions.
_RUN_TAGS_KEPT = (TAG_RUN_NAME, TAG_CONFIG_HASH, TAG_MANIFEST_HASH)


def log_and_register(
    run_id: str,
    model: nn.Module,
    class_names: Sequence[str],
    name: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 32,
    metrics: Mapping[str, Any] | None = None,
    alias: str | None = CANDIDATE,
    tracking_uri: str | None = None,
    description: str | None = None,
    dataset: str | None = None,
) -> ModelVersion:
    """Log `model` (a trained ShikeNet, in the stage whose heads should serve, or an
    `ImageClassifier`) as the run's inference model and register it as a new version of `name`.

    The logged model has a signature (uint8 (-1, H, W, 3) -> float32 (-1, C)), a two-image
    input example, `class_names` in its MLmodel metadata and as `class_names.json`, and
    `class_names` on the loaded module. The version is tagged with `metrics` (`val/acc` ->
    tag `val_acc`), the run id and the run's config / dataset hashes, and described by
    `description` (Markdown, e.g. `version_description`; URI passwords masked); `alias`
    (default `candidate`, None for none) is moved to it. `dataset` (the training manifest's
    `dataset`) goes into the metadata so that evaluation refuses data of another dataset
    (`evaluate.check_dataset`); without it only the class names are compared. Returns the
    version as stored.
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        raise RegistryError(f"no MLflow run {run_id} at {redact_uri(uri)}") from exc
    names = [str(c) for c in class_names]
    classifier = _classifier(model, names, mean, std)
    example = example_images(2, image_size)
    with torch.no_grad():
        probs = classifier(torch.from_numpy(example)).numpy()
    if probs.shape != (2, len(names)):
        raise RegistryError(
            f"model outputs shape {probs.shape[1:]} per image, but {len(names)} class names given"
        )
    metadata = _metadata(names, mean, std, image_size, dataset)
    version_tags = {TAG_RUN_ID: run_id, **_metric_tags(metrics)}
    version_tags.update({k: run.data.tags[k] for k in _RUN_TAGS_KEPT if k in run.data.tags})
    version_tags = checked_tags(version_tags, "model version tag")
    if description is not None:
        description = checked_value("model version", "description", description)
    with mlflow_uris(uri):
        model_uri = _log_model(client, run, classifier, example, probs, metadata)
        mv = mlflow.register_model(model_uri, name, tags=version_tags)
    if description:
        client.update_model_version(name, mv.version, description=description)
    if not client.get_registered_model(name).description:  # a user's own text is kept
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return client.get_model_version(name, mv.version)


def _classifier(
    model: nn.Module, names: list[str], mean: Sequence[float], std: Sequence[float]
) -> ImageClassifier:
    """A CPU copy of `model` as the served `ImageClassifier` (normalisation baked in)."""
    if isinstance(model, ImageClassifier):
        classifier = copy.deepcopy(model).cpu().eval()
    else:
        net = copy.deepcopy(_unwrap(model)).cpu().eval()
        classifier = ImageClassifier(net, mean, std, names).eval()
    if list(classifier.class_names) != names:
        raise RegistryError("the classifier's class_names differ from the class_names given")
    return classifier


def _metadata(
    names: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    dataset: str | None,
) -> dict[str, Any]:
    metadata = {
        "class_names": names,
        "num_classes": len(names),
        "input": f"uint8 RGB images (N, {image_size}, {image_size}, 3)",
        "output": "class probabilities (N, C)",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "image_size": int(image_size),
    }
    if dataset is not None:
        metadata["dataset"] = str(dataset)
    return metadata


def _log_model(
    client: MlflowClient,
    run: Any,
    classifier: ImageClassifier,
    example: np.ndarray,
    probs: np.ndarray,
    metadata: dict[str, Any],
) -> str:
    """Log the classifier as the run's model (with the model code and class names beside it);
    its model URI. Call inside `mlflow_uris`."""
    run_id = run.info.run_id
    # The LoggedModel is created explicitly in the run's experiment: MLflow's fluent helper
    # would otherwise pick the process's "current" experiment (Default, or $MLFLOW_EXPERIMENT_ID).
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id
    )
    with tempfile.TemporaryDirectory(prefix="shike-model-") as tmp:
        code_dir = _bundle_model_code(Path(tmp) / "code")
        names_file = Path(tmp) / CLASS_NAMES_FILE
        names_file.write_text(json.dumps(metadata["class_names"], indent=1) + "\n")
        info = mlflow.pytorch.log_model(
            classifier,
            name=MODEL_ARTIFACT_NAME,
            model_id=logged.model_id,
            run_id=run_id,
            signature=infer_signature(example, probs),
            input_example=example,
            metadata=metadata,
            code_paths=[str(code_dir)],
            extra_files=[str(names_file)],
            pip_requirements=_pip_requirements(),
            serialization_format=SERIALIZATION_FORMAT,
        )
    return info.model_uri


def register_trained_model(
    checkpoint_dir: str | Path,
    cfg: Config,
    manifest: Manifest,
    *,
    run_id: str,
    run_name: str,
    metrics: dict[str, Any],
    tracking_uri: str,
) -> str:
    """Register the model of a training checkpoint (a local folder) from its MLflow run, with
    alias `candidate`; the version. Its signature takes the images the model was trained on:
    the dataset's own size (CIFAR-style), else data.image_size (ImageNet-style datasets, whose
    sizes vary: callers resize and centre-crop first, `transforms.evaluation_crop`). The
    version's description states the recipe, the data and the test scores in `metrics`
    (`version_description`). The one registration of training runs and sweeps."""
    model = load_trained_model(checkpoint_dir, cfg, manifest.num_classes)
    mean, std = normalization(cfg.data.augment)
    image_size = manifest.image_shape[0] if manifest.image.fixed_size else cfg.data.image_size
    version = log_and_register(
        run_id,
        model,
        list(manifest.class_names),
        model_name_for(cfg),
        mean=mean,
        std=std,
        image_size=image_size,
        metrics={k.replace("/", "_"): v for k, v in metrics.items()},
        tracking_uri=tracking_uri,
        dataset=manifest.dataset,
        description=version_description(cfg, manifest, metrics, run_name=run_name),
    )
    return str(version.version)


# ---- loading ---------------------------------------------------------------------------------


def load_classifier(
    model_uri: str, *, tracking_uri: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The registered `ImageClassifier` (eager, in eval mode, on `device`): uint8 (N, H, W, 3)
    tensor in, probabilities (N, C) out, `.class_names` set."""
    uri = resolve_tracking_uri(tracking_uri)
    target = pinned_model_uri(model_uri, tracking_uri=uri)
    with mlflow_uris(uri):
        try:
            model = mlflow.pytorch.load_model(target, map_location=torch.device(device))
        except MlflowException as exc:
            raise RegistryError(f"cannot load {model_uri}: {exc.message}") from exc
    return model.to(device).eval()


def load_pyfunc(model_uri: str, *, tracking_uri: str | None = None) -> Any:
    """The model as an `mlflow.pyfunc.PyFuncModel` (`predict(uint8 ndarray) -> ndarray`)."""
    uri = resolve_tracking_uri(tracking_uri)
    target = pinned_model_uri(model_uri, tracking_uri=uri)
    with mlflow_uris(uri):
        try:
            return mlflow.pyfunc.load_model(target)
        except MlflowException as exc:
            raise RegistryError(f"cannot load {model_uri}: {exc.message}") from exc


def model_metadata(model_uri: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The metadata `log_and_register` stored in the model's MLmodel file (only that file is
    read): class_names, image_size, the input's description, and the dataset it was trained
    on ("dataset"; absent in versions registered before it was recorded)."""
    uri = resolve_tracking_uri(tracking_uri)
    target = pinned_model_uri(model_uri, tracking_uri=uri)
    with mlflow_uris(uri):
        try:
            info = mlflow.models.get_model_info(target)
        except MlflowException as exc:
            raise RegistryError(f"cannot read {model_uri}: {exc.message}") from exc
    return dict(info.metadata or {})


def class_names_of(model_uri: str, *, tracking_uri: str | None = None) -> list[str]:
    """Class names stored with the model."""
    names = model_metadata(model_uri, tracking_uri=tracking_uri).get("class_names")
    if not names:
        raise RegistryError(f"{model_uri} carries no class_names metadata")
    return [str(n) for n in names]
