"""MLflow tracking: one stable run per run name, standard tags, logging into a run.

Everything goes through an explicit `MlflowClient(tracking_uri)`: nothing here relies on
MLflow's process-global "active run", so the driver, a Ray Train worker or a notebook can log
into the same run by its id without stepping on each other.

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = start_or_resume_run(uri, cfg.tracking.experiment, run_name, standard_tags(cfg))
    log = RunLogger(uri, run_id)
    log.log_config(cfg)                         # params (immutable: re-logging must agree) + YAML
    log.log_datasets(manifest, ["train", "val"])  # the splits read: MLflow dataset inputs, once
    log.log_metrics({"train/loss": 0.7}, step=epoch)
    log.log_evaluation("test", results, class_counts, class_names, counts=eval_counts)
    log.finish("FINISHED")

Dataset inputs and system metrics: `pipeline/tracking/lineage.py`.

Which store, its health probe and the credential guard every param and tag passes:
`pipeline/tracking/store.py` (`resolve_tracking_uri` and `check_tracking_server` are part of this
module's API too). Params and tags come from the config, which holds no credentials.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import DatasetInput, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import EXECUTION_SETTINGS
from pipeline.credentials import redact_uri
from pipeline.data.manifest import manifest_hash
from pipeline.evaluation.metrics import SCALAR_RESULTS
from pipeline.evaluation.reports import per_class_csv, per_class_rows
from pipeline.tracking.lineage import dataset_inputs
from pipeline.tracking.store import (
    TrackingError,
    check_tracking_server,
    checked_key,
    checked_tags,
    checked_value,
    sqlite_artifact_root,
)
from pipeline.tracking.store import (  # part of this module's API: jobs and the Ray layer use it
    resolve_tracking_uri as resolve_tracking_uri,
)

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.evaluation.metrics import EvalCounts
    from pipeline.training.fit import EpochEnd

# Tag keys written by the pipeline.
TAG_RUN_NAME = "shike.run_name"  # the stable key a relaunch finds its MLflow run by
TAG_CONFIG_HASH = "shike.config_hash"
TAG_EXECUTION_CHANGES = "shike.execution_changes"  # execution settings changed on resume
TAG_MANIFEST_HASH = "shike.dataset_manifest_hash"
TAG_SEED = "shike.seed"
TAG_GIT_DIRTY = "shike.git_dirty"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key, shown in its UI
TAG_MLFLOW_RUN_NAME = "mlflow.runName"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's log_batch limits per request.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_TAGS_PER_BATCH = 100


# ---- experiments and runs ------------------------------------------------------------------


def _safe_dir_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return cleaned[:100]


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Experiment id for `name`, creating it (restoring it if deleted) as needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = sqlite_artifact_root(uri)
        location = (root / _safe_dir_name(name)).as_uri() if root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            # Another process created it between our lookup and create: use theirs.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(
                    f"cannot create MLflow experiment '{name}' at {redact_uri(uri)}: {exc.message}"
                ) from exc
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_runs(uri: str, experiment: str, run_name: str) -> list[Any]:
    """Active (not deleted) runs of `experiment` tagged `shike.run_name=<run_name>`."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_RUN_NAME}` = '{run_name}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=10,
    )


def start_or_resume_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    *,
    parent_run_id: str | None = None,
) -> str:
    """The id of *the* MLflow run for `run_name` in `experiment`: created on first launch,
    reused (status set back to RUNNING) on every relaunch, whatever its status was.

    Runs are found by the `shike.run_name` tag (MLflow's display name is editable in the UI, the
    tag is ours). Deleted runs are ignored. Two live runs with the tag is an error: which one
    a relaunch should continue cannot be decided. `parent_run_id` nests the run under
    another (a sweep's parent run; MLflow's `mlflow.parentRunId` tag).
    """
    if not run_name or "'" in run_name or "\\" in run_name:
        raise TrackingError(f"invalid run name {run_name!r}: must be non-empty, without ' or \\")
    check_tracking_server(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, uri, experiment)
    all_tags = {
        **checked_tags(dict(tags or {})),
        TAG_RUN_NAME: run_name,
        TAG_MLFLOW_RUN_NAME: run_name,
    }
    if parent_run_id:
        all_tags[TAG_PARENT_RUN_ID] = parent_run_id
    runs = find_runs(uri, experiment, run_name)
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs)
        raise TrackingError(
            f"experiment '{experiment}' has {len(runs)} runs tagged {TAG_RUN_NAME}={run_name} "
            f"({ids}); delete all but one in MLflow, then relaunch"
        )
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    _log_tags(client, run_id, all_tags)
    return run_id


def run_name_of(uri: str, run_id: str) -> str | None:
    """The run name (`shike.run_name`, else MLflow's display name) of run `run_id`."""
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    return run.data.tags.get(TAG_RUN_NAME) or run.info.run_name or None


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), _MAX_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + _MAX_TAGS_PER_BATCH])


# ---- standard tags ---------------------------------------------------------------------------


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package; ($SHIKE_GIT_COMMIT, None) when
    set (cluster jobs ship the code without .git); (None, None) when unknown."""
    env = os.environ.get("SHIKE_GIT_COMMIT")
    if env:
        return env, None
    root = Path(__file__).resolve().parents[2]  # the checkout
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), bool(status.strip())


def standard_tags(cfg: Config, manifest_hash: str | None = None) -> dict[str, str]:
    """Tags every training run carries: git commit (+ dirty flag), config hash, dataset
    manifest hash, seed, dataset, architecture."""
    tags = {
        TAG_CONFIG_HASH: cfg.config_hash(),
        TAG_SEED: str(cfg.train.seed),
        "shike.dataset": cfg.data.dataset,
        "shike.imbalance_factor": f"{cfg.data.imbalance_factor:g}",
        "shike.arch": cfg.model.arch,
    }
    if manifest_hash:
        tags[TAG_MANIFEST_HASH] = manifest_hash
    commit, dirty = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    if dirty is not None:
        tags[TAG_GIT_DIRTY] = str(dirty).lower()
    return tags


# ---- logging into one run --------------------------------------------------------------------


def finite_float(value: Any) -> float | None:
    """`value` as a float; None for NaN, infinities and non-numbers (MLflow cannot chart them)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RunLogger:
    """Logs into an existing run by id (see `start_or_resume_run`); safe to construct anywhere."""

    SCALAR_KEYS = (*SCALAR_RESULTS, "num_samples")  # a whole split's scalars

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)

    # -- config, tags, dataset

    def log_config(self, cfg: Config) -> None:
        """Flattened config as params (`loss.dkt_weight`) plus `config.yaml`.

        MLflow params are immutable. On a resumed run, params already logged with the same
        value are skipped; a different value of a recipe setting is an error naming the key (a
        run name stands for one recipe: change the run name to change it). Execution settings
        (`EXECUTION_SETTINGS`: device, AMP, loader workers, ...) may change on resume, as the
        checkpoint allows: their params keep the first launch's values, the tag
        `shike.execution_changes` lists the latest launch's differing values and `config.yaml`
        is the latest launch's config.
        """
        params: dict[str, str] = {}
        for key, value in cfg.flat().items():
            params[checked_key("param", key)] = checked_value("param", key, str(value))
        run = self.client.get_run(self.run_id)
        existing = run.data.params
        differing = [k for k, v in params.items() if k in existing and existing[k] != v]
        refused = [k for k in differing if k not in EXECUTION_SETTINGS]
        if refused:
            shown = "; ".join(
                f"{k}: logged {existing[k]!r}, now {params[k]!r}" for k in refused[:5]
            )
            more = f" (+{len(refused) - 5} more)" if len(refused) > 5 else ""
            raise TrackingError(
                f"MLflow run {self.run_id} was logged with a different recipe ({shown}{more}); "
                "params cannot change: relaunch with the original config or a new run name"
            )
        if differing:
            changes = "; ".join(f"{k}={params[k]} (logged {existing[k]})" for k in differing)
            self.log_tags({TAG_EXECUTION_CHANGES: changes})
        elif TAG_EXECUTION_CHANGES in run.data.tags:  # back to the logged values
            self.client.delete_tag(self.run_id, TAG_EXECUTION_CHANGES)
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=todo[i : i + _MAX_PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        _log_tags(self.client, self.run_id, checked_tags(tags))

    def log_manifest(self, manifest: Mapping[str, Any] | Any) -> str:
        """The dataset manifest as artifact `dataset/manifest.json` and its hash as a tag."""
        data = manifest.to_dict() if hasattr(manifest, "to_dict") else dict(manifest)
        digest = manifest_hash(data)
        self.client.log_text(
            self.run_id, json.dumps(data, indent=2, default=str) + "\n", "dataset/manifest.json"
        )
        self.log_tags({TAG_MANIFEST_HASH: digest})
        return digest

    def log_datasets(
        self, manifest: Any, splits: Sequence[str], *, uri: str | None = None
    ) -> list[DatasetInput]:
        """`splits` of the dataset as the run's MLflow dataset inputs (`dataset_inputs`; shown
        under "Datasets" in the UI), each with its own digest (`lineage.split_digest`).
        Idempotent: inputs the run already has (same name and digest) are not logged again, so
        a resumed run keeps one input per split."""
        wanted = dataset_inputs(manifest, splits, uri=uri)
        run = self.client.get_run(self.run_id)
        have = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        todo = [d for d in wanted if (d.dataset.name, d.dataset.digest) not in have]
        if todo:
            self.client.log_inputs(self.run_id, datasets=todo)
        return wanted

    # -- metrics

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log `{"train/loss": 0.7, ...}` at `step` (keys as given). NaN / inf / non-numeric
        values are skipped (MLflow cannot chart them)."""
        stamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = finite_float(value)
            if number is not None:
                items.append(Metric(key, number, stamp, int(step or 0)))
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def last_step(self, key: str) -> int:
        """The largest step logged for metric `key` in this run; -1 when none is."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log_evaluation(
        self,
        split: str,
        results: Mapping[str, Any],
        class_counts: Sequence[int],
        class_names: Sequence[str] | None = None,
        *,
        counts: EvalCounts | None = None,
        bin_counts: Sequence[float] | None = None,
        bin_conf: Sequence[float] | None = None,
        bin_acc: Sequence[float] | None = None,
        step: int | None = None,
        scalars: bool = True,
    ) -> None:
        """Final evaluation of one split (results of `EvalCounts.compute`).

        Logs `<split>/acc`, `/top5`, `/ece`, `/acc_many`, `/acc_medium`, `/acc_few`,
        `/num_samples`; artifact `<split>/per_class.csv` (`reports.per_class_csv`: evaluated
        samples and hits only when `counts` is given); figures `<split>/per_class_accuracy.png` and,
        when calibration bins are available, `<split>/reliability.png`. The bins come from
        `counts` (the `EvalCounts` the results were computed from) or from explicit per-bin
        arrays (sample count, mean confidence, accuracy). The scalars go at `step` (None:
        MLflow's 0); pass `scalars=False` when the same keys are already logged per epoch with
        `log_metrics` (a step-0 point would otherwise join that history).
        """
        per_class = [float(a) for a in results["per_class_acc"]]
        num_classes = len(per_class)
        if len(class_counts) != num_classes:
            raise ValueError(
                f"class_counts has {len(class_counts)} entries, results have {num_classes} classes"
            )
        names = [str(n) for n in class_names] if class_names is not None else None
        if names is not None and len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} entries, expected {num_classes}")

        if scalars:
            self.log_metrics(
                {f"{split}/{k}": results[k] for k in self.SCALAR_KEYS if k in results}, step=step
            )

        rows = per_class_rows(per_class, class_counts, names, counts)
        self.client.log_text(self.run_id, per_class_csv(rows), f"{split}/per_class.csv")

        # Imported here: matplotlib would add ~0.4 s to every process that imports this module
        # (each Ray Train worker), and only the final report draws.
        from pipeline.evaluation import plots

        fig = plots.per_class_accuracy_figure(
            per_class, class_counts, names, title=f"{split}: per-class accuracy"
        )
        self.client.log_figure(self.run_id, fig, f"{split}/per_class_accuracy.png")

        if counts is not None:
            bin_counts, bin_conf, bin_acc = plots.reliability_bins(
                counts.bin_count.cpu().tolist(),
                counts.bin_correct.cpu().tolist(),
                counts.bin_confidence.cpu().tolist(),
            )
        if bin_counts is not None and bin_conf is not None and bin_acc is not None:
            ece = finite_float(results.get("ece"))
            fig = plots.reliability_figure(
                bin_counts, bin_conf, bin_acc, ece=ece, title=f"{split}: reliability"
            )
            self.client.log_figure(self.run_id, fig, f"{split}/reliability.png")

    # -- end

    def finish(self, status: str = "FINISHED") -> None:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        self.client.set_terminated(self.run_id, status=status)


def open_run(
    cfg: Config,
    run_name: str,
    uri: str,
    manifest: Any,
    splits: Sequence[str],
    *,
    extra_tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> RunLogger:
    """The MLflow run of training run `run_name`, created or resumed by name, with its standard
    tags, config, manifest and the `splits` it reads as dataset inputs logged: what every
    training driver (Ray Train run, sweep trial on Ray Train or on one device) opens."""
    tags = {**standard_tags(cfg, manifest_hash=manifest_hash(manifest)), **(extra_tags or {})}
    run_id = start_or_resume_run(
        uri, cfg.tracking.experiment, run_name, tags, parent_run_id=parent_run_id
    )
    logger = RunLogger(uri, run_id)
    logger.log_config(cfg)
    logger.log_manifest(manifest.to_dict())
    logger.log_datasets(manifest, splits)  # a resumed run logs none twice
    return logger


class EpochRecorder:
    """What a training run logs at the end of each `fit` turn, with one value per step.

    Per epoch: the `train/*`, `val/*` (and, from `train.test_from_epoch`, `test/*`) scalars at
    step = epoch index. At the end: the val split's artifacts (its scalars are already in the
    per-epoch history) and the test split's scalars and artifacts. Epochs the run already
    holds, logged by a launch or worker group that died after the checkpoint this one resumed
    from, are not logged again: the history keeps the first value of each step (a one-worker
    resume replays them exactly; with several workers only which worker read which rows may
    differ).
    """

    def __init__(
        self, logger: RunLogger, class_counts: Sequence[int], class_names: Sequence[str]
    ) -> None:
        self.logger = logger
        self.class_counts = list(class_counts)
        self.class_names = list(class_names)
        self.logged_through = logger.last_step("train/loss")

    def record(self, end: EpochEnd) -> None:
        if end.final and end.val is not None:
            self._log_split("val", end.val, scalars=False)
        if end.final and end.test is not None:
            self._log_split("test", end.test, scalars=True)
        if end.train is not None and end.epoch - 1 > self.logged_through:
            stepped = ("train/", "val/") if end.final else ("train/", "val/", "test/")
            per_epoch = {k: v for k, v in end.metrics().items() if k.startswith(stepped)}
            self.logger.log_metrics(per_epoch, step=end.epoch - 1)

    def _log_split(self, split: str, evaluation: Any, *, scalars: bool) -> None:
        self.logger.log_evaluation(
            split,
            evaluation.results,
            self.class_counts,
            self.class_names,
            counts=evaluation.counts,
            scalars=scalars,
        )
