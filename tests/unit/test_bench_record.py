"""bench/record.py keeps BENCHMARKS.md a results page: a benchmark's run replaces its own
section (between `<!-- bench:NAME -->` markers) and moves what was there to the history, instead
of appending to the page."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.record import SECTION, merge, record, replace_section

ROOT = Path(__file__).resolve().parents[2]


def _section(text: str, name: str) -> str:
    start, end = f"<!-- bench:{name} -->\n", f"<!-- /bench:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1
    return text[text.index(start) + len(start) : text.index(end)]


def _outside(text: str, name: str) -> tuple[str, str]:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    return text[: text.index(start)], text[text.index(end) :]


OLD_COMMIT = "0ld5ec7"  # the commit in the page's train_step section

PAGE = f"""# Benchmarks

The current figures of each benchmark.

## CPU throughput

<!-- bench:train_step -->
**Command** `python -m bench.train_step --steps 10` · **date** 2026-01-01 00:00 UTC · **commit** {OLD_COMMIT} · **machine** x86_64, 2 CPUs, no GPU

| model | mode | median step (ms) | images/s |
|---|---|---|---|
| plain ResNet-32 (CE) | eager float32 | 393.14 | 326 |
<!-- /bench:train_step -->

<!-- bench:reproduce -->
| variant | seed | top-1 |
|---|---|---|
| shike | 0 | 85.0 |
<!-- /bench:reproduce -->

## GPU figures

<!-- bench:train_step_gpu -->
| model | mode | median step (ms) |
|---|---|---|
| plain ResNet-32 (CE) | eager float32 | 11.28 |
<!-- /bench:train_step_gpu -->

<!-- bench:reproduce_gpu -->
No current figures.
<!-- /bench:reproduce_gpu -->

## Notes after the sections

Text the benchmarks do not own.
"""


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A results page of the test's own, shaped like BENCHMARKS.md (never the live one)."""
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(PAGE)
    return path


def test_record_twice_replaces_the_section_and_moves_the_old_one_to_the_history(page, tmp_path):
    history = tmp_path / "HISTORY.md"
    before = page.read_text()
    original = _section(before, "train_step")
    assert "| model | mode |" in original  # the page's current table

    record("train_step", "Training step", "| first | table |\n|---|---|", page, history)
    once = page.read_text()
    section = _section(once, "train_step")
    assert "| first | table |" in section and "| model | mode |" not in section
    assert "**Command** `python " in section and "**commit** " in section
    assert "**date** " in section and "**machine** " in section
    assert _outside(once, "train_step") == _outside(before, "train_step")  # the rest as it was
    assert original.strip() in history.read_text()

    record("train_step", "Training step", "| second | table |\n|---|---|", page, history)
    twice = page.read_text()
    section = _section(twice, "train_step")
    assert "| second | table |" in section and "| first | table |" not in section
    assert twice.count("| second | table |") == 1 and "| first | table |" not in twice
    assert len(twice.splitlines()) == len(once.splitlines())  # replaced, not appended
    assert _outside(twice, "train_step") == _outside(before, "train_step")

    log = history.read_text()
    assert log.count("| first | table |") == 1 and "| second | table |" not in log
    assert log.index(original.strip()) < log.index("| first | table |")  # oldest first
    headings = [line for line in log.splitlines() if line.startswith("## ")]
    assert len(headings) == 2
    assert all(" UTC: Training step (bench:train_step), replaced on " in h for h in headings)


def test_a_section_the_page_lacks_is_added_at_its_end_and_nothing_goes_to_the_history(
    page, tmp_path
):
    history = tmp_path / "HISTORY.md"
    before = page.read_text()
    old = replace_section(page, history, "new_bench", "A new benchmark", "| new | figures |\n")
    assert old is None and not history.exists()
    text = page.read_text()
    assert text.startswith(before.rstrip("\n"))
    assert text.endswith(
        "### A new benchmark\n\n<!-- bench:new_bench -->\n| new | figures |\n"
        "<!-- /bench:new_bench -->\n"
    )


def test_print_only_prints_the_table_and_writes_nothing(page, tmp_path, capsys):
    before = page.read_text()
    record("train_step", "Training step", "| only | printed |", page, tmp_path / "H.md",
           print_only=True)  # fmt: skip
    assert capsys.readouterr().out.strip() == "| only | printed |"
    assert page.read_text() == before and not (tmp_path / "H.md").exists()


def test_sections_are_told_apart_by_their_whole_name(page, tmp_path):
    history = tmp_path / "HISTORY.md"
    gpu = _section(page.read_text(), "reproduce_gpu")
    replace_section(page, history, "reproduce", "Reproduce", "| report |\n")
    assert _section(page.read_text(), "reproduce_gpu") == gpu
    assert _section(page.read_text(), "reproduce") == "| report |\n"


def test_unmatched_markers_are_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- /bench:x -->\ntext\n<!-- bench:x -->\n")
    with pytest.raises(ValueError, match="section 'x'"):
        replace_section(page, tmp_path / "h.md", "x", "X", "new\n")
    page.write_text("<!-- bench:x -->\none\n<!-- /bench:x -->\n<!-- bench:x -->\n")
    with pytest.raises(ValueError, match="section 'x'"):
        replace_section(page, tmp_path / "h.md", "x", "X", "new\n")
    assert not (tmp_path / "h.md").exists()


def test_a_part_page_written_elsewhere_merges_into_the_page(page, tmp_path):
    """The GPU machine records into an empty part page (BENCHMARKS_FILE); back here its
    sections replace the page's."""
    part = tmp_path / "BENCHMARKS.part.md"
    record("train_step_gpu", "Training step (GPU)", "| gpu | step |", part, tmp_path / "p.md")
    record("brand_new", "Brand new", "| brand | new |", part, tmp_path / "p.md")
    assert not (tmp_path / "p.md").exists()  # a fresh part page replaces nothing
    assert [m[1] for m in SECTION.finditer(part.read_text())] == ["train_step_gpu", "brand_new"]

    history = tmp_path / "HISTORY.md"
    old = _section(page.read_text(), "train_step_gpu")
    assert merge(part, page, history) == ["train_step_gpu", "brand_new"]
    text = page.read_text()
    assert "| gpu | step |" in _section(text, "train_step_gpu")
    assert "### Brand new\n\n<!-- bench:brand_new -->" in text
    assert old.strip() in history.read_text() and "| brand | new |" not in history.read_text()


def test_a_bench_script_records_its_command_as_a_module_run(page, tmp_path):
    """`python -m bench.train_step` run from the repository root replaces its section with the
    command as it was run; `--no-record` prints the table and leaves both files alone."""
    history = tmp_path / "HISTORY.md"
    env = {**os.environ, "BENCHMARKS_FILE": str(page), "BENCHMARKS_HISTORY": str(history)}
    cmd = [sys.executable, "-m", "bench.train_step", "--steps", "1", "--batch", "8"]
    before = page.read_text()

    quiet = subprocess.run(
        [*cmd, "--threads", "1", "--no-record"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "| plain ResNet-32 (CE) |" in quiet.stdout
    assert page.read_text() == before and not history.exists()

    run = subprocess.run(
        [*cmd, "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    section = _section(page.read_text(), "train_step")
    assert "**Command** `python -m bench.train_step --steps 1 --batch 8 --threads 1`" in section
    assert "batch 8, median of 3 passes of 1 steps" in section
    assert OLD_COMMIT not in section and OLD_COMMIT in history.read_text()
