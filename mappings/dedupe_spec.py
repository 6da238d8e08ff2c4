"""The `dedupe:` block of an entity: its meaning checks (after the JSON Schema) and its model object."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from crmbridge.mappings.model import CompareSpec, DedupeSpec

Add = Callable[[tuple, str], None]

# Kept here rather than imported from crmbridge.dedupe so loading a mapping never imports the matcher.
KEY_FUNCTIONS = {"lower", "soundex", "metaphone", "nysiis", "digits", "last4", "last7", "first3", "initial",
                 "year", "month_day"}


def _column_ok(name: str, fields: dict[str, Any]) -> bool:
    """A field, or the blind-index token column of a `protect: blind_index` field (`email_bidx`)."""
    base = name[: -len("_bidx")] if name.endswith("_bidx") else None
    return name in fields or (base in fields and fields[base].get("protect") == "blind_index")


# Staged values of these are ciphertext that differs for equal values: nothing can compare them. `hash` and
# `deterministic` values (and `_bidx` tokens) compare equal for equal values, so only equality works on them.
_RANDOMISED = {"encrypt", "blind_index", "drop"}


def _protection_problem(name: str, fields: dict[str, Any], equality: bool) -> str | None:
    policy = (fields.get(name) or {}).get("protect", "none") if name in fields else "token"
    if policy == "none" or (equality and policy != "none" and policy not in _RANDOMISED):
        return None
    hint = f"; use its token column `{name}_bidx`" if policy == "blind_index" else ""
    if policy in _RANDOMISED:
        return f"field `{name}` is staged encrypted (`protect: {policy}`), so equal values do not compare equal{hint}"
    return f"`{name}` is staged as a token (`protect: {policy}`): only equality (`exact`, a plain key) works on it"


def _unknown(name: str, fields: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"unknown field `{name}`{hint}; expected one of the entity's fields: {', '.join(fields)}"


def check_dedupe(entity: dict[str, Any], at: tuple, add: Add) -> None:
    """Every name must be a field of the entity, key functions must exist, thresholds must be ordered."""
    spec, fields = entity["dedupe"], entity["fields"]
    for r, rule in enumerate(spec.get("blocking", [])):
        for k, expression in enumerate(rule):
            found = re.fullmatch(r"\s*(?:([a-z_0-9]+)\(\s*(\w+)\s*\)|(\w+))\s*", expression)
            path = (*at, "blocking", r, k)
            if not found:
                add(path, f"`{expression}` is not a blocking key; expected `field` or `function(field)`")
                continue
            function, name = (found[1], found[2]) if found[2] else (None, found[3])
            if function and function not in KEY_FUNCTIONS:
                add(path, f"unknown key function `{function}`; expected one of: {', '.join(sorted(KEY_FUNCTIONS))}")
            if not _column_ok(name, fields):
                add(path, _unknown(name, fields))
            elif problem := _protection_problem(name, fields, function is None):
                add(path, problem)
    for name, comparison in spec.get("compare", {}).items():
        if not _column_ok(name, fields):
            add((*at, "compare", name), _unknown(name, fields))
        elif problem := _protection_problem(name, fields, comparison.get("method") == "exact"):
            add((*at, "compare", name), problem)
    for r, rule in enumerate(spec.get("rules", [])):
        for k, name in enumerate(rule):
            if not _column_ok(name, fields):
                add((*at, "rules", r, k), _unknown(name, fields))
            elif problem := _protection_problem(name, fields, True):
                add((*at, "rules", r, k), problem)
    survive = spec.get("survive", {})
    for name, strategy in survive.items():
        if name != "*" and name not in fields:
            add((*at, "survive", name), _unknown(name, fields))
        if strategy == "most_recent" and not spec.get("recency_field"):
            add((*at, "survive", name), "`most_recent` needs `recency_field` (the timestamp it goes by)")
        if strategy == "source_priority" and not spec.get("priority"):
            add((*at, "survive", name), "`source_priority` needs `priority` (a field and the trusted order)")
    for key in ("recency_field",):
        if key in spec and spec[key] not in fields:
            add((*at, key), _unknown(spec[key], fields))
    if "priority" in spec and spec["priority"]["field"] not in fields:
        add((*at, "priority", "field"), _unknown(spec["priority"]["field"], fields))
    match, review = spec.get("match_above", 0.9), spec.get("review_above", 0.75)
    if review > match:
        add((*at, "review_above"), f"`review_above` ({review}) is above `match_above` ({match}); expected a "
            "value at most `match_above`")


def dedupe_spec(raw: dict[str, Any] | None) -> DedupeSpec | None:
    if not raw:
        return None
    priority = raw.get("priority") or {}
    return DedupeSpec(
        blocking=tuple(tuple(rule) for rule in raw["blocking"]),
        compare=tuple(CompareSpec(name, c["method"], float(c.get("weight", 1.0)), c.get("scale"), c.get("min"))
                      for name, c in raw["compare"].items()),
        rules=tuple(tuple(rule) for rule in raw.get("rules", [])),
        model=raw.get("model", "weighted"),
        match_above=float(raw.get("match_above", 0.9)),
        review_above=float(raw.get("review_above", 0.75)),
        distinct_below=raw.get("distinct_below"),
        review_file=raw.get("review_file"),
        survive=dict(raw.get("survive", {})),
        recency_field=raw.get("recency_field"),
        priority_field=priority.get("field"),
        priority_order=tuple(priority.get("order", ())),
        match_target=bool(raw.get("match_target", False)),
    )
