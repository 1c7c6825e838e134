"""Evaluate a registered model on a prepared split, and record the evaluation in MLflow.

What `jobs/evaluate.py` runs (DESIGN.md "Training contract": the registry holds
`ImageClassifier`s), and what the promotion rule (`pipeline/evaluation/promotion.py`) scores models with:

    report = evaluate_model("models:/shike-cifar10-lt-if100@candidate", "s3://bucket/c10-lt")
    print(reports.format_table(report))
    log_evaluation_run(report, tracking_uri)          # MLflow run + version tag eval_val_acc

Scoring itself is Ray-free (`pipeline/evaluation/scoring.py`). `workers > 1` only changes *where* the
batches run: on Ray Data actors (`ActorPoolStrategy(size=workers)`), each holding the
classifier, with one Ray Data row per evaluation batch so that Ray's own block and batch cuts
can never re-cut a batch (`pipeline/distributed/scoring.py`, imported only on that path). The
per-batch counts are summed in batch order either way: the totals are identical to
`workers=1`, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader

from pipeline.data import DataError
from pipeline.data.integrity import verify_dataset
from pipeline.data.manifest import Manifest, manifest_hash, read_manifest
from pipeline.data.readers.stream_reader import ShardStream, collate_crops
from pipeline.data.readers.transforms import DecodeGeometry
from pipeline.data.shards import load_split
from pipeline.evaluation.reports import EvaluationReport, per_class_rows
from pipeline.evaluation.scoring import (
    EvaluationError,
    batch_ranges,
    check_batch_size,
    count_predictions,
    score_batch,
    sum_batch_counts,
)
from pipeline.tracking import registry, runs
from pipeline.tracking.store import check_tracking_server, resolve_tracking_uri
from pipeline.tracking.versions import (
    TAG_RUN_ID,
    RegistryError,
    resolve_model_version,
    set_version_tags,
)

if TYPE_CHECKING:
    from torch import nn

    from pipeline.evaluation.metrics import EvalCounts
    from pipeline.storage import S3Options

EVAL_EXPERIMENT = "shike-evaluations"

# Tags on the evaluation run (model version it evaluated; the dataset hash is tracking's tag).
TAG_EVAL_MODEL_NAME = "shike.eval.model_name"
TAG_EVAL_MODEL_VERSION = "shike.eval.model_version"
TAG_EVAL_MODEL_URI = "shike.eval.model_uri"
TAG_EVAL_SOURCE_RUN = "shike.eval.source_run_id"
TAG_EVAL_SPLIT = "shike.eval.split"
TAG_EVAL_DATA_URI = "shike.eval.data_uri"


# ---- evaluation ------------------------------------------------------------------------------


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise EvaluationError(f"workers must be >= 1, got {workers}")


def count_split_predictions(
    classifier: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 256,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
) -> EvalCounts:
    """`scoring.count_predictions` in this process (`workers=1`) or on `workers` Ray Data
    actors; the counts are identical."""
    _check_workers(workers)
    if workers == 1:
        return count_predictions(classifier, images, labels, num_classes, batch_size=batch_size)
    from pipeline.distributed.scoring import ray_batch_counts  # Ray only on this path

    ranges = batch_ranges(len(labels), batch_size)
    flats = ray_batch_counts(
        classifier, images, labels, num_classes, ranges, workers, cpus_per_worker
    )
    return sum_batch_counts(flats, num_classes)


def _describe(model_uri: str, mv: Any) -> str:
    return f"{model_uri} (version {mv.version})" if mv is not None else model_uri


def check_dataset(model_label: str, metadata: Mapping[str, Any], manifest: Manifest) -> None:
    """The model must have been trained on the dataset it is evaluated on: a model's scores on
    another dataset (even one with the same class names, say a re-labelled copy) are not its
    scores. Models registered before their metadata recorded the dataset have no "dataset":
    for them the class names and their order decide alone (`check_classes`)."""
    trained_on = metadata.get("dataset")
    if trained_on is not None and str(trained_on) != manifest.dataset:
        raise EvaluationError(
            f"dataset mismatch: model {model_label} was trained on dataset '{trained_on}' but "
            f"{manifest.uri} holds dataset '{manifest.dataset}'"
        )


def check_classes(model_label: str, model_names: Sequence[str], manifest: Manifest) -> None:
    """The model must predict the dataset's classes, in the dataset's order."""
    names = [str(n) for n in model_names]
    if len(names) != manifest.num_classes:
        raise EvaluationError(
            f"class count mismatch: model {model_label} predicts {len(names)} classes but "
            f"dataset {manifest.uri} ({manifest.dataset}) has {manifest.num_classes} classes"
        )
    for c, (ours, theirs) in enumerate(zip(names, manifest.class_names, strict=True)):
        if ours != theirs:
            raise EvaluationError(
                f"class names differ: class {c} is {ours!r} in model {model_label} but "
                f"{theirs!r} in dataset {manifest.uri}"
            )


def evaluate_model(
    model_uri: str,
    data_uri: str,
    split: str = "val",
    *,
    tracking_uri: str | None = None,
    batch_size: int = 256,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    s3: S3Options | None = None,
    manifest: Manifest | None = None,
) -> EvaluationReport:
    """Evaluate the model at `model_uri` (`models:/<name>@<alias>`, `models:/<name>/<version>`,
    `runs:/<run_id>/<path>`) on `split` of the prepared dataset at `data_uri`.

    Errors (one line each): RegistryError (unknown model / alias / version), TrackingError
    (unreachable server), DataError (missing manifest, altered shard, unknown split),
    EvaluationError (dataset or class mismatch, empty split, bad arguments). The manifest's
    class counts (the many/medium/few groups of the report) are first checked against the
    labels in the shards of the training split and of `split` (`integrity.verify_dataset`).
    """
    # Bad arguments fail before anything is looked up or loaded.
    check_batch_size(batch_size)
    _check_workers(workers)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)

    # The version first (cheap, clear errors), then the dataset, then the weights.
    mv = _registered_version(model_uri, uri)
    manifest = _checked_manifest(data_uri, split, s3, manifest)
    classifier, metadata = _load_checked_model(model_uri, mv, manifest, uri)
    counts = _count_split(
        classifier,
        metadata,
        manifest,
        split,
        _describe(model_uri, mv),
        batch_size=batch_size,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
    )
    return _build_report(model_uri, mv, split, data_uri, manifest, counts)


def _registered_version(model_uri: str, uri: str) -> Any:
    """The registered model version `model_uri` designates; None for a runs:/ URI whose run
    registered no version."""
    try:
        return resolve_model_version(model_uri, tracking_uri=uri)
    except RegistryError:
        if not model_uri.startswith("runs:/"):
            raise
        # An unregistered model logged in a run: load_classifier says whether it exists.
        return None


def _checked_manifest(
    data_uri: str, split: str, s3: S3Options | None, manifest: Manifest | None
) -> Manifest:
    """The dataset's manifest (`manifest` when given), once `split` is known to exist, to hold
    images, and to match its shards."""
    if manifest is None:
        manifest = read_manifest(data_uri, s3)
    if split not in manifest.splits:
        raise DataError(
            f"dataset {manifest.uri} has no split '{split}' (has {', '.join(manifest.splits)})"
        )
    if manifest.splits[split].num_rows == 0:
        raise EvaluationError(f"split '{split}' of dataset {manifest.uri} has no images")
    verify_dataset(manifest, [s for s in dict.fromkeys(("train", split)) if s in manifest.splits])
    return manifest


def _load_checked_model(
    model_uri: str, mv: Any, manifest: Manifest, uri: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier and its metadata, once the model is known to have been trained on this
    dataset and to predict its classes in its order."""
    # Load exactly the resolved version (an alias could move between lookup and load).
    load_uri = model_uri
    if mv is not None and not model_uri.startswith("runs:/"):
        load_uri = f"models:/{mv.name}/{mv.version}"
    classifier = registry.load_classifier(load_uri, tracking_uri=uri)
    metadata = registry.model_metadata(load_uri, tracking_uri=uri)
    check_dataset(_describe(model_uri, mv), metadata, manifest)
    names = getattr(classifier, "class_names", None)
    if names is None:
        names = metadata.get("class_names")
        if not names:
            raise RegistryError(f"{load_uri} carries no class_names metadata")
    check_classes(_describe(model_uri, mv), names, manifest)
    return classifier, metadata


def _count_split(
    classifier: nn.Module,
    metadata: Mapping[str, Any],
    manifest: Manifest,
    split: str,
    model_label: str,
    *,
    batch_size: int,
    workers: int,
    cpus_per_worker: float,
) -> EvalCounts:
    """The prediction counts of `split`: loaded whole when its images share one size, else
    streamed through the model's evaluation crop."""
    if manifest.image.fixed_size:
        data = load_split(manifest, split)
        return count_split_predictions(
            classifier,
            data.images,
            data.labels,
            manifest.num_classes,
            batch_size=batch_size,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
        )
    if workers > 1:
        raise EvaluationError(
            f"dataset {manifest.uri} holds images of varying size, which are scored in "
            "this process: use --workers 1"
        )
    return _count_streamed(classifier, metadata, manifest, split, model_label, batch_size)


def _count_streamed(
    classifier: nn.Module,
    metadata: Mapping[str, Any],
    manifest: Manifest,
    split: str,
    model_label: str,
    batch_size: int,
) -> EvalCounts:
    """The prediction counts of a split of varying-size images, scored in this process."""
    image_size = int(metadata.get("image_size", 0))
    if image_size <= 0:
        raise EvaluationError(f"model {model_label} records no image_size")
    # The registered model takes uint8 images at its image_size and normalises them
    # itself: stream the split through the evaluation resize + centre crop alone.
    stream = ShardStream(manifest, split, DecodeGeometry(False, image_size), train=False)
    flats = [
        score_batch(classifier, x.permute(0, 2, 3, 1).numpy(), y.numpy(), manifest.num_classes)
        for x, y in DataLoader(stream, batch_size=batch_size, collate_fn=collate_crops)
    ]
    return sum_batch_counts(flats, manifest.num_classes)


def _source_run_id(model_uri: str, mv: Any) -> str | None:
    """The training run the evaluated model was logged from, when it is known."""
    if mv is not None:
        return mv.run_id or (mv.tags or {}).get(TAG_RUN_ID)
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0]
    return None


def _build_report(
    model_uri: str,
    mv: Any,
    split: str,
    data_uri: str,
    manifest: Manifest,
    counts: EvalCounts,
) -> EvaluationReport:
    """The report of `counts`: overall and per-class results, with what was evaluated on what."""
    results = counts.compute(class_counts=manifest.class_counts)
    return EvaluationReport(
        model_uri=model_uri,
        model_name=mv.name if mv is not None else None,
        version=str(mv.version) if mv is not None else None,
        source_run_id=_source_run_id(model_uri, mv),
        split=split,
        data_uri=str(data_uri),
        dataset=manifest.dataset,
        manifest_hash=manifest_hash(manifest),
        class_names=list(manifest.class_names),
        class_counts=[int(c) for c in manifest.class_counts],
        results=results,
        rows=per_class_rows(
            results["per_class_acc"], manifest.class_counts, manifest.class_names, counts
        ),
        counts=counts,
        manifest=manifest,
    )


# ---- recording it in MLflow ------------------------------------------------------------------


def evaluation_run_name(report: EvaluationReport) -> str:
    """`eval-<model>-v<version>-<split>-<manifest hash>`: re-evaluating the same model on the
    same data reuses the run."""
    if report.model_name and report.version:
        who = f"{report.model_name}-v{report.version}"
    else:
        who = f"run-{report.source_run_id or 'unknown'}"
    return f"eval-{who}-{report.split}-{report.manifest_hash}"


def log_evaluation_run(
    report: EvaluationReport,
    tracking_uri: str | None = None,
    experiment: str = EVAL_EXPERIMENT,
) -> str:
    """Log `report` as an MLflow run of `experiment` (one run per model version, split and
    dataset: re-running reuses it), with the evaluated split as its dataset input, and tag the
    model version `eval_<split>_acc`. Returns the run id."""
    uri = resolve_tracking_uri(tracking_uri)
    tags = {
        TAG_EVAL_MODEL_NAME: report.model_name,
        TAG_EVAL_MODEL_VERSION: report.version,
        TAG_EVAL_MODEL_URI: report.model_uri,
        TAG_EVAL_SOURCE_RUN: report.source_run_id,
        TAG_EVAL_SPLIT: report.split,
        TAG_EVAL_DATA_URI: report.data_uri,
        "shike.dataset": report.dataset,
    }
    run_id = runs.start_or_resume_run(uri, experiment, evaluation_run_name(report), tags)
    log = runs.RunLogger(uri, run_id)
    try:
        log.log_manifest(report.manifest)
        log.log_datasets(report.manifest, [report.split])  # its "Datasets" entry, once
        log.log_evaluation(
            report.split,
            report.results,
            report.class_counts,
            report.class_names,
            counts=report.counts,
        )
    except BaseException:
        log.finish("FAILED")
        raise
    log.finish("FINISHED")
    if report.model_name and report.version:
        set_version_tags(
            report.model_name,
            report.version,
            {
                f"eval_{report.split}_acc": f"{report.accuracy:.6g}",
                f"eval_{report.split}_run_id": run_id,
            },
            tracking_uri=uri,
        )
    return run_id
