"""The mapping language's protection parts: meaning checks for the loader and the model pieces it builds.

Kept here so `mappings/loader.py` needs one call per step; everything about `protect`, `subject`,
`protection:` and a target's `receives` lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from crmbridge.mappings.model import FieldSpec, ProtectionSettings

ENCRYPTED = ("encrypt", "deterministic", "blind_index")
INDEX_SUFFIX = "_bidx"
DEFAULT_ENV = "CRMBRIDGE_MASTER_KEY"
DEFAULT_INDEX_BYTES = 16

Add = Callable[[tuple[Any, ...], str], None]


def check(data: dict[str, Any], add: Add) -> None:
    """Every problem with protection settings, each at its document path."""
    for name, conn in data.get("sources", {}).items():
        if "receives" in conn:
            add(("sources", name, "receives"), "`receives` applies to targets only (what a target gets for "
                "protected fields); remove it from the source")
    protected_anywhere = False
    for i, entity in enumerate(data.get("entities", [])):
        at = ("entities", i)
        fields = entity.get("fields", {})
        keys = {entity["key"]} if isinstance(entity.get("key"), str) else set(entity.get("key") or ())
        for fname, spec in fields.items():
            policy = spec.get("protect", "none")
            if policy == "none":
                continue
            protected_anywhere = True
            fat = (*at, "fields", fname, "protect")
            if spec.get("type", "string") != "string" and policy != "drop":
                add(fat, f"`protect: {policy}` applies to string fields; this field is {spec.get('type')} "
                    "(make it `type: string`, or use `drop`)")
            if spec.get("ref"):
                add(fat, "a `ref` field holds the parent's target key and cannot be protected; expected no "
                    "`protect` here")
            if spec.get("from") in keys:
                add(fat, f"`{fname}` reads the source key column `{spec['from']}`, which staging and the "
                    "quarantine keep as the row's key; expected a protected field to read a non-key column")
            if policy == "blind_index" and fname + INDEX_SUFFIX in fields:
                add(fat, f"`protect: blind_index` adds a field `{fname}{INDEX_SUFFIX}` for the tokens, but the "
                    "entity already has a field of that name; expected it unused")
        subject = entity.get("subject")
        if subject is not None:
            if subject not in fields:
                names = ", ".join(fields)
                add((*at, "subject"), f"unknown field `{subject}`; expected one of the entity's fields: {names}")
            elif fields[subject].get("protect", "none") in ("none", "drop"):
                add((*at, "subject"), f"the subject field `{subject}` is not protected; expected `protect: "
                    "encrypt` or `blind_index` on it (it identifies a person)")
            elif not any(f.get("protect") in ("encrypt", "blind_index") for f in fields.values()):
                add((*at, "subject"), "no field of this entity is encrypted under a subject key; expected "
                    "`protect: encrypt` or `blind_index` on at least one field")
    if protected_anywhere and "protection" not in data:
        add((), "fields use `protect`, but the mapping has no `protection` section; expected `protection: "
            "{keyring: keys/keyring.json}` (create the keyring with `crmbridge keys init`)")


def field_extras(raw: dict[str, Any]) -> dict[str, Any]:
    """FieldSpec keyword arguments for a field's `protect`; a protected value is never shown unmasked."""
    policy, mask = raw.get("protect", "none"), raw.get("mask", "none")
    return {"protect": policy, "mask": "full" if policy != "none" and mask == "none" else mask}


def add_index_fields(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """Each `blind_index` field gets a `<field>_bidx` text field right after it, filled by `protect`."""
    out: dict[str, FieldSpec] = {}
    for name, spec in fields.items():
        out[name] = spec
        if spec.protect == "blind_index":
            index = name + INDEX_SUFFIX
            out[index] = FieldSpec(name=index, source_column=None, type="string", protect="index", mask="full")
    return out


def settings(data: dict[str, Any], base_dir: Path) -> ProtectionSettings | None:
    raw = data.get("protection")
    if raw is None:
        return None
    keyring = _resolve(raw["keyring"], base_dir)
    subjects = _resolve(raw["subjects"], base_dir) if raw.get("subjects") else keyring.with_name(
        keyring.name + ".subjects.db")
    return ProtectionSettings(keyring=keyring, master_key_env=raw.get("master_key_env", DEFAULT_ENV),
                              subjects=subjects, index_bytes=raw.get("index_bytes", DEFAULT_INDEX_BYTES))


def _resolve(path: str, base_dir: Path) -> Path:
    found = Path(path)
    return found if found.is_absolute() else base_dir / found


def receives_plaintext(mapping: Any, target: str) -> bool:
    return mapping.targets[target].options.get("receives", "plaintext") == "plaintext"


__all__ = ["add_index_fields", "check", "field_extras", "receives_plaintext", "settings"]
