"""docker/compose.yaml against the compose specification (check-jsonschema's vendored
`vendor.compose-spec`), a broken copy rejected, and the stack's own rules: loopback-only ports,
health checks + depends_on conditions, one Ray auth mode everywhere, dev-only credentials."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
BUILTIN = "vendor.compose-spec"


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose variable interpolation as `docker compose config` does it for the forms this
    file uses: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $$ -> $."""
    env = {} if env is None else env

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and value == "") else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"required variable {name} is unset: {arg}")
            return value
        return value or ""

    out = re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, text.replace("$$", "\0")
    )
    return out.replace("\0", "$")


def load(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


RAW = yaml.safe_load(COMPOSE.read_text())
STACK = load()
SERVICES = STACK["services"]


def _run_check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", BUILTIN, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Validator:
    """The same vendored schema check-jsonschema uses, for the interpolated file."""
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    ).read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def test_builtin_schema_name_exists():
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert BUILTIN in out


def test_compose_file_validates_with_check_jsonschema():
    proc = _run_check_jsonschema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_broken_compose_file_is_rejected_by_check_jsonschema(tmp_path):
    bad = copy.deepcopy(RAW)
    bad["services"]["ray-head"]["bogus"] = 1
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = _run_check_jsonschema(path)
    assert proc.returncode != 0 and "bogus" in proc.stdout + proc.stderr, proc.stdout


def test_interpolated_file_also_validates(compose_validator):
    errors = [e.message for e in compose_validator.iter_errors(STACK)]
    assert errors == []


# --------------------------------------------------------------------------------------------
# Published ports: loopback only
# --------------------------------------------------------------------------------------------


def _parse_short_port(text: str) -> tuple[str | None, str, str]:
    """[IP:][HOST:]CONTAINER[/PROTO] -> (ip or None, host port or "", container port)."""
    if text.startswith("["):  # [::1]:8080:80
        end = text.index("]")
        host, _, target = text[end + 2 :].rpartition(":")
        return text[1:end], host, target
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, "", parts[0]


def published_ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host_ip, published, target) for every `ports` entry, short or long syntax."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append(
                (entry.get("host_ip"), str(entry.get("published", "")), str(entry["target"]))
            )
        else:
            out.append(_parse_short_port(str(entry)))
    return out


def test_port_parser_sees_unsafe_bindings():
    svc = {
        "ports": [
            "8080:80",
            "9000",
            "0.0.0.0:1:2",
            "127.0.0.1:5:6/udp",
            "[::1]:7:8",
            {"target": 80, "published": 81},
            {"target": 80, "host_ip": "127.0.0.1", "published": 82},
        ]
    }
    assert published_ports(svc) == [
        (None, "8080", "80"),
        (None, "", "9000"),
        ("0.0.0.0", "1", "2"),
        ("127.0.0.1", "5", "6/udp"),
        ("::1", "7", "8"),
        (None, "81", "80"),
        ("127.0.0.1", "82", "80"),
    ]


@pytest.mark.parametrize("env", [{}, {"MLFLOW_PORT": "15000", "RAY_DASHBOARD_PORT": "18265"}])
def test_every_published_port_binds_loopback(env):
    stack = load(env)
    seen = 0
    for name, svc in stack["services"].items():
        assert svc.get("network_mode") != "host", f"{name} uses the host network"
        for ip, host, target in published_ports(svc):
            seen += 1
            assert ip == "127.0.0.1", f"{name}: port {host}:{target} binds {ip or 'all interfaces'}"
            assert host, f"{name}: port {target} has no fixed host port"
    assert seen >= 4  # MinIO API + console, MLflow, Ray dashboard


# --------------------------------------------------------------------------------------------
# Health checks and start-up order
# --------------------------------------------------------------------------------------------


def _one_shot(svc: dict) -> bool:
    return svc.get("restart", "no") == "no"


def test_long_running_services_have_healthchecks():
    for name, svc in SERVICES.items():
        if not _one_shot(svc):
            hc = svc.get("healthcheck")
            assert hc and hc.get("test"), f"{name} has no health check"


def test_depends_on_uses_conditions_that_match_the_target():
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
        for target, spec in deps.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert SERVICES[target].get("healthcheck"), (
                    f"{name} waits for {target} health, none defined"
                )
            elif cond == "service_completed_successfully":
                assert _one_shot(SERVICES[target]), f"{target} is not a one-shot service"
            else:
                pytest.fail(f"{name} -> {target}: condition {cond} does not wait for readiness")


def test_stack_shape():
    for required in ("minio", "minio-init", "postgres", "mlflow", "ray-head", "ray-worker"):
        assert required in SERVICES, required
    init_cmd = " ".join(SERVICES["minio-init"]["command"])
    assert "mc mb" in init_cmd and SERVICES["minio-init"]["image"].startswith("quay.io/minio/mc:")
    # Ray workers are built from the Dockerfile and scalable.
    for name in ("ray-head", "ray-worker"):
        build = SERVICES[name]["build"]
        assert (
            build["dockerfile"] == "docker/Dockerfile"
            and (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
        )
    assert "replicas" in SERVICES["ray-worker"]["deploy"]
    assert "container_name" not in SERVICES["ray-worker"], "a fixed container_name prevents --scale"
    assert SERVICES["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_mlflow_server_uses_postgres_and_proxies_artifacts_to_minio():
    svc = SERVICES["mlflow"]
    cmd = svc["command"]
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert "--serve-artifacts" in cmd
    assert args["--artifacts-destination"].startswith("s3://")
    hosts = args["--allowed-hosts"].split(",")
    assert {"mlflow:5000", "127.0.0.1:*", "localhost:*"} <= set(hosts), hosts
    env = svc["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert svc["build"]["target"] == "mlflow-server"
    # The bucket the server writes to is the one minio-init creates.
    bucket = args["--artifacts-destination"][len("s3://") :].split("/")[0]
    assert SERVICES["minio-init"]["environment"]["SHIKE_BUCKET"] == bucket


# --------------------------------------------------------------------------------------------
# Ray auth mode: the same on every Ray node and every client in the stack
# --------------------------------------------------------------------------------------------


def _runs_ray(svc: dict) -> bool:
    cmd = svc.get("command", "")
    cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    return bool(re.search(r"\bray (start|job)\b|python -m jobs\.", cmd))


@pytest.mark.parametrize("env", [{}, {"RAY_AUTH_MODE": "disabled"}])
def test_ray_auth_mode_is_consistent(env):
    services = load(env)["services"]
    modes = {}
    for name, svc in services.items():
        if _runs_ray(svc):
            e = svc.get("environment", {})
            assert "RAY_AUTH_MODE" in e, f"{name} runs Ray without RAY_AUTH_MODE"
            modes[name] = e["RAY_AUTH_MODE"]
            if e["RAY_AUTH_MODE"] == "token":
                assert e.get("RAY_AUTH_TOKEN"), f"{name}: token mode without a token"
    assert {"ray-head", "ray-worker", "smoke-train"} <= set(modes)
    assert len(set(modes.values())) == 1, modes
    assert set(modes.values()) == {env.get("RAY_AUTH_MODE", "token")}


# --------------------------------------------------------------------------------------------
# Credentials: variables with dev-only defaults, documented as such
# --------------------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN)$")


def test_credentials_come_from_variables_and_are_documented_dev_only():
    text = COMPOSE.read_text()
    assert "LOCAL DEVELOPMENT ONLY" in text
    for name, svc in RAW["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key in (
                "AWS_ACCESS_KEY_ID",
                "MINIO_ROOT_USER",
                "POSTGRES_USER",
            ):
                assert isinstance(value, str) and value.startswith("${"), (
                    f"{name}.{key} is a literal: credentials must be ${{VAR:-dev default}}"
                )
        uri = (svc.get("environment") or {}).get("MLFLOW_BACKEND_STORE_URI", "")
        if uri:
            assert "${POSTGRES_PASSWORD" in uri
    # The variables really override the defaults.
    stack = load({"MINIO_ROOT_PASSWORD": "s3cr3t-from-env", "RAY_AUTH_TOKEN": "tok-from-env"})
    assert stack["services"]["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "s3cr3t-from-env"
    assert (
        stack["services"]["ray-head"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-from-env"
    )
    assert stack["services"]["ray-worker"]["environment"]["RAY_AUTH_TOKEN"] == "tok-from-env"


def test_interpolation_helper():
    assert interpolate("${A:-x} ${B-y} $${C} ${D}", {"B": "", "D": "d"}) == "x  ${C} d"
    with pytest.raises(KeyError):
        interpolate("${A:?set A}")
