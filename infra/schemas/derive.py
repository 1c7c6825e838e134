"""Derive strict JSON Schemas for KubeRay `RayJob` / `RayCluster` manifests from the CRDs.

    python infra/schemas/derive.py                      # rewrite infra/schemas/*.schema.json
    python infra/schemas/derive.py --out /tmp/x         # write elsewhere (the test compares)
    python infra/schemas/derive.py --crd-dir DIR        # CRDs from another folder

Input: the KubeRay v1.7.0 CustomResourceDefinitions (`ray.io_rayjobs.yaml`,
`ray.io_rayclusters.yaml`), by default from `../shared/schemas/kuberay-v1.7.0/` beside this
repository (override with --crd-dir or $KUBERAY_CRD_DIR). Output: one JSON Schema per kind.
See SOURCE.md beside this file for what each transformation means and why.

The transformation, applied recursively to `spec.versions[name == v1].schema.openAPIV3Schema`:

* strict objects: every schema node that declares `properties` gets
  `additionalProperties: false`, unless it carries `x-kubernetes-preserve-unknown-fields: true`
  (the API server keeps unknown fields there, so they are legal). `x-kubernetes-embedded-resource`
  nodes also admit `apiVersion`, `kind` and `metadata`, which the API server adds implicitly.
* `x-kubernetes-int-or-string: true` becomes `anyOf: [{type: integer}, {type: string}]`; a
  `pattern` on the node (quantities) moves into the string branch, where JSON Schema applies it.
* OpenAPI `nullable: true` becomes a `"null"` member of `type` (and of `enum`).
* `x-kubernetes-list-type: set` becomes `uniqueItems: true`. `map` lists (uniqueness by key),
  `x-kubernetes-map-type` and `x-kubernetes-validations` (CEL rules) have no JSON Schema
  equivalent and are dropped; the CEL rules are listed in SOURCE.md.
* the top level: `apiVersion` and `kind` are pinned to `ray.io/v1` and the kind; `metadata`
  (a bare `type: object` in a CRD) becomes a strict subset of ObjectMeta that a manifest may
  set; `status` is removed (a manifest is desired state; the operator writes status).

The output is deterministic (sorted keys, fixed indentation), so a test can regenerate it and
compare byte for byte.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KUBERAY_VERSION = "v1.7.0"
DEFAULT_CRD_DIR = REPO.parent / "shared" / "schemas" / f"kuberay-{KUBERAY_VERSION}"
API_VERSION = "ray.io/v1"
SERVED_VERSION = "v1"

# kind -> (CRD file, output file)
KINDS: dict[str, tuple[str, str]] = {
    "RayJob": ("ray.io_rayjobs.yaml", "rayjob-v1.schema.json"),
    "RayCluster": ("ray.io_rayclusters.yaml", "raycluster-v1.schema.json"),
}

# Keys that hold one sub-schema, a list of sub-schemas, or a name -> sub-schema map.
_ONE = ("items", "additionalProperties", "not")
_MANY = ("anyOf", "allOf", "oneOf")
_MAP = ("properties", "patternProperties")

# libyaml when present (a CRD is ~1 MB of YAML); the pure-Python loader gives the same tree.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def object_meta_schema() -> dict[str, Any]:
    """The part of Kubernetes ObjectMeta that a hand-written manifest may set, strictly.

    Server-populated fields (uid, resourceVersion, creationTimestamp, managedFields, ...) are
    deliberately absent: a manifest that carries them was copied from a live object.
    """
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
            "generateName": {"type": "string"},
            "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
            "labels": _string_map(),
            "annotations": _string_map(),
        },
        "additionalProperties": False,
        "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    }


def convert(node: Any) -> Any:
    """One OpenAPI v3 (structural, Kubernetes-flavoured) schema node -> strict JSON Schema."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _MAP:
            # Children are named fields: convert each value, never interpret the names.
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in _ONE:
            out[key] = convert(value) if isinstance(value, dict) else value
        elif key in _MANY:
            out[key] = [convert(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue  # handled below
        else:
            # type, enum, format, pattern, default, required, minimum, maxLength, ...: data,
            # copied verbatim (a `default` or `enum` value is never walked as a schema).
            out[key] = copy.deepcopy(value)

    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True

    if node.get("x-kubernetes-embedded-resource") is True:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out.setdefault("type", "object")

    if node.get("x-kubernetes-int-or-string") is True:
        string_branch: dict[str, Any] = {"type": "string"}
        if "pattern" in out:
            string_branch["pattern"] = out.pop("pattern")
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, string_branch]

    if node.get("nullable") is True:
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"] if "null" not in types else types
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]

    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True

    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def cel_rules(node: Any, path: str = "") -> list[tuple[str, str, str]]:
    """Every x-kubernetes-validations rule in the tree: (JSON path, rule, message)."""
    found: list[tuple[str, str, str]] = []
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []) or []:
            found.append((path or ".", rule.get("rule", ""), rule.get("message", "")))
        for key in _MAP:
            for name, sub in (node.get(key) or {}).items():
                found += cel_rules(sub, f"{path}.{name}")
        for key in _ONE:
            if isinstance(node.get(key), dict):
                found += cel_rules(node[key], f"{path}[]" if key == "items" else f"{path}.*")
        for key in _MANY:
            for sub in node.get(key, []) or []:
                found += cel_rules(sub, path)
    return found


def served_schema(crd: dict[str, Any], version: str = SERVED_VERSION) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served", False):
                raise ValueError(f"{crd['metadata']['name']}: version {version} is not served")
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd['metadata']['name']}: no version {version}")


def derive(kind: str, crd_path: Path) -> dict[str, Any]:
    raw = crd_path.read_bytes()
    crd = yaml.load(raw, Loader=_LOADER)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{crd_path} defines {crd['spec']['names']['kind']}, expected {kind}")
    body = convert(served_schema(crd))
    props = body["properties"]
    props.pop("status", None)
    props["apiVersion"] = {"type": "string", "const": API_VERSION}
    props["kind"] = {"type": "string", "const": kind}
    props["metadata"] = object_meta_schema()
    body["required"] = ["apiVersion", "kind", "metadata", "spec"]
    body["additionalProperties"] = False
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": f"https://shike.invalid/schemas/{kind.lower()}-{SERVED_VERSION}.schema.json",
        "title": f"{kind} ({API_VERSION}), strict, from KubeRay {KUBERAY_VERSION}",
        "$comment": (
            f"Generated by infra/schemas/derive.py from {crd_path.name} "
            f"(KubeRay {KUBERAY_VERSION}, sha256 {hashlib.sha256(raw).hexdigest()}); "
            "do not edit by hand. See infra/schemas/SOURCE.md."
        ),
        **body,
    }


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def resolve_crd_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("KUBERAY_CRD_DIR") or DEFAULT_CRD_DIR)


def write_all(crd_dir: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, (crd_name, out_name) in KINDS.items():
        target = out_dir / out_name
        target.write_text(dumps(derive(kind, crd_dir / crd_name)), encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crd-dir", help=f"folder with the CRDs (default {DEFAULT_CRD_DIR})")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: this folder)")
    parser.add_argument(
        "--list-cel", action="store_true", help="print the dropped CEL rules and exit"
    )
    args = parser.parse_args(argv)
    crd_dir = resolve_crd_dir(args.crd_dir)
    if args.list_cel:
        for kind, (crd_name, _) in KINDS.items():
            crd = yaml.load((crd_dir / crd_name).read_bytes(), Loader=_LOADER)
            for path, rule, message in cel_rules(served_schema(crd)):
                print(f"{kind}\t{path}\t{rule}\t{message}")
        return 0
    for path in write_all(crd_dir, Path(args.out)):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
