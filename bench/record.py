"""Keep BENCHMARKS.md a results page: each benchmark owns one section of it.

A section lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`. `record` replaces what
is between the markers with the new table (date, machine, commit and command included) and
appends what was there to bench/HISTORY.md under a dated heading, so the page holds the latest
figures only and nothing measured is lost. A section the page lacks is added at its end.

BENCHMARKS_FILE / BENCHMARKS_HISTORY name another page / history (bench/gpu_session.sh writes a
part page on the GPU machine); merge such a part page into this one with

    python -m bench.record PART.md [--page BENCHMARKS.md] [--history bench/HISTORY.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "BENCHMARKS.md"
HISTORY = ROOT / "bench" / "HISTORY.md"
SECTION = re.compile(r"<!-- bench:([\w.-]+) -->\n(.*?)<!-- /bench:\1 -->", re.DOTALL)


def cpu_model() -> str:
    """The CPU's name from Linux's /proc/cpuinfo ("" elsewhere): ratios between pipelines move
    between hosts of one kind (bench/HISTORY.md), so a row names its CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1] for line in f if line.startswith("model name"))
            return next(names, "").strip()
    except OSError:
        return ""


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = " ".join(filter(None, [cpu_model(), f"({platform.machine()})"]))
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def commit() -> str:
    """The checked-out commit; BENCH_COMMIT names it where the tree travels without .git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            [
                *("git", "status", "--porcelain", "--untracked-files=no", "--", "."),
                *(":!BENCHMARKS.md", ":!bench/HISTORY.md"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def command() -> str:
    """This process's command line, as `python -m bench.NAME ...` when run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in (None, "__main__"):
        program = ["-m", spec.name]
    else:
        program = [os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "-c"]
    return "python " + " ".join(shlex.quote(a) for a in [*program, *sys.argv[1:]])


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(cmd: str, date: str, sha: str, host: str) -> str:
    """The line above a section's figures: what made them, when, at which commit, where."""
    return f"**Command** `{cmd}` · **date** {date} · **commit** {sha} · **machine** {host}"


def entry(table: str) -> str:
    """A section's content: where the figures come from, then the figures."""
    return f"{provenance(command(), now(), commit(), machine())}\n\n{table.strip()}\n"


def default_history(page: Path) -> Path:
    """bench/HISTORY.md for this repository's page, `<page>.history.md` beside any other."""
    if os.environ.get("BENCHMARKS_HISTORY"):
        return Path(os.environ["BENCHMARKS_HISTORY"])
    if page.resolve() == PAGE.resolve():
        return HISTORY
    return page.with_name(f"{page.stem}.history.md")


def replace_section(page: Path, history: Path, name: str, title: str, content: str) -> str | None:
    """Put `content` between the markers of section `name` of `page` (a new section, headed
    `title`, at the end if there is none) and append the replaced content to `history` under a
    dated heading. Returns the replaced content (None for a new section)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = page.read_text() if page.exists() else ""
    body = content.strip("\n") + "\n"
    if start not in text and end not in text:
        old = None
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "")
        text += f"### {title}\n\n{start}\n{body}{end}\n"
    else:
        i, j = text.find(start), text.find(end)
        if text.count(start) != 1 or text.count(end) != 1 or j < i:
            raise ValueError(f"{page}: section {name!r} needs one {start} before one {end}")
        old = text[i + len(start) : j].strip("\n")
        text = f"{text[: i + len(start)]}\n{body}{text[j:]}"
    if old:
        if not history.exists():
            history.write_text(f"# History of {page.name}: the tables its sections replaced\n")
        with open(history, "a") as fh:
            fh.write(f"\n## {now()}: {title} (bench:{name}), replaced on {page.name}\n\n{old}\n")
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(page)
    return old


def record(
    name: str,
    title: str,
    table: str,
    page: Path | None = None,
    history: Path | None = None,
    *,
    print_only: bool = False,
) -> None:
    """Print `table` with its provenance and make it section `name` of BENCHMARKS.md (or
    `page`); the section's previous content goes to bench/HISTORY.md (or `history`). With
    `print_only` (the scripts' --no-record) the table is printed and nothing is written."""
    if print_only:
        print(table)
        return
    page = Path(page or os.environ.get("BENCHMARKS_FILE") or PAGE)
    history = Path(history or default_history(page))
    content = entry(table)
    print(f"\n### {title}\n\n{content}")
    replaced = replace_section(page, history, name, title, content)
    moved = f"; the table it replaced is now at the end of {history}" if replaced else ""
    print(f"(section bench:{name} of {page}{moved})")


def merge(part: Path, page: Path, history: Path) -> list[str]:
    """Every section of `part` (a page written elsewhere, e.g. on the GPU machine) replaces the
    same section of `page`. Returns the sections' names."""
    text = part.read_text()
    names = []
    for match in SECTION.finditer(text):
        headings = re.findall(r"^### (.+)$", text[: match.start()], re.MULTILINE)
        title = headings[-1] if headings else match[1]
        replace_section(page, history, match[1], title, match[2])
        names.append(match[1])
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("part", type=Path, help="a page whose sections replace the page's")
    ap.add_argument("--page", type=Path, default=PAGE)
    ap.add_argument("--history", type=Path, default=None)
    args = ap.parse_args(argv)
    names = merge(args.part, args.page, args.history or default_history(args.page))
    if not names:
        sys.exit(f"error: {args.part}: no <!-- bench:NAME --> section")
    print(f"{args.page}: replaced or added {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
