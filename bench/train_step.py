"""Images/s of the training step at batch 128 on in-memory tensors, through the engine.

    python -m bench.train_step [--batch 128] [--steps 10] [--threads N] [--no-record]

Compares the CIFAR SHIKE model (3 experts, CE + DKT + MD) with the plain ResNet-32 baseline
(cross-entropy), each through `TrainingSession.run_epoch` (forward, objective, backward, SGD
step, loss bookkeeping), in the default (NCHW) and the channels-last memory layout. On CUDA it
also compares the execution modes: eager float32, eager AMP (float16 + GradScaler) and the
captured CUDA graph (float32). Reports the median of three timed passes of `--steps` steps
after a warm-up pass (which also captures the graph).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.record import record
from pipeline.config import load_config
from pipeline.training.session import TrainingSession

MODELS = {
    "SHIKE ResNet-32, 3 experts (CE+DKT+MD)": [],
    "plain ResNet-32 (CE)": ["model.arch=resnet32", "model.head=linear", "loss.stage1=ce"],
}
CHANNELS_LAST = ["train.channels_last=true"]
MODES = {
    "eager float32": ["train.amp=false"],
    "eager float32 channels-last": ["train.amp=false", *CHANNELS_LAST],
    "eager AMP float16": ["train.amp=true"],
    "eager AMP float16 channels-last": ["train.amp=true", *CHANNELS_LAST],
    "CUDA graph float32": ["train.amp=false", "train.cuda_graphs=true"],
    "CUDA graph float32 channels-last": [
        "train.amp=false",
        "train.cuda_graphs=true",
        *CHANNELS_LAST,
    ],
}
CPU_MODES = ("eager float32", "eager float32 channels-last")  # AMP and graphs need CUDA
COUNTS = [5000 // (i + 1) for i in range(10)]


def images_per_s(
    overrides: list[str],
    batch: int,
    steps: int,
    device: torch.device,
    image_size: int = 32,
    counts: list[int] = COUNTS,
) -> float:
    """Median images/s of three timed passes of `steps` steps on one batch of random
    `image_size` images, after a warm-up pass; `counts`: training images per class."""
    cfg = load_config(
        None,
        [
            "data.dataset=cifar10",
            "optim.epochs=10",
            "optim.stage2_start=10",
            f"optim.batch_size={batch}",
            *overrides,
        ],
    )
    session = TrainingSession(cfg, counts, device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, len(counts), (batch,), device=device)
    session.run_epoch([(x, y)] * 5)  # warm-up (cuDNN, allocator; capture for graphs)
    return statistics.median(session.run_epoch([(x, y)] * steps)["images_per_s"] for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = MODES if device.type == "cuda" else {m: MODES[m] for m in CPU_MODES}
    rows = [
        "| model | mode | median step (ms) | images/s | ratio to SHIKE eager float32 |",
        "|---|---|---|---|---|",
    ]
    reference = None
    for name, model_overrides in MODELS.items():
        for mode, mode_overrides in modes.items():
            ips = images_per_s([*model_overrides, *mode_overrides], args.batch, args.steps, device)
            reference = reference or ips
            rows.append(
                f"| {name} | {mode} | {1000 * args.batch / ips:.2f} | {ips:.0f} | "
                f"{ips / reference:.2f} |"
            )
    table = (
        f"batch {args.batch}, median of 3 passes of {args.steps} steps after a warm-up pass, "
        f"{torch.get_num_threads()} threads, {device}\n\n" + "\n".join(rows)
    )
    if args.no_record:
        print(table)
    else:
        gpu = device.type == "cuda"
        record(
            "train_step_gpu" if gpu else "train_step",
            f"Training step throughput (in-memory tensors, {'GPU' if gpu else 'CPU'})",
            table,
        )


if __name__ == "__main__":
    main()
