"""Images/s of the Ray-free engine's training loader alone (decode is done at load time; this
is the per-image SHIKE augmentation, per-image seeding, collation and batching).

    python -m bench.loader_speed --data .data/cifar10-lt-if100 [--workers 4 12] [--epochs 2]

`--data`: prepared shards (jobs/prepare_data.py) or a raw source such as ../shared/data/cifar10
(the long-tailed split is then built in memory, as the engine does).

Each worker count: one persistent loader, one untimed epoch (workers start), then the median
images/s of `--epochs` timed epochs. Tells whether a GPU run is fed fast enough.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.record import record
from bench.reproduce import data_override
from pipeline.config import load_config
from pipeline.data.readers.torch_reader import load_longtailed, make_loader


def loader_images_per_s(split, cfg_data, workers: int, epochs: int, batch: int) -> float:
    cfg_data = cfg_data.model_copy(update={"loader_workers": workers})
    loader = make_loader(split, cfg_data, batch, train=True, persistent=True)
    rates = []
    for epoch in range(epochs + 1):
        loader.sampler.set_seed(epoch)
        start = time.perf_counter()
        n = sum(len(labels) for _, labels in loader)
        if epoch:  # epoch 0 starts the workers
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cifar10_lt_if100.yaml")
    ap.add_argument("--data", required=True, help="prepared shards or a raw source")
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [data_override(args.data)])
    split = load_longtailed(cfg.data).train
    rows = ["| loader workers | images/s |", "|---:|---:|"]
    for workers in args.workers:
        rate = loader_images_per_s(split, cfg.data, workers, args.epochs, cfg.optim.batch_size)
        rows.append(f"| {workers} | {rate:,.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    text = f"{len(split.labels)} training images, batch {cfg.optim.batch_size}\n\n{table}"
    print(text)
    if not args.no_record:
        import torch

        # On the GPU machine the loader feeds the GPU: its figures are that machine's.
        gpu = torch.cuda.is_available()
        record(
            "loader_gpu" if gpu else "loader",
            f"Loader: images/s of the engine's training loader ({'GPU machine' if gpu else 'CPU'})",
            text,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
