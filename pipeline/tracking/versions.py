"""Registered model versions in the MLflow Model Registry: find one by model URI, move
aliases, tag versions.

Model URIs understood everywhere: `models:/<name>@<alias>`, `models:/<name>/<version>`,
`models:/<name>/latest`, `runs:/<run_id>/<path>`. A missing model, version or alias is a
`RegistryError` whose one-line message lists what does exist. Each finished training run moves
`candidate` to its version; only the promotion job (`pipeline/evaluation/promotion.py`) moves `champion`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.credentials import redact_uri
from pipeline.tracking.store import check_tracking_server, checked_tags, resolve_tracking_uri

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_RUN_ID = "shike.run_id"  # version tag: the training run the version was logged from


class RegistryError(LookupError):
    """A registry lookup or registration problem, with a one-line message."""


# ---- lookup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelRef:
    kind: str  # "alias" | "version" | "latest" | "run"
    name: str = ""
    ref: str = ""  # alias, version, or run id
    path: str = ""  # runs:/ artifact path


_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)(?:/(?P<path>.*))?$")


def _parse(model_uri: str) -> _ModelRef:
    if m := _MODELS_ALIAS.match(model_uri):
        return _ModelRef("alias", m["name"], m["alias"])
    if m := _MODELS_VERSION.match(model_uri):
        version = m["version"]
        if version == "latest":
            return _ModelRef("latest", m["name"])
        if not version.isdigit():
            raise RegistryError(
                f"bad model URI {model_uri!r}: version must be a number or 'latest' "
                "(stages are not used: address models by alias, models:/<name>@<alias>)"
            )
        return _ModelRef("version", m["name"], version)
    if m := _RUNS.match(model_uri):
        return _ModelRef("run", ref=m["run"], path=(m["path"] or "").strip("/"))
    raise RegistryError(
        f"unsupported model URI {model_uri!r}: use models:/<name>@<alias>, "
        "models:/<name>/<version> or runs:/<run_id>/<path>"
    )


_MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})


def is_missing(exc: MlflowException) -> bool:
    """Whether MLflow reports a missing model / version / alias (not an outage or auth error)."""
    return getattr(exc, "error_code", None) in _MISSING_CODES


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _require_model(client: MlflowClient, name: str, uri: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        listing = ", ".join(known) if known else "none"
        raise RegistryError(
            f"no registered model named '{name}' at {redact_uri(uri)} (registered: {listing})"
        ) from None


def _versions(client: MlflowClient, filter_string: str) -> list[ModelVersion]:
    found = client.search_model_versions(filter_string, max_results=1000)
    return sorted(found, key=lambda v: int(v.version))


def resolve_model_version(model_uri: str, *, tracking_uri: str | None = None) -> ModelVersion:
    """The registered `ModelVersion` a model URI designates (for runs:/, the newest version
    registered from that run); a `RegistryError` naming what is missing otherwise."""
    ref = _parse(model_uri)
    client, uri = _client(tracking_uri)
    if ref.kind == "run":
        versions = _versions(client, f"run_id = '{ref.ref}'")
        if ref.path and len(versions) > 1:
            named = [v for v in versions if _logged_model_name(client, v) == ref.path]
            versions = named or versions
        if not versions:
            raise RegistryError(f"no registered model version comes from run {ref.ref}")
        return versions[-1]

    registered = _require_model(client, ref.name, uri)
    if ref.kind == "alias":
        try:
            return client.get_model_version_by_alias(ref.name, ref.ref)
        except MlflowException as exc:
            if not is_missing(exc):
                raise
            aliases = getattr(registered, "aliases", {}) or {}
            listing = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"model '{ref.name}' has no alias '{ref.ref}' (aliases: {listing})"
            ) from None
    versions = _versions(client, f"name = '{ref.name}'")
    if ref.kind == "latest":
        if not versions:
            raise RegistryError(f"model '{ref.name}' has no versions")
        return versions[-1]
    try:
        return client.get_model_version(ref.name, ref.ref)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        listing = ", ".join(str(v.version) for v in versions) or "none"
        raise RegistryError(
            f"model '{ref.name}' has no version {ref.ref} (versions: {listing})"
        ) from None


def _logged_model_name(client: MlflowClient, version: ModelVersion) -> str | None:
    model_id = getattr(version, "model_id", None)
    source = str(version.source or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/") :].split("/", 1)[0]
    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id).name
    except MlflowException:
        return None


def pinned_model_uri(model_uri: str, *, tracking_uri: str | None = None) -> str:
    """`models:/<name>/<version>` for any models:/ URI (checked to resolve, with clear errors,
    before MLflow downloads anything); runs:/ URIs unchanged."""
    if _parse(model_uri).kind == "run":
        return model_uri
    mv = resolve_model_version(model_uri, tracking_uri=tracking_uri)
    return f"models:/{mv.name}/{mv.version}"


# ---- aliases and tags ------------------------------------------------------------------------


def set_version_tags(
    name: str, version: str | int, tags: dict[str, Any], *, tracking_uri: str | None = None
) -> None:
    """Tag a model version; keys and values pass the same secret guards as run tags."""
    checked = checked_tags(tags, "model version tag")  # all of them before writing any
    client, _ = _client(tracking_uri)
    for key, value in checked.items():
        client.set_model_version_tag(name, str(version), key, value)


def set_alias(
    name: str, alias: str, version: str | int, *, tracking_uri: str | None = None
) -> None:
    """Point `alias` of model `name` at `version` (which must exist)."""
    client, _ = _client(tracking_uri)
    resolve_model_version(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    client.set_registered_model_alias(name, alias, str(version))


def get_alias_version(
    name: str, alias: str, *, tracking_uri: str | None = None
) -> ModelVersion | None:
    """The version `alias` points at; None when the alias is unset (unknown model: error)."""
    client, uri = _client(tracking_uri)
    _require_model(client, name, uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise
