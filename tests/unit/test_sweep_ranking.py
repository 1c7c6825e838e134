"""Which trial a sweep registers (`pipeline.distributed.tune.best_trial`): finished trials
first, errors never, and a missing or NaN metric ranks last in both modes; and how many
workers a trial gets (`SweepSpec.workers_per_trial`)."""

import math

import pytest

pytest.importorskip("ray")

from pipeline.distributed.tune import best_trial  # noqa: E402

EPOCHS = 4


def _row(trial_id, score, epochs_run=EPOCHS, error=""):
    return {"trial_id": trial_id, "val/score": score, "epochs_run": epochs_run, "error": error}


@pytest.mark.parametrize("mode, expected", [("max", "high"), ("min", "low")])
def test_nan_and_missing_rank_last_in_both_modes(mode, expected):
    rows = [_row("nan", math.nan), _row("high", 0.9), _row("none", None), _row("low", 0.2)]
    assert best_trial(rows, "val/score", mode, EPOCHS)["trial_id"] == expected


def test_a_finished_trial_beats_a_better_one_stopped_early_and_errors_never_win():
    rows = [_row("stopped", 0.99, epochs_run=1), _row("done", 0.5), _row("err", 1.0, error="E")]
    assert best_trial(rows, "val/score", "max", EPOCHS)["trial_id"] == "done"


def test_only_nan_trials_still_give_one_and_all_failed_gives_none():
    assert best_trial([_row("a", math.nan)], "val/score", "min", EPOCHS)["trial_id"] == "a"
    assert best_trial([_row("a", 0.5, error="E")], "val/score", "max", EPOCHS) is None


@pytest.mark.parametrize(
    "preset, trial_workers, expected",
    [
        ("configs/smoke.yaml", None, 1),  # CIFAR: one device per trial
        ("configs/imagenet_lt_smoke.yaml", None, "cluster"),  # the preset's Train workers
        ("configs/smoke.yaml", 3, 3),  # as the sweep file says
    ],
)
def test_workers_per_trial(preset, trial_workers, expected):
    from pipeline.config import load_config
    from pipeline.distributed.tune import SweepSpec

    base = load_config(preset)
    spec = SweepSpec(
        name="s",
        base_config=preset,
        trial_workers=trial_workers,
        space={"loss.tau": {"choice": [1]}},
    )
    want = base.cluster.num_workers if expected == "cluster" else expected
    assert spec.workers_per_trial(base) == want
