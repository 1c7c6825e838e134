"""Reproduce the paper recipe (and the ablation baselines) with the Ray-free engine.

    python bench/reproduce.py --config configs/cifar10_lt_if100.yaml --data .data/cifar10-lt-if100 \
        --seeds 0 1 2 --variants shike ce balanced_softmax no_dkf no_dkt

Runs on any machine with PyTorch (the GPU machine has no Ray and no MLflow): `--data` is a
prepared shard folder (jobs/prepare_data.py) or a raw source (e.g. ../shared/data/cifar10).
For each variant and seed it prints and records top-1, many/medium/few, ECE, wall time, and the
per-class accuracy. `--set` overrides any config key (e.g. `--set optim.epochs=2` for a CPU
check, `--set train.channels_last=true`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import record  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.engine import format_duration, run  # noqa: E402

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


def variant_overrides(name: str, epochs: int) -> list[str]:
    return [f"optim.stage2_start={epochs}" if o == "STAGE2_OFF" else o for o in VARIANTS[name][1]]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/cifar10_lt_if100.yaml")
    ap.add_argument(
        "--data", required=True, help="prepared shard folder/URI, or a raw source folder/archive"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["shike"], choices=sorted(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    is_prepared = (Path(args.data) / "manifest.json").exists() or args.data.startswith("s3://")
    data_key = "data.uri" if is_prepared else "data.source"
    rows = [
        "| variant | seed | top-1 | many | medium | few | ECE | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for variant in args.variants:
        top1 = []
        for seed in args.seeds:
            base = load_config(args.config, [f"{data_key}={args.data}", *args.overrides])
            cfg = load_config(
                args.config,
                [
                    f"{data_key}={args.data}",
                    *args.overrides,
                    *variant_overrides(variant, base.optim.epochs),
                    f"train.seed={seed}",
                ],
            )
            print(f"== {VARIANTS[variant][0]}, seed {seed}, {cfg.optim.epochs} epochs", flush=True)
            out = run(cfg)
            res = out["test"]
            wall = sum(h["seconds"] for h in out["history"])
            top1.append(res["acc"])
            rows.append(
                f"| {VARIANTS[variant][0]} | {seed} | {100 * res['acc']:.2f} | {100 * res['acc_many']:.2f} | "
                f"{100 * res['acc_medium']:.2f} | {100 * res['acc_few']:.2f} | {res['ece']:.4f} | "
                f"{format_duration(out['wall_seconds'])} (train loops {format_duration(wall)}) |"
            )
            details.append(
                f"- {VARIANTS[variant][0]}, seed {seed}, per-class top-1 (%): "
                + ", ".join(f"{100 * a:.1f}" for a in res["per_class_acc"])
            )
        if len(top1) > 1:
            rows.append(
                f"| {VARIANTS[variant][0]}: mean ± std over {len(top1)} seeds | | "
                f"{100 * statistics.mean(top1):.2f} ± {100 * statistics.stdev(top1):.2f} | | | | | |"
            )
    table = (
        f"config {args.config}, data {args.data}, overrides {args.overrides or 'none'}\n\n"
        + "\n".join(rows)
    )
    table += "\n\n" + "\n".join(details)
    if args.no_record:
        print(table)
    else:
        record("Reproduce: paper recipe and baselines (Ray-free engine)", table)


if __name__ == "__main__":
    main()
