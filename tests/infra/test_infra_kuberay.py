"""KubeRay manifests (infra/k8s/) against strict JSON Schemas derived from the KubeRay v1.7.0
CRDs (infra/schemas/, made by infra/schemas/derive.py), plus the deployment rules the schemas
cannot express. Offline: no cluster, no kubectl."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = ROOT / "infra" / "schemas"
SCHEMA_FILES = {"RayJob": "rayjob-v1.schema.json", "RayCluster": "raycluster-v1.schema.json"}
EXAMPLE_ENV = K8S / "shike-env.example.yaml"


def _load_derive():
    spec = importlib.util.spec_from_file_location("shike_infra_derive", SCHEMAS / "derive.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


derive = _load_derive()


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


DOCS = _docs()
RAY_DOCS = [(name, d) for name, d in DOCS if d.get("kind") in SCHEMA_FILES]


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for kind, name in SCHEMA_FILES.items():
        schema = json.loads((SCHEMAS / name).read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def _errors(validators, doc, kind: str | None = None) -> list[str]:
    """Schema errors of `doc` against the schema of `kind` (default: the doc's own kind)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validators[kind or doc["kind"]].iter_errors(doc)
    ]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_specs(doc: dict):
    cs = _cluster_spec(doc)
    yield "head", cs["headGroupSpec"]["template"]["spec"]
    for group in cs.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


# --------------------------------------------------------------------------------------------
# The vendored schemas are exactly what derive.py makes from the CRDs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    """KubeRay's CRDs, the schemas' source: in ../shared beside the checkout (or
    $KUBERAY_CRD_DIR); the two tests that re-derive from them skip without it."""
    path = derive.resolve_crd_dir(None)
    if not path.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {path} (the shared/ folder beside the repository, "
                    "or KUBERAY_CRD_DIR)")  # fmt: skip
    return path


def test_vendored_schemas_match_a_fresh_derivation(crd_dir, tmp_path):
    derive.write_all(crd_dir, tmp_path)
    for name in SCHEMA_FILES.values():
        fresh = (tmp_path / name).read_bytes()
        vendored = (SCHEMAS / name).read_bytes()
        assert fresh == vendored, (
            f"infra/schemas/{name} is stale: run `python infra/schemas/derive.py`"
        )


def test_schema_comment_names_the_source_checksum(crd_dir):
    import hashlib

    for kind, (crd_name, out_name) in derive.KINDS.items():
        digest = hashlib.sha256((crd_dir / crd_name).read_bytes()).hexdigest()
        schema = json.loads((SCHEMAS / out_name).read_text())
        assert digest in schema["$comment"], kind
        assert digest in (SCHEMAS / "SOURCE.md").read_text(), f"SOURCE.md lacks {crd_name}'s sha256"


# --------------------------------------------------------------------------------------------
# derive.convert on synthetic nodes (the real CRDs do not exercise every branch)
# --------------------------------------------------------------------------------------------


def test_convert_makes_objects_strict_but_respects_preserve_unknown_fields():
    node = {
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    out = derive.convert(node)
    v = jsonschema.Draft7Validator(out)
    assert v.is_valid({"strict": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"}})
    assert not v.is_valid({"strict": {"a": "x", "b": 1}})
    assert not v.is_valid({"unknown": 1})
    assert not v.is_valid({"map": {"k": 1}})
    assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(out)


def test_convert_int_or_string_nullable_set_and_field_names():
    node = {
        "type": "object",
        "properties": {
            "qty": {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "pattern": "^[0-9]+(Gi|Mi)?$",
                "x-kubernetes-int-or-string": True,
            },
            "bare": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "x-kubernetes-list-type": "set",
            },
            # fields whose *names* are JSON Schema keywords stay plain fields
            "items": {"type": "integer"},
            "properties": {"type": "string", "default": "x"},
            "embedded": {
                "type": "object",
                "x-kubernetes-embedded-resource": True,
                "properties": {"spec": {"type": "object"}},
            },
        },
        "x-kubernetes-validations": [{"rule": "true", "message": "m"}],
    }
    out = derive.convert(node)
    assert "x-kubernetes" not in json.dumps(out)
    v = jsonschema.Draft7Validator(out)
    assert v.is_valid(
        {
            "qty": 1,
            "bare": "x",
            "when": None,
            "tags": ["a", "b"],
            "items": 3,
            "properties": "p",
            "embedded": {"apiVersion": "v1", "kind": "K", "metadata": {}, "spec": {}},
        }
    )
    assert v.is_valid({"qty": "8Gi", "bare": 2})
    assert not v.is_valid({"qty": "8 GB"})  # pattern applies to the string branch
    assert not v.is_valid({"qty": 1.5})
    assert not v.is_valid({"tags": ["a", "a"]})  # set -> uniqueItems
    assert not v.is_valid({"items": "three"})
    assert not v.is_valid({"embedded": {"bogus": 1}})
    assert derive.cel_rules(node) == [(".", "true", "m")]


# --------------------------------------------------------------------------------------------
# The manifests validate, and a broken copy is rejected
# --------------------------------------------------------------------------------------------


def test_there_are_training_sweep_and_interactive_manifests():
    kinds = [(d["kind"], name) for name, d in RAY_DOCS]
    assert sum(k == "RayJob" for k, _ in kinds) >= 2, kinds
    assert sum(k == "RayCluster" for k, _ in kinds) >= 1, kinds
    entrypoints = " ".join(d["spec"]["entrypoint"] for _, d in RAY_DOCS if d["kind"] == "RayJob")
    assert "jobs.train" in entrypoints and "jobs.tune" in entrypoints


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_manifest_validates_against_derived_schema(validators, name, doc):
    assert _errors(validators, doc) == []


def test_the_schema_rejects_a_broken_copy(validators):
    """The validation is live, not a no-op: `spec.rayClusterSpec.headGroupSpec.bogus: 1` on
    the training RayJob is rejected, at that path."""
    doc = next(d for n, d in RAY_DOCS if n.startswith("rayjob-train"))
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["bogus"] = 1
    msgs = _errors(validators, bad)
    assert any("bogus" in m and "headGroupSpec" in m for m in msgs), msgs


# --------------------------------------------------------------------------------------------
# Deployment rules the schema cannot express
# --------------------------------------------------------------------------------------------


def _example_env() -> dict[tuple[str, str], dict]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all(EXAMPLE_ENV.read_text())
        if d
    }


def test_example_secrets_hold_placeholders_only():
    env = _example_env()
    secrets = [d for (kind, _), d in env.items() if kind == "Secret"]
    assert secrets, "the example Secret manifest is missing"
    for secret in secrets:
        assert "data" not in secret, "use stringData with visible placeholders, not base64 data"
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE_ME"), (
                f"{secret['metadata']['name']}.{key} is not a placeholder"
            )
    configmaps = [d for (kind, _), d in env.items() if kind == "ConfigMap"]
    assert configmaps
    for cm in configmaps:
        for key in cm["data"]:
            assert not re.search(r"SECRET|PASSWORD|TOKEN", key), (
                f"ConfigMap holds a secret-like key {key}"
            )
        assert {"MLFLOW_TRACKING_URI", "AWS_REGION"} <= set(cm["data"])


def test_no_credentials_inline_in_ray_manifests():
    for name, doc in RAY_DOCS:
        text = yaml.safe_dump(doc)
        assert "AWS_SECRET_ACCESS_KEY" not in text, (
            f"{name}: S3 keys must come from a Secret (envFrom)"
        )
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), name


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_ray_pods_get_env_shm_and_the_right_version(name, doc):
    env = _example_env()
    cs = _cluster_spec(doc)
    assert cs["rayVersion"], name  # equality with the pinned Ray: test_infra_consistency.py
    assert cs.get("authOptions", {}).get("mode") == "token", (
        f"{name}: Ray 2.60 token auth must be on"
    )
    secret_name = cs["authOptions"].get("secretName")
    if secret_name:
        assert ("Secret", secret_name) in env, f"{name}: auth Secret {secret_name} has no example"
        assert "auth_token" in env[("Secret", secret_name)]["stringData"]
    for group, pod in _pod_specs(doc):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            where = f"{name} {group}/{c['name']}"
            refs = {
                ("ConfigMap", r["configMapRef"]["name"])
                for r in c.get("envFrom", [])
                if "configMapRef" in r
            }
            refs |= {
                ("Secret", r["secretRef"]["name"]) for r in c.get("envFrom", []) if "secretRef" in r
            }
            assert ("ConfigMap", "shike-env") in refs, f"{where}: no envFrom ConfigMap shike-env"
            assert ("Secret", "shike-s3-credentials") in refs, f"{where}: no envFrom Secret"
            assert refs <= set(env), (
                f"{where}: references {refs - set(env)} with no example manifest"
            )
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm, f"{where}: /dev/shm not mounted"
            vol = volumes[shm[0]["name"]]
            assert vol.get("emptyDir", {}).get("medium") == "Memory", (
                f"{where}: /dev/shm not emptyDir Memory"
            )


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_worker_groups_request_gpus(name, doc):
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    assert groups
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, (
                f"{name} {group['groupName']}: no GPU limit"
            )
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group[
            "groupName"
        ]


def _tokens_after(tokens: list[str], flag: str) -> list[str]:
    out = []
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            out.append(tokens[i + 1])
        elif tok.startswith(flag + "="):
            out.append(tok.split("=", 1)[1])
    return out


def test_training_job_resumes_on_retry():
    """backoffLimit retries make a new RayCluster; only a stable run name + S3 storage path let
    the new attempt find the checkpoint (and continue the same MLflow run)."""
    import shlex

    doc = next(d for n, d in RAY_DOCS if n.startswith("rayjob-train"))
    spec = doc["spec"]
    assert spec.get("backoffLimit", 0) >= 1
    tokens = shlex.split(spec["entrypoint"])
    run_names = _tokens_after(tokens, "--run-name")
    assert len(run_names) == 1 and re.fullmatch(r"[A-Za-z0-9._-]+", run_names[0]), run_names
    overrides = dict(s.split("=", 1) for s in _tokens_after(tokens, "--set"))
    assert overrides.get("cluster.storage_path", "").startswith("s3://"), overrides
    assert overrides.get("data.uri", "").startswith("s3://"), overrides
    # Ray Train workers (1 GPU each) must fit the fixed-size GPU group.
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert int(overrides.get("cluster.num_workers", 1)) <= gpus


def test_sweep_job_has_a_stable_name():
    import shlex

    doc = next(d for n, d in RAY_DOCS if n.startswith("rayjob-sweep"))
    names = _tokens_after(shlex.split(doc["spec"]["entrypoint"]), "--name")
    assert len(names) == 1 and re.fullmatch(r"[A-Za-z0-9._-]+", names[0]), names
