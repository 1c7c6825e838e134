"""What counts as a credential: the environment variables that hold one, key names that look
like one, and passwords inside URIs.

Standard library only, so storage (`pipeline/storage.py` scrubs error messages) and the
MLflow layer (`pipeline/tracking/store.py` refuses to log secrets) share one definition.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

# Environment variables holding credentials: their values must never appear in a message, a
# param or a tag.
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "DATABRICKS_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
)
# Shorter values ("", "x", "abc") would match ordinary text everywhere.
_MIN_SECRET_LENGTH = 4

_SECRET_WORDS = frozenset(
    {
        "password", "passwd", "pwd", "secret", "secrets", "token", "tokens", "credential",
        "credentials", "apikey", "accesskey", "secretkey", "privatekey", "sessiontoken",
        "authorization", "auth", "cookie", "passphrase",
    }
)  # fmt: skip
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"),
     ("session", "token"), ("client", "secret"), ("sas", "token")}
)  # fmt: skip
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]+):[^/@\s]+@")


def credential_env_values() -> Iterator[tuple[str, str]]:
    """(variable, value) of each credential variable set in the environment."""
    for name in CREDENTIAL_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_SECRET_LENGTH:
            yield name, value


def looks_secret(key: str) -> bool:
    """Whether a param/tag key names a credential (password, token, access key, ...)."""
    lowered = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    parts = [p for p in re.split(r"[^a-z0-9]+", lowered) if p]
    if any(p in _SECRET_WORDS or p.startswith("aws") for p in parts):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:], strict=False))


def redact_uri(uri: str) -> str:
    """`https://user:pw@host/x` -> `https://user:***@host/x` (for messages and logged values)."""
    return _URI_PASSWORD.sub(r"\g<scheme>:***@", uri)
