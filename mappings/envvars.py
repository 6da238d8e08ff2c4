"""`${ENV_VAR}` interpolation. Interpolated values are remembered as secrets so they can be redacted."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
REDACTED = "***"


class MissingVariable(Exception):
    def __init__(self, name: str):
        self.name = name
        super().__init__(name)


def interpolate(value: Any, env: Mapping[str, str], secrets: set[str]) -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string; collect substituted values into `secrets`."""
    if isinstance(value, str):
        return _interpolate_string(value, env, secrets)
    if isinstance(value, list):
        return [interpolate(v, env, secrets) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env, secrets) for k, v in value.items()}
    return value


def _interpolate_string(text: str, env: Mapping[str, str], secrets: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            found = env[name]
            if found:
                secrets.add(found)
            return found
        if default is not None:
            return default
        raise MissingVariable(name)

    return _PATTERN.sub(replace, text)


def variables_in(value: Any) -> list[str]:
    """Names of all `${...}` variables referenced anywhere in `value`."""
    if isinstance(value, str):
        return [m.group(1) for m in _PATTERN.finditer(value)]
    if isinstance(value, list):
        return [n for v in value for n in variables_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in variables_in(v)]
    return []


class Redactor:
    """Replaces known secret values (and URL passwords) in text meant for people."""

    def __init__(self, secrets: set[str] | None = None):
        self._secrets = sorted((s for s in (secrets or set()) if len(s) >= 3), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return redact_url_password(text)


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@")


def redact_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{REDACTED}@", text)


def environment() -> dict[str, str]:
    return dict(os.environ)
