"""`${ENV_VAR}` interpolation. Interpolated values are remembered as secrets so they can be redacted.

Rules (the mapping reference documents them for users):
- `${NAME}` is replaced by the variable's value; an unset variable is an error naming it.
- `${NAME:-default}` uses `default` when the variable is unset or empty (as in a POSIX shell).
- Only string values are interpolated, and the result stays a string; keys are never interpolated.
- Every value taken from the environment is a secret: it is redacted from messages meant for people.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, quote_plus

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
        found = env.get(name)
        if found:
            secrets.add(found)
            return found
        if default is not None:  # `:-` falls back when the variable is unset or empty
            return default
        if found is not None:
            return found  # set, but empty
        raise MissingVariable(name)

    return _PATTERN.sub(replace, text)


def missing_variables(text: str, env: Mapping[str, str]) -> list[str]:
    """Variables in `text` that interpolation cannot resolve: unset, and without a `:-default`."""
    return [m.group(1) for m in _PATTERN.finditer(text) if m.group(1) not in env and m.group(2) is None]


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
    """Replaces known secret values (and URL passwords) in text meant for people.

    A secret is also found in its URL-encoded forms (a password with `@` or `/` is written `%40`/`%2F`
    inside a URL). Values shorter than 3 characters are not treated as secrets: replacing them would
    garble every message without protecting anything.
    """

    def __init__(self, secrets: set[str] | None = None):
        forms = {form for secret in (secrets or set()) if len(secret) >= 3
                 for form in (secret, quote(secret, safe=""), quote_plus(secret))}
        self._secrets = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return redact_url_password(text)


# user:password@ in a URL. The password runs to the last `@` before whitespace or a quote, so a raw `@`
# inside it (which should have been written %40) is still hidden in full.
_URL_PASSWORD = re.compile(
    r"(?P<user>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"`]*):(?P<pw>[^\s'\"`]*)@(?=[^@\s'\"`]*(?:[\s'\"`]|$))"
)


def redact_url_password(text: str) -> str:
    """`postgresql://app:s3cret@db/crm` -> `postgresql://app:***@db/crm`; other text is left alone."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('user')}:{REDACTED}@", text)


def environment() -> dict[str, str]:
    return dict(os.environ)
