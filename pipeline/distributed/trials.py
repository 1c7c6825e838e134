"""What one sweep trial runs, in either of its two forms (`trial_workers` in the sweep file).

- `device_trial` (one worker): the trial is a Tune function trainable that runs the core loop
  (`pipeline.training.fit`) itself on the device Tune gave its actor, reading the data the way
  the Ray-free engine does. No Ray Train worker group is started, and a reused actor keeps
  torch, the model code and the decoded dataset from one trial to the next (`_DECODED`): a
  trial only builds its model and optimizer.
- `train_trial` (several workers): the trial's actor only drives a TorchTrainer whose workers
  run `pipeline.distributed.worker`; their reports reach Tune through `TuneReportCallback`.

Both open the same MLflow child run (`tracking.runs.open_run`), log the same metrics
(`tracking.runs.EpochRecorder`) and report the same keys to Tune, so the sweep's ranking,
ASHA, summary and registration do not know which form ran.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, build_config

# Decoded datasets of this actor process by (data.uri, manifest hash, test images per class):
# Tune hands a reused actor the next trial, which then skips reading and decoding the shards.
_DECODED: dict[tuple[str, str, int | None], Any] = {}


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    return build_config(base, values=params)


def _trial_name(sweep: dict) -> tuple[str, dict[str, str]]:
    """(run name, tags) of the trial Tune is running: its MLflow child run's identity."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    tags = {"shike.sweep": sweep["name"], "shike.trial_id": trial_id}
    return f"{sweep['name']}-{trial_id}", tags


def train_trial(params: dict[str, Any], *, base: dict, sweep: dict, context: dict) -> None:
    """A trial on Ray Train: a TorchTrainer whose workers' reports are forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.distributed.train import build_trainer, decodes_on_the_workers, open_tracked_run

    cfg = trial_config(base, params)
    run_name, tags = _trial_name(sweep)
    datasets, logger, loop_config = open_tracked_run(
        cfg,
        run_name,
        context["tracking_uri"],
        context["manifest"],
        extra_tags=tags,
        parent_run_id=context["parent_run_id"],
        eval_splits=("val",),  # never the test split in a sweep
        decode_on_device=decodes_on_the_workers(cfg, context["manifest"]),
    )
    trainer = build_trainer(
        cfg,
        run_name,
        datasets,
        loop_config,
        callbacks=[TuneReportCallback()],
        storage_subdir=sweep["name"],
    )
    trainer.fit()
    logger.finish("FINISHED")


def device_trial(params: dict[str, Any], *, base: dict, sweep: dict, context: dict) -> None:
    """A trial on the one device of its Tune actor: `fit` with the engine's inputs, reporting
    each epoch to MLflow and to Tune (with the checkpoint when one is due). A trial that ASHA
    stops ends inside `tune.report`; the sweep marks its MLflow run KILLED."""
    import ray
    import ray.tune
    import torch

    from pipeline.data.manifest import data_identity
    from pipeline.distributed.worker import announce_first_batch, report_epoch
    from pipeline.tracking import runs
    from pipeline.training.fit import fit
    from pipeline.training.session import TrainingSession

    cfg, manifest = trial_config(base, params), context["manifest"]
    run_name, tags = _trial_name(sweep)
    logger = runs.open_run(
        cfg,
        run_name,
        context["tracking_uri"],
        manifest,
        ["train", "val"],  # never the test split in a sweep
        extra_tags=tags,
        parent_run_id=context["parent_run_id"],
    )
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes, as in the engine
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    inputs = _inputs(cfg, manifest, device)
    session = TrainingSession(
        cfg, list(manifest.class_counts), device, data_identity=data_identity(manifest)
    )
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        session.start(None)
    else:
        with checkpoint.as_directory() as directory:
            session.start(directory)
    recorder = runs.EpochRecorder(logger, list(manifest.class_counts), manifest.class_names)
    first = session.epoch

    def train_batches(epoch: int):
        batches = inputs.train_batches(epoch)
        return announce_first_batch(batches, print) if epoch == first else batches

    fit(
        session,
        train_batches,
        val_batches=inputs.val_batches,
        on_epoch_end=lambda end: report_epoch(
            end, session, recorder, ray.tune.report, ray.tune.Checkpoint
        ),
        log=lambda line: print(f"[shike] {line}", flush=True),
    )
    logger.finish("FINISHED")


def _inputs(cfg: Config, manifest: Any, device: Any):
    """The engine's inputs for the trial: CIFAR-style splits decoded once per actor process
    (`_DECODED`), source-image datasets streamed from their shards."""
    from pipeline.data.manifest import manifest_hash
    from pipeline.data.readers.torch_reader import load_prepared
    from pipeline.training.engine import in_memory_inputs, streamed_inputs

    if manifest.image.encoding == "source":
        return streamed_inputs(cfg, manifest, device)
    key = (cfg.data.uri, manifest_hash(manifest), cfg.data.test_per_class)
    if key not in _DECODED:
        _DECODED.clear()  # one dataset at a time: a sweep reads one
        _DECODED[key] = load_prepared(cfg.data.uri, cfg.data.test_per_class)
    return in_memory_inputs(cfg, device, data=_DECODED[key])
