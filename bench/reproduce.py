"""Reproduce the paper recipe (and the ablation baselines) with the Ray-free engine.

    python -m bench.reproduce --config configs/cifar10_lt_if100.yaml --data .data/cifar10-lt-if100 \
        --seeds 0 1 2 --variants shike ce balanced_softmax no_dkf no_dkt [--parallel 2]

Runs on any machine with PyTorch (the GPU machine has no Ray and no MLflow): `--data` is a
prepared shard folder (jobs/prepare_data.py) or a raw source (e.g. ../shared/data/cifar10).
Each (variant, seed) trains in its own process, `--parallel` at a time, seeds in the outer
order (all variants of seed 0 first). `--deadline-min` stops what is still running at that
point; a stopped run is reported with the epoch it reached, never with figures. For each run
it prints and records top-1, many/medium/few, ECE, wall time and the per-class accuracy;
`--results` also appends each finished run as a JSON line. `--set` overrides any config key
(e.g. `--set optim.epochs=2` for a CPU check; on a GPU `--set train.amp=false --set
train.cuda_graphs=true --set data.loader_workers=6`).

`--checkpoints DIR` makes runs outlive one call (a GPU lease is shorter than a few runs): each
run checkpoints into DIR/<variant>-seed<seed>/ every `train.checkpoint_every` epochs (default
1), a relaunch with the same DIR and arguments continues each unfinished run from its last
checkpoint, and a run that finished in an earlier call is reported from its saved result instead
of being trained again. A DIR whose runs were trained under another recipe (another config or
`--set` of a training setting) is refused, naming the settings: use another DIR. Execution
settings (device, AMP, CUDA graphs, channels-last, loader workers, threads) may change between
calls, so a run started on a GPU can continue on a CPU and the other way round.

`--report RESULT.json ...` trains nothing: it makes the same table (with mean ± std over seeds)
from saved results, e.g. the runs kept in bench/logs/ that different calls or sessions finished:

    python -m bench.reproduce --report bench/logs/*-cpu-*-seed*/result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.record import record

# The ablation table of the paper, made by our code; all share the recipe and budget.
VARIANTS = {
    "shike": ("SHIKE (DKF + DKT, 3 experts)", []),
    "ce": (
        "ResNet-32, cross-entropy",
        ["model.arch=resnet32", "model.head=linear", "loss.stage1=ce", "STAGE2_OFF"],
    ),
    "balanced_softmax": (
        "ResNet-32, balanced softmax",
        ["model.arch=resnet32", "model.head=linear", "loss.stage1=balanced_softmax", "STAGE2_OFF"],
    ),
    "no_dkf": ("SHIKE without DKF", ["model.dkf=false"]),
    "no_dkt": ("SHIKE without DKT", ["loss.dkt_weight=0"]),
}


def data_override(data: str) -> str:
    """`data.uri=` for prepared shards (a manifest, or s3://), else `data.source=` (raw)."""
    prepared = (Path(data) / "manifest.json").exists() or data.startswith("s3://")
    return f"{'data.uri' if prepared else 'data.source'}={data}"


def run_config(args: argparse.Namespace, variant: str, seed: int):
    from pipeline.config import load_config

    data = [data_override(args.data), *args.overrides]
    epochs = load_config(args.config, data).optim.epochs
    variant_overrides = [
        f"optim.stage2_start={epochs}" if o == "STAGE2_OFF" else o for o in VARIANTS[variant][1]
    ]
    return load_config(args.config, [*data, *variant_overrides, f"train.seed={seed}"])


def run_dir(args: argparse.Namespace, variant: str, seed: int) -> Path | None:
    """Where one run keeps its checkpoint and, once finished, its result."""
    return Path(args.checkpoints) / f"{variant}-seed{seed}" if args.checkpoints else None


def refuse_other_recipes(args: argparse.Namespace) -> None:
    """Exit if a run's folder under `--checkpoints` was trained under another recipe: its saved
    result would be reported, or its checkpoint resumed, as this configuration's."""
    from pipeline.training.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

    for seed in args.seeds:
        for variant in args.variants:
            directory = run_dir(args, variant, seed)
            if not (directory and (directory / CHECKPOINT_FILE).is_file()):
                continue
            try:
                load_checkpoint(directory, run_config(args, variant, seed).recipe())
            except CheckpointError as exc:
                sys.exit(f"error: {variant} seed {seed}: {exc}; pass another --checkpoints folder")


def train_one(args: argparse.Namespace) -> None:
    """Child process: train one (variant, seed) and write its result as JSON."""
    from pipeline.training.engine import run

    variant, seed = args.one[0], int(args.one[1])
    cfg = run_config(args, variant, seed)
    print(f"== {VARIANTS[variant][0]}, seed {seed}, {cfg.optim.epochs} epochs", flush=True)
    directory = run_dir(args, variant, seed)
    checkpoint = str(directory) if directory else None
    out = run(cfg, checkpoint_dir=checkpoint, log=lambda line: print(line, flush=True))
    result = {
        "variant": variant,
        "seed": seed,
        "epochs": cfg.optim.epochs,
        "resumed_from_epoch": cfg.optim.epochs - len(out["history"]),
        "test": out["test"],
        "train_loop_seconds": sum(h["seconds"] for h in out["history"]),
        "wall_seconds": out["wall_seconds"],
        "final_val_acc": out["history"][-1].get("val_acc") if out["history"] else None,
        # with train.test_from_epoch: test top-1 after each of the last epochs (this call's)
        "test_history": {
            int(h["epoch"]) + 1: h["test_acc"] for h in out["history"] if "test_acc" in h
        },
        "val_per_class_acc": out["val"]["per_class_acc"] if out["val"] else None,
    }
    Path(args.result_file).write_text(json.dumps(result))
    if directory:
        (directory / "result.json").write_text(json.dumps(result))


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def _last_epoch(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("epoch ")]
    return lines[-1].split("|")[0].replace("epoch", "").strip() if lines else "none"


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Train every (variant, seed), `--parallel` at a time; (finished results, stopped notes)."""
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="reproduce-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.deadline_min if args.deadline_min else None
    passthrough = ["--config", args.config, "--data", args.data]
    for o in args.overrides:
        passthrough += ["--set", o]
    if args.checkpoints:
        passthrough += ["--checkpoints", args.checkpoints]
    running: dict[tuple[str, int], tuple[subprocess.Popen, Path]] = {}
    results, stopped = [], []
    for variant, seed in list(jobs):
        saved = run_dir(args, variant, seed)
        if saved and (saved / "result.json").exists():
            results.append({**json.loads((saved / "result.json").read_text()), "earlier": True})
            jobs.remove((variant, seed))
            print(f"{variant} seed {seed}: finished in an earlier call ({saved})", flush=True)
    while jobs or running:
        while jobs and len(running) < args.parallel:
            variant, seed = jobs.pop(0)
            log = log_dir / f"{variant}-seed{seed}.log"
            # The child is this module again (run from the repository root, as the parent is).
            cmd = [sys.executable, "-m", "bench.reproduce", *passthrough]
            cmd += ["--one", variant, str(seed), "--result-file", str(log.with_suffix(".json"))]
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            running[(variant, seed)] = (proc, log)
            print(f"started {variant} seed {seed} (log {log})", flush=True)
        time.sleep(1)
        for key, (proc, log) in list(running.items()):
            if proc.poll() is None:
                if deadline is None or time.monotonic() < deadline:
                    continue
                proc.terminate()
                proc.wait()
                stopped.append(
                    f"{VARIANTS[key[0]][0]}, seed {key[1]}: stopped at the deadline "
                    f"after epoch {_last_epoch(log)}"
                )
            elif proc.returncode == 0:
                results.append(json.loads(log.with_suffix(".json").read_text()))
                if args.results:
                    with open(args.results, "a") as fh:
                        fh.write(json.dumps(results[-1]) + "\n")
            else:
                stopped.append(f"{VARIANTS[key[0]][0]}, seed {key[1]}: failed ({_tail(log)})")
            print(f"ended {key[0]} seed {key[1]}: {_tail(log)}", flush=True)
            del running[key]
        if deadline is not None and time.monotonic() >= deadline:
            stopped += [f"{VARIANTS[v][0]}, seed {s}: not started (deadline)" for v, s in jobs]
            jobs = []
    return results, stopped


def _time_cell(result: dict) -> str:
    """Wall time of the call that finished the run; a resumed run's earlier epochs ran in
    earlier calls and are not in it."""
    cell = f"{result['wall_seconds']:.0f} s ({result['train_loop_seconds']:.0f} s)"
    if result.get("resumed_from_epoch"):
        cell += f", epochs {result['resumed_from_epoch'] + 1}-{result['epochs']} only"
    if result.get("earlier"):
        cell += ", finished in an earlier call"
    return cell


# What `results_table` reads from a saved result.
RESULT_KEYS = ("variant", "seed", "test", "wall_seconds", "train_loop_seconds")
TEST_KEYS = ("acc", "acc_many", "acc_medium", "acc_few", "ece", "per_class_acc")


def load_results(paths: list[str]) -> list[dict]:
    """Saved results (`result.json` of finished runs) for `--report`; one per (variant, seed)."""
    results, seen = [], {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            sys.exit(f"error: {path}: not a saved reproduce result ({exc})")
        fields = result if isinstance(result, dict) else {}
        test = fields.get("test") if isinstance(fields.get("test"), dict) else {}
        missing = [k for k in RESULT_KEYS if k not in fields]
        missing += [f"test.{k}" for k in TEST_KEYS if k not in test]
        if missing:
            sys.exit(f"error: {path}: not a saved reproduce result (missing {', '.join(missing)})")
        key = (result["variant"], result["seed"])
        if key[0] not in VARIANTS:
            sys.exit(f"error: {path}: unknown variant {key[0]!r}")
        if key in seen:
            sys.exit(f"error: {key[0]} seed {key[1]} is in both {seen[key]} and {path}")
        seen[key] = path
        results.append(result)
    return results


def last_against_best(result: dict) -> list[str]:
    """We report the last epoch's test top-1; some peers report the best epoch's."""
    history = {int(e): acc for e, acc in (result.get("test_history") or {}).items()}
    if len(history) < 2:
        return []
    best = max(history, key=history.get)
    last = result["test"]["acc"]
    return [
        f"  - test top-1, last epoch {100 * last:.2f} against the best of epochs "
        f"{min(history)}-{max(history)}: {100 * history[best]:.2f} (epoch {best}), "
        f"{100 * (history[best] - last):+.2f} points"
    ]


def val_against_test(result: dict) -> list[str]:
    """Mean per-class top-1 of val and of test over the classes val has images of (CIFAR: the
    head class has none left): is val a fair stand-in for test?"""
    val, test = result.get("val_per_class_acc"), result["test"]["per_class_acc"]
    if not val:
        return []
    classes = [c for c, acc in enumerate(val) if acc == acc]  # NaN: no val image of c
    if not classes:
        return []
    mean_val = statistics.mean(val[c] for c in classes)
    mean_test = statistics.mean(test[c] for c in classes)
    return [
        f"  - mean per-class top-1 over the {len(classes)} classes with val images: val "
        f"{100 * mean_val:.2f}, test {100 * mean_test:.2f} ({100 * (mean_val - mean_test):+.2f})"
    ]


def paired_difference(results: list[dict], a: str, b: str) -> list[str]:
    """A table row: top-1 of `a` minus `b` over the seeds both finished (the same seed means the
    same data order and initialisation draws), with its mean ± std over seeds."""
    top1 = {(r["variant"], r["seed"]): r["test"]["acc"] for r in results}
    seeds = sorted(s for v, s in top1 if v == a and (b, s) in top1)
    if not seeds:
        return []
    diffs = [100 * (top1[a, s] - top1[b, s]) for s in seeds]
    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    each = ", ".join(f"{d:+.2f}" for d in diffs)
    return [
        f"| {VARIANTS[a][0]} − {VARIANTS[b][0]}, paired by seed | {', '.join(map(str, seeds))} | "
        f"{statistics.mean(diffs):+.2f}{spread} ({each}) | | | | | |"
    ]


def results_table(args: argparse.Namespace, results: list[dict], stopped: list[str]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    rows = [
        "| variant | seed | top-1 | many | medium | few | ECE | wall time (train loops) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for variant in args.variants:
        mine = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        for r in mine:
            t = r["test"]
            rows.append(
                f"| {VARIANTS[variant][0]} | {r['seed']} | {pct(t['acc'])} | {pct(t['acc_many'])} "
                f"| {pct(t['acc_medium'])} | {pct(t['acc_few'])} | {t['ece']:.4f} | "
                f"{_time_cell(r)} |"
            )
            details.append(
                f"- {VARIANTS[variant][0]}, seed {r['seed']}, per-class top-1 (%): "
                + ", ".join(f"{100 * a:.1f}" for a in t["per_class_acc"])
            )
            details += last_against_best(r) + val_against_test(r)
        if len(mine) > 1:
            top1 = [r["test"]["acc"] for r in mine]
            rows.append(
                f"| {VARIANTS[variant][0]}: mean ± std over {len(top1)} seeds | | "
                f"{pct(statistics.mean(top1))} ± {pct(statistics.stdev(top1))} | | | | | |"
            )
    rows += paired_difference(results, "shike", "balanced_softmax")
    if args.report:
        text = "from saved results: " + ", ".join(args.report)
    else:
        text = f"config {args.config}, data {args.data}, overrides {args.overrides or 'none'}, "
        text += f"{args.parallel} run(s) at a time on one machine"
    if results:
        text += "\n\n" + "\n".join(rows)
    if stopped:
        text += "\n\nNot finished:\n" + "\n".join(f"- {s}" for s in stopped)
    return text + "\n\n" + "\n".join(details)


def _print_or_record(args: argparse.Namespace, table: str) -> None:
    """`--report` makes the accuracy table (section `reproduce`); a training call's table goes
    to a section of its own (`reproduce_run`, or `reproduce_gpu` on a GPU machine), so that a
    call that trained some of the runs does not replace the table of all of them."""
    if args.no_record:
        print(table)
    elif args.report:
        record("reproduce", "Reproduce: paper recipe and baselines (Ray-free engine)", table)
    else:
        import torch

        gpu = torch.cuda.is_available()
        record(
            "reproduce_gpu" if gpu else "reproduce_run",
            f"Reproduce: the latest training call ({'GPU' if gpu else 'CPU'})",
            table,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/cifar10_lt_if100.yaml")
    ap.add_argument("--data", help="prepared shard folder/URI, or a raw source folder/archive")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["shike"], choices=sorted(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--deadline-min", type=float, default=None, help="stop what still runs then")
    ap.add_argument("--log-dir", default=None, help="one log per run (default: a temp folder)")
    ap.add_argument("--results", default=None, help="append each finished run here (JSON lines)")
    ap.add_argument("--checkpoints", default=None, help="resumable runs: checkpoint root folder")
    ap.add_argument(
        "--report", nargs="+", metavar="RESULT_JSON", help="table of saved results only"
    )
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        train_one(args)
        return
    if args.report:
        results = load_results(args.report)
        args.variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
        _print_or_record(args, results_table(args, results, []))
        return
    if not args.data:
        ap.error("--data is required (unless --report)")
    from pipeline.config import ConfigError

    try:  # a bad --config / --set fails here, once, not in every child
        run_config(args, args.variants[0], args.seeds[0])
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    refuse_other_recipes(args)
    results, stopped = run_all(args)
    _print_or_record(args, results_table(args, results, stopped))
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
