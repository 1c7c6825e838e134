"""The deployment files agree with the code.

* Every command in the KubeRay manifests, the compose file, the cluster-launcher config and
  docs/RUNBOOK.md that runs a project job (`python -m jobs.X ...` or `python jobs/X.py ...`)
  names a job module that exists and config files that exist, and its arguments are accepted by
  that job's own parser (`jobs.X.build_parser().parse_args(...)`); `--set` overrides of
  `jobs.train` are also checked against the config schema. A missing job module FAILS here.
* The Ray version of every Ray image tag and every `rayVersion` is the one pinned in
  pyproject.toml / constraints.txt, and the other pinned images agree with constraints.txt.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "infra" / "k8s"
AWS = ROOT / "infra" / "aws" / "cluster.yaml"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
IMAGE_APP_DIR = "/home/ray/app/"  # WORKDIR of the Ray image; configs/ lives there

PYTHON = re.compile(r"(^|/)python(3(\.\d+)*)?$")
JOB_MENTION = re.compile(r"-m\s+jobs\.\w+|\bjobs/\w+\.py\b")


# --------------------------------------------------------------------------------------------
# Pinned versions
# --------------------------------------------------------------------------------------------


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    from_pyproject = [
        m.group(2) for d in deps if (m := re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", d))
    ]
    assert len(from_pyproject) == 1, f"pyproject.toml must pin ray exactly once: {deps}"
    from_constraints = constraint_pins().get("ray")
    assert from_constraints == from_pyproject[0], (
        f"pyproject pins ray=={from_pyproject[0]}, constraints.txt ray=={from_constraints}"
    )
    return from_pyproject[0]


# --------------------------------------------------------------------------------------------
# Collecting commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    origin: str
    module: str  # jobs.train
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.origin}:{self.module}"


def _interpolate(text: str) -> str:
    """Compose interpolation with defaults (${VAR:-x} -> x), $$ -> $."""
    text = text.replace("$$", "\0")
    text = re.sub(
        r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?]([^}]*))?\}", lambda m: m.group(1) or "", text
    )
    return text.replace("\0", "$")


def shell_segments(text: str) -> list[list[str]]:
    """Simple commands of a shell snippet: lines (with \\-continuations joined), split at
    ; & | && || ( ) and comments dropped, each tokenized like the shell would."""
    segments: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:  # unbalanced quotes
            if JOB_MENTION.search(line):
                raise AssertionError(f"cannot tokenize job command {line!r}: {exc}") from None
            continue
        current: list[str] = []
        for tok in tokens:
            if tok and set(tok) <= set(";&|()<>"):
                segments.append(current)
                current = []
            else:
                current.append(tok)
        segments.append(current)
    return [s for s in segments if s]


def invocations_in_tokens(tokens: list[str], origin: str) -> list[Invocation]:
    found = []
    for i, tok in enumerate(tokens):
        if not PYTHON.search(tok) or i + 1 >= len(tokens):
            continue
        nxt = tokens[i + 1]
        if nxt == "-m" and i + 2 < len(tokens) and tokens[i + 2].startswith("jobs."):
            found.append(Invocation(origin, tokens[i + 2], tuple(tokens[i + 3 :])))
        elif m := re.fullmatch(r"(?:\./)?jobs/(\w+)\.py", nxt):
            found.append(Invocation(origin, f"jobs.{m.group(1)}", tuple(tokens[i + 2 :])))
    return found


def invocations_in_command(value, origin: str) -> list[Invocation]:
    """A command given as a shell string, or as an exec-form list (whose elements may in turn be
    shell strings, e.g. ["bash", "-c", "python -m jobs.train ..."])."""
    if isinstance(value, str):
        found = [inv for seg in shell_segments(value) for inv in invocations_in_tokens(seg, origin)]
        mentions = len(JOB_MENTION.findall(value))
    else:
        items = [str(v) for v in value]
        found = invocations_in_tokens(items, origin)
        mentions = sum(
            1 for a, b in zip(items, items[1:], strict=False) if a == "-m" and b.startswith("jobs.")
        )
        mentions += sum(1 for v in items if re.fullmatch(r"(?:\./)?jobs/\w+\.py", v))
        for item in items:
            if " " in item.strip():
                found += invocations_in_command(item, origin)
                mentions += len(JOB_MENTION.findall(item))
    assert len(found) >= mentions, f"{origin}: could not parse every job command in {value!r}"
    return found


def _walk_commands(node, keys) -> list:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in keys or (
                isinstance(k, str) and k.endswith("_commands") and "_commands" in keys
            ):
                if isinstance(v, (str, list)):
                    out.append(v)
            else:
                out += _walk_commands(v, keys)
    elif isinstance(node, list):
        for v in node:
            out += _walk_commands(v, keys)
    return out


def collect() -> dict[str, list[Invocation]]:
    by_source: dict[str, list[Invocation]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            origin = f"infra/k8s/{path.name}#{i}"
            for cmd in _walk_commands(doc, {"entrypoint", "command", "args"}):
                by_source.setdefault("k8s", []).extend(invocations_in_command(cmd, origin))
    stack = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    for name, svc in stack["services"].items():
        for cmd in _walk_commands(
            {k: svc.get(k) for k in ("command", "entrypoint")}, {"command", "entrypoint"}
        ):
            by_source.setdefault("compose", []).extend(
                invocations_in_command(cmd, f"docker/compose.yaml:{name}")
            )
    aws = yaml.safe_load(AWS.read_text())
    for cmds in _walk_commands(aws, {"_commands"}):
        for cmd in cmds if isinstance(cmds, list) else [cmds]:
            by_source.setdefault("aws", []).extend(
                invocations_in_command(cmd, "infra/aws/cluster.yaml")
            )
    text = RUNBOOK.read_text()
    for m in re.finditer(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        line = text.count("\n", 0, m.start(1)) + 1
        by_source.setdefault("runbook", []).extend(
            invocations_in_command(m.group(1), f"docs/RUNBOOK.md:{line}")
        )
    return by_source


BY_SOURCE = collect()
ALL = [inv for invs in BY_SOURCE.values() for inv in invs]


def test_extractor_finds_the_commands_it_should():
    segs = shell_segments(
        "FOO=1 ray job submit --address x -- python -m jobs.train --config a.yaml && echo ok\n"
        "python3 jobs/tune.py --name n | tee log  # python -m jobs.nothing\n"
        "x=\"$(python3 -c 'import a; print(1)')\""
    )
    invs = [i for s in segs for i in invocations_in_tokens(s, "t")]
    assert [(i.module, i.args) for i in invs] == [
        ("jobs.train", ("--config", "a.yaml")),
        ("jobs.tune", ("--name", "n")),
    ]
    listed = invocations_in_command(["bash", "-c", "python -m jobs.evaluate --split test"], "t")
    assert [(i.module, i.args) for i in listed] == [("jobs.evaluate", ("--split", "test"))]


def test_every_deployment_surface_runs_the_jobs_it_should():
    modules = {src: {i.module for i in invs} for src, invs in BY_SOURCE.items()}
    assert {"jobs.train", "jobs.tune"} <= modules.get("k8s", set()), modules
    assert {"jobs.prepare_data", "jobs.train"} <= modules.get("compose", set()), modules
    assert {
        "jobs.prepare_data",
        "jobs.train",
        "jobs.tune",
        "jobs.evaluate",
        "jobs.promote",
    } <= modules.get("runbook", set()), modules


def _values(args: tuple[str, ...], flag: str) -> list[str]:
    out = []
    for i, tok in enumerate(args):
        if tok == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif tok.startswith(flag + "="):
            out.append(tok.split("=", 1)[1])
    return out


def _repo_path(path: str) -> Path:
    if path.startswith(IMAGE_APP_DIR):
        path = path[len(IMAGE_APP_DIR) :]
    assert not path.startswith("/") and "$" not in path, (
        f"config path {path} is not a repository path"
    )
    return ROOT / path


@pytest.mark.parametrize("inv", ALL, ids=[f"{i.id}#{n}" for n, i in enumerate(ALL)])
def test_job_command_matches_the_code(inv: Invocation):
    name = inv.module.split(".", 1)[1]
    source = ROOT / "jobs" / f"{name}.py"
    assert re.fullmatch(r"\w+", name) and source.is_file(), (
        f"{inv.origin} runs {inv.module}, but jobs/{name}.py does not exist"
    )
    module = importlib.import_module(inv.module)
    assert callable(getattr(module, "main", None)), f"{inv.module} has no main()"
    parser = module.build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(inv.args))
    except SystemExit as exc:
        pytest.fail(
            f"{inv.origin}: `{inv.module} {shlex.join(inv.args)}` rejected by its parser "
            f"(exit {exc.code}): {err.getvalue().strip()}"
        )
    configs = _values(inv.args, "--config")
    for config in configs:
        assert _repo_path(config).is_file(), f"{inv.origin}: config file {config} does not exist"
    if inv.module == "jobs.train":
        from pipeline.config import ConfigError, load_config

        try:
            load_config(_repo_path(configs[0]), _values(inv.args, "--set"))
        except ConfigError as exc:
            pytest.fail(f"{inv.origin}: {exc}")


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


def _k8s_docs():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _images(node) -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                out.append(v)
            else:
                out += _images(v)
    elif isinstance(node, list):
        for v in node:
            out += _images(v)
    return out


def ray_version_of(image: str) -> str | None:
    """The Ray version an image reference declares: rayproject/ray:<ver>-..., or a project
    image tagged ...-ray<ver>."""
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if repo.endswith("rayproject/ray") or repo.endswith("rayproject/ray-ml"):
        m = re.match(r"(\d+\.\d+\.\d+)", tag)
        return m.group(1) if m else tag or "latest"
    m = re.search(r"(?:^|[-_.])ray(\d+\.\d+\.\d+)", tag)
    return m.group(1) if m else None


def ray_images() -> dict[str, str]:
    """origin -> image, for every image that runs Ray."""
    out = {}
    for i, (_word, args) in enumerate(re.findall(r"^(FROM)\s+(\S+)", DOCKERFILE.read_text(), re.M)):
        if "ray" in args:
            out[f"Dockerfile FROM #{i}"] = args
    stack = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    for name, svc in stack["services"].items():
        build = svc.get("build") or {}
        cmd = svc.get("command", "")
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        if build.get("target") == "ray" or re.search(r"\bray (start|job)\b|jobs\.", cmd):
            out[f"compose {name}"] = svc["image"]
    for fname, doc in _k8s_docs():
        if doc.get("kind") in ("RayJob", "RayCluster"):
            for j, image in enumerate(_images(doc)):
                out[f"k8s {fname} #{j}"] = image
    for j, image in enumerate(_images(yaml.safe_load(AWS.read_text()).get("docker", {}))):
        out[f"aws docker #{j}"] = image
    return out


def test_ray_version_is_pinned_consistently():
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_ray())


def test_every_ray_image_carries_the_pinned_ray_version():
    ray = pinned_ray()
    images = ray_images()
    assert len(images) >= 6, images
    wrong = {origin: image for origin, image in images.items() if ray_version_of(image) != ray}
    assert wrong == {}, f"Ray images whose tag does not declare ray {ray}: {wrong}"


def test_ray_version_helper():
    assert ray_version_of("rayproject/ray:2.60.0-py311-gpu") == "2.60.0"
    assert ray_version_of("rayproject/ray:latest") == "latest"
    assert ray_version_of("ghcr.io/x/shike:0.1.0-ray2.60.0") == "2.60.0"
    assert ray_version_of("ghcr.io/x/shike:0.1.0") is None
    assert ray_version_of("localhost:5000/shike:1-ray2.59.0") == "2.59.0"


def test_every_ray_version_field_is_the_pinned_one():
    ray = pinned_ray()
    seen = 0
    for fname, doc in _k8s_docs():
        if doc.get("kind") == "RayJob":
            seen += 1
            assert doc["spec"]["rayClusterSpec"]["rayVersion"] == ray, fname
        elif doc.get("kind") == "RayCluster":
            seen += 1
            assert doc["spec"]["rayVersion"] == ray, fname
    assert seen >= 3
    text = DOCKERFILE.read_text()
    asserted = re.findall(r"ray\.__version__ == '([^']+)'", text)
    assert asserted == [ray], asserted
    assert f"rayproject/ray:{ray}-py311-" in text, "the Ray base image must be Python 3.11"


def test_other_pinned_images_agree_with_constraints():
    pins = constraint_pins()
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args["MLFLOW_VERSION"] == pins["mlflow"]
    assert args["BOTO3_VERSION"] == pins["boto3"]
    assert re.search(r"^FROM python:3\.11[-.\w]*\s+AS mlflow-server", text, re.M)
    stack = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    mlflow_image = stack["services"]["mlflow"]["image"]
    assert mlflow_image.endswith(":" + pins["mlflow"]), mlflow_image
