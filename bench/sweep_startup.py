"""Where a sweep trial's start-up goes: `python -m jobs.tune` on a local Ray head node.

    python -m bench.sweep_startup [--trials 4] [--rounds 1] [--variants reuse device] [--no-record]

A sequential sweep (one trial at a time, FIFO) of `--trials` one-epoch trials of ResNet-32 on a
tiny CIFAR-10-LT (`--head-images` in the head class, prepared from $CIFAR10_DIR), once per
variant, alternated `--rounds` times against the same head (the machine is shared: alternating
spreads its noise over all). Variants:

- `fresh`: Ray Train trials (2 workers x 0.5 CPU), a new trial driver actor per trial
  (`reuse_actors: false` in the sweep file);
- `reuse`: Ray Train trials, Tune hands the finished trial's driver actor to the next trial
  (their default without ASHA, whose stopped trials must end with their driver);
- `device`: one-device trials (`trial_workers: 1`, 1 CPU): the trial runs the training loop in
  its reused Tune actor, which keeps the decoded data.

For each trial after the first, the gap from the previous trial's end (its MLflow child run's
end time: the driver closes it once `trainer.fit()` returned) to its first training batch (the
`[shike] first training batch at unix time` line of its rank-0 worker) is split at moments
Ray itself records (its task events, from the State API; Ray is not modified):

1. driver: until the trial's driver function runs (Tune's teardown of the previous trial, a
   new actor process or the reset of the reused one);
2. setup: until the TrainController actor's creation starts (in a new process the imports of
   pipeline.distributed.train: torch, Ray Train, Ray Data, MLflow; the trial's datasets and
   MLflow child run, the TorchTrainer);
3. controller: until the controller asks for its workers' resources (a new process importing
   Ray Train, the controller's set-up);
4. actors: until the RayTrainWorker actors exist (placement group, worker processes);
5. context: until Ray Train's context is set up on them (torch.distributed among others);
6. launch: until the training function runs on them (each unpickles it: imports
   pipeline.distributed.worker, with torch, torchvision and the pipeline);
7. first batch: until the first batch reaches rank 0's training step (the model, MLflow,
   Ray Data's first execution of the split); for a one-device trial, everything after its
   function started (its MLflow child run, the data, the model).

Phases 1-2 come from Ray's task events (State API), 3-6 from Ray Train's controller logs (its
`[Worker Group Initialization]` lines), 7 from the `[shike] first training batch` line.
Medians over the trials after the first of every round; the figures are seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import prepare_cifar10_lt, ray_temp_dir, scratch_dir
from bench.record import record

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("driver", "setup", "controller", "actors", "context", "launch", "first batch")
# Ray Train's controller logs (session_*/logs/train/ray-train-sys-controller-*.log, JSON lines):
# the moments its worker group start-up passes, as phase names
TRAIN_MARKS = {
    "Requesting resources": "controller",
    "worker actors created": "actors",
    "Train context initialized on workers": "context",
    "Train function launched on workers": "launch",
}
FIRST_BATCH = re.compile(r"first training batch at unix time ([0-9.]+)")

SWEEP = """name: {name}
base_config: {root}/configs/smoke.yaml
metric: val/score
num_samples: 1
max_concurrent_trials: 1
reuse_actors: {reuse}
trial_workers: {workers}
scheduler: {{type: none}}
space:
  optim.peak_lr: {{grid: {grid}}}
"""


def _stream(proc: subprocess.Popen, out: list[tuple[float, str]]) -> None:
    """Keep every line of the sweep's output with the time it arrived."""
    for line in proc.stdout:
        out.append((time.time(), line))


def run_sweep(variant: str, name: str, args, work: Path, data: str, env: dict) -> dict:
    """Launch jobs.tune for one variant; (launch time, end time, its output lines)."""
    sweep = work / f"{name}.yaml"
    sweep.write_text(
        SWEEP.format(
            name=name,
            root=ROOT,
            reuse=str(variant != "fresh").lower(),
            workers=1 if variant == "device" else 2,
            grid=[round(0.05 * (i + 1), 2) for i in range(args.trials)],
        )
    )
    overrides = [
        f"data.uri={data}",
        "model.arch=resnet32",
        "optim.epochs=1",
        "optim.stage2_start=1",
        "optim.batch_size=64",
        "train.threads=1",
        f"cluster.cpus_per_worker={1 if variant == 'device' else 0.5}",
        f"cluster.storage_path={work}/runs",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
    ]
    cmd = [sys.executable, "-m", "jobs.tune", "--config", str(sweep), "--no-register"]
    for o in overrides:
        cmd += ["--set", o]
    lines: list[tuple[float, str]] = []
    launched = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reader = threading.Thread(target=_stream, args=(proc, lines), daemon=True)
    reader.start()
    proc.wait(timeout=1800)
    reader.join(timeout=10)
    if proc.returncode != 0:
        sys.exit(f"sweep {name} failed:\n{''.join(line for _, line in lines)[-5000:]}")
    return {"launched": launched, "ended": time.time(), "lines": lines}


def trial_phases(run: dict, name: str, tracking_uri: str, events: list) -> list[dict]:
    """Per trial, in start order: the moments of its start-up (unix seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("shike").experiment_id
    children = client.search_runs([experiment], f"tags.`shike.sweep` = '{name}'")
    children = sorted(
        (c for c in children if c.data.tags.get("mlflow.parentRunId")),
        key=lambda c: c.info.start_time,
    )
    firsts = [float(m[1]) for _, line in run["lines"] if (m := FIRST_BATCH.search(line))]
    if len(firsts) != len(children):
        sys.exit(f"{name}: {len(children)} trials but {len(firsts)} first-batch lines")
    in_run = [e for e in events if run["launched"] <= e["start"] <= run["ended"]]
    trials = []
    for i, first in enumerate(firsts):
        begin = run["launched"] if i == 0 else children[i - 1].info.end_time / 1000

        def last(kind: str, key: str, begin: float = begin, first: float = first) -> float:
            found = [e[key] for e in in_run if e["kind"] == kind and begin < e["start"] < first]
            return max(found) if found else float("nan")

        trials.append(
            {
                "begin": begin,
                "driver": last("trial", "start"),
                "setup": last("created", "start"),
                **{mark: last(mark, "start") for mark in TRAIN_MARKS.values()},
                "first batch": first,
            }
        )
    return trials


def task_events(address: str) -> list[dict]:
    """Start/end of the tasks that mark a trial's start-up, from Ray's task events: the trial
    driver's `train` calls (a trial's first one starts its function) and the TrainController's
    creation."""
    from ray.util.state import list_tasks

    kinds = {
        "ImplicitFunc.train": "trial",
        "TrainController.__init__": "created",
    }
    events = []
    for name, kind in kinds.items():
        tasks = list_tasks(
            address=address,
            filters=[("func_or_class_name", "=", name)],
            limit=10_000,  # the State API's most
            detail=True,
            raise_on_missing_output=False,
            timeout=120,
        )
        events += [
            {"kind": kind, "start": t.start_time_ms / 1000, "end": t.end_time_ms / 1000}
            for t in tasks
            if t.start_time_ms and t.end_time_ms
        ]
    return events


def train_log_events(ray_dir: Path) -> list[dict]:
    """The TRAIN_MARKS moments of every Train controller of the node, from Ray Train's logs."""
    import json

    events = []
    for path in ray_dir.glob("session_*/logs/train/ray-train-sys-controller-*.log"):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            for text, kind in TRAIN_MARKS.items():
                if text in entry.get("message", ""):
                    at = entry["timestamp_ns"] / 1e9
                    events.append({"kind": kind, "start": at, "end": at})
    return events


def phase_seconds(trial: dict) -> dict[str, float]:
    """Each phase's seconds, from the previous moment the trial has (a one-device trial has no
    Ray Train phases: its first batch follows its driver), and the whole gap."""
    out, last = {}, trial["begin"]
    for phase in PHASES:
        if math.isnan(trial[phase]):
            out[phase] = float("nan")
            continue
        out[phase], last = trial[phase] - last, trial[phase]
    out["total"] = trial["first batch"] - trial["begin"]
    return out


def summary_rows(per_variant: dict[str, list[dict]]) -> list[str]:
    """The Markdown table: per variant the median of each phase and of the whole gap; the
    ratio of each variant's gap to the first variant's."""
    columns = [*PHASES, "total"]
    rows = [
        f"| variant | trials | {' | '.join(PHASES)} | end -> first batch | gap / {next(iter(per_variant))} |",
        "|---|---|" + "---|" * (len(PHASES) + 2),
    ]
    baseline = None
    for variant, trials in per_variant.items():
        seconds = [phase_seconds(t) for t in trials]
        medians = {c: statistics.median(s[c] for s in seconds) for c in columns}
        baseline = baseline or medians["total"]
        cells = " | ".join("-" if math.isnan(medians[c]) else f"{medians[c]:.1f}" for c in columns)
        rows.append(f"| {variant} | {len(trials)} | {cells} | {medians['total'] / baseline:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=4, help="trials per sweep")
    ap.add_argument("--rounds", type=int, default=1, help="times each variant runs, alternated")
    ap.add_argument(
        "--variants", nargs="+", default=["reuse", "device"], choices=["fresh", "reuse", "device"]
    )
    ap.add_argument("--head-images", type=int, default=100, help="head-class size (n_max)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from tests.helpers.ray_cluster import ray_head

    work = scratch_dir("bench-sweep-")
    data = str(work / "data")
    manifest = prepare_cifar10_lt(data, args.head_images, 10)
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    ray_dir = ray_temp_dir("rs")
    order = [v for r in range(args.rounds) for v in (args.variants[:: 1 if r % 2 == 0 else -1])]
    runs = []
    with ray_head(ray_dir, num_cpus=4) as (address, dashboard, env):
        for k, variant in enumerate(order):
            name = f"startup-{variant}-{k}"
            print(f"[bench] {name} ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f})")
            runs.append((variant, name, run_sweep(variant, name, args, work, data, env)))
        events = task_events(dashboard) + train_log_events(ray_dir)
    per_variant: dict[str, list[dict]] = {v: [] for v in args.variants}
    for variant, name, run in runs:
        trials = trial_phases(run, name, tracking_uri, events)
        for i, t in enumerate(trials):
            cells = " ".join(f"{p} {v:.1f}" for p, v in phase_seconds(t).items())
            print(f"[bench] {name} trial {i}: {cells}")
        per_variant[variant] += trials[1:]

    rows = summary_rows(per_variant)
    table = (
        f"`python -m jobs.tune` on a local head (4 logical CPUs): {args.trials} sequential "
        f"one-epoch trials of ResNet-32 ({manifest.splits['train'].num_rows:,} training images) "
        f"per sweep, the variants alternated {args.rounds} time(s); medians over the trials "
        "after each sweep's first, in seconds (variants and phases: the docstring of "
        "bench/sweep_startup.py; `-`: a phase the variant does not have). reuse: Ray Train "
        "trials of 2 workers x 0.5 CPU, the trial driver actor reused; device: one-device "
        "trials (`trial_workers: 1`, the CIFAR default), 1 CPU, the actor reused\n\n"
        + "\n".join(rows)
    )
    record(
        "sweep_startup",
        "Sweep start-up: a trial's end to the next trial's first batch",
        table,
        print_only=args.no_record,
    )


if __name__ == "__main__":
    main()
