"""Images/s of one training step (forward + backward + SGD step) at batch 128, in-memory tensors.

    python bench/train_step.py [--batch 128] [--steps 10] [--threads N] [--no-record]

Compares the CIFAR SHIKE model (3 experts, CE + DKT + MD) with the plain ResNet-32 baseline
(cross-entropy). Reports the median over timed steps after warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import record  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.engine import make_optimizer, set_trainable  # noqa: E402
from pipeline.losses import build_objective  # noqa: E402
from pipeline.models import build_model  # noqa: E402

VARIANTS = {
    "SHIKE ResNet-32, 3 experts (CE+DKT+MD)": [],
    "plain ResNet-32 (CE)": ["model.arch=resnet32", "model.head=linear", "loss.stage1=ce"],
}


def step_times(
    overrides: list[str], batch: int, steps: int, warmup: int, device: torch.device
) -> list[float]:
    cfg = load_config(None, ["data.dataset=cifar10", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10).to(device).train()
    optimizer = make_optimizer(set_trainable(model, 1), cfg.optim, 1)
    objective = build_objective(
        cfg.loss, 1, [5000 // (i + 1) for i in range(10)], cfg.model.cosine_scale
    )
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective(model(x), y).total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ["| model | median step (s) | images/s | ratio to SHIKE |", "|---|---|---|---|"]
    results = {}
    for name, overrides in VARIANTS.items():
        med = statistics.median(step_times(overrides, args.batch, args.steps, args.warmup, device))
        results[name] = args.batch / med
    shike = next(iter(results.values()))
    for name, ips in results.items():
        rows.append(f"| {name} | {args.batch / ips:.3f} | {ips:.0f} | {ips / shike:.2f} |")
    table = (
        f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads, {device}\n\n"
        + "\n".join(rows)
    )
    if args.no_record:
        print(table)
    else:
        record("Training step throughput (in-memory tensors)", table)


if __name__ == "__main__":
    main()
