"""Throughput and val accuracy from the engine's epoch lines (the logs bench/reproduce.py keeps).

    python -m bench.epoch_logs bench/logs/2026-11-27-h200-call1/*.log

For each log: epochs reached, median images/s over epochs 2.. (epoch 1 includes cuDNN's
algorithm search and the loader start), the 200-epoch time that rate projects, and the best
val accuracy so far. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

EPOCH = re.compile(r"^epoch +(\d+)/(\d+) .*?(?:val acc ([\d.]+)%.*?)?\| (\d+) img/s")
DATA = re.compile(r"^data: .* train (\d+) /")


def summarize(log: Path) -> str:
    rates, vals, total, train_images = [], [], 0, 0
    for line in log.read_text(errors="replace").splitlines():
        if m := DATA.match(line):
            train_images = int(m[1])
        if m := EPOCH.match(line):
            total = int(m[2])
            rates.append(int(m[4]))
            if m[3] is not None:
                vals.append(float(m[3]))
    if len(rates) < 2:
        return f"| {log} | {len(rates)} | n/a | n/a | n/a |"
    rate = statistics.median(rates[1:])
    projected = train_images * total / rate / 60
    best = f"{max(vals):.2f}%" if vals else "n/a"
    return f"| {log} | {len(rates)}/{total} | {rate:,.0f} | {projected:.1f} min | {best} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("logs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| log | epochs | median images/s | projected full run | best val acc so far |")
    print("|---|---|---|---|---|")
    for log in args.logs:
        print(summarize(log))


if __name__ == "__main__":
    main()
