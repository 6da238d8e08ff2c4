"""Validation rules with a severity (a field's `rules:`): checked when the mapping loads, applied to each
batch after cleansing (required, regex, enum, range, length) and, for the rules that need the whole
entity (unique, exists_in), over the staged rows once the entity is staged (`flows.steps.after_staging`).

`reject` quarantines the row with the rule's reason code, the field, a message and the value (masked as
the field is shown); `warn` loads the row and counts it per field and code. `when` limits a rule to rows
where another field of the entity has a value, a given value, or one of several.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.mappings.model import Entity, FieldSpec, RuleSpec

log = logging.getLogger("crmbridge.run")

KINDS = ("required", "regex", "enum", "range", "length", "unique", "exists_in")
CODES = {"required": "required_missing", "regex": "pattern_mismatch", "enum": "not_in_enum", "range": "out_of_range",
         "length": "wrong_length", "unique": "not_unique", "exists_in": "reference_missing"}
ENTITY_WIDE = ("unique", "exists_in")
_NUMERIC = ("integer", "decimal", "float")


# --- loading -------------------------------------------------------------------------------------------


def check_rules(entity: dict[str, Any], at: tuple, spec: dict[str, Any], names: dict[str, int],
                data: dict[str, Any], add: Callable[[tuple, str], None]) -> None:
    """Report every problem of a field's `rules` (already schema-valid) through `add(path, message)`."""
    kind_of_field = spec.get("type", "string")
    for j, rule in enumerate(spec.get("rules") or []):
        where = (*at, "rules", j)
        if not isinstance(rule, dict):
            continue
        kinds = [k for k in KINDS if k in rule]
        if len(kinds) != 1:
            found = ", ".join(f"`{k}`" for k in kinds) or "none"
            add(where, f"expected exactly one rule of {', '.join(KINDS)} in each item; found {found}")
            continue
        kind = kinds[0]
        argument = rule[kind]
        if kind == "regex":
            try:
                re.compile(argument)
            except re.error as error:
                add((*where, "regex"), f"expected a valid regular expression ({error})")
        elif kind == "range":
            _check_range(argument, kind_of_field, (*where, "range"), add)
        elif kind == "length":
            if kind_of_field != "string":
                add((*where, "length"), f"`length` is checked on string fields only; this field is {kind_of_field}")
            elif argument.get("min", 0) > argument.get("max", argument.get("min", 0)):
                add((*where, "length"), "expected `min` at most `max`")
        elif kind == "exists_in":
            other = argument if isinstance(argument, str) else argument["entity"]
            if other not in names:
                add((*where, "exists_in"), f"unknown entity `{other}`; expected one of: {', '.join(names)}")
            elif other == entity.get("name"):
                add((*where, "exists_in"), "expected another entity (a value looked up in its own entity is "
                    "a `unique` question)")
            elif entity.get("name") in _looks_up(data["entities"][names[other]]):
                add((*where, "exists_in"), f"entity `{other}` itself refers to `{entity.get('name')}` (`ref` or "
                    "`exists_in`); expected references in one direction, so one entity can be staged first")
            elif isinstance(argument, dict) and argument["field"] not in data["entities"][names[other]]["fields"]:
                add((*where, "exists_in", "field"), f"entity `{other}` has no field `{argument['field']}`; expected "
                    f"one of: {', '.join(data['entities'][names[other]]['fields'])}")
        when = rule.get("when")
        if isinstance(when, dict):
            if when.get("field") not in entity.get("fields", {}):
                add((*where, "when", "field"), f"unknown field `{when.get('field')}`; expected a field of this "
                    f"entity: {', '.join(entity.get('fields', {}))}")
            if "equals" in when and "in" in when:
                add((*where, "when"), "expected at most one of `equals` and `in`")


def _looks_up(entity: dict[str, Any]) -> set[str]:
    """Entities this (raw) entity refers to through `ref` or an `exists_in` rule."""
    found = set()
    for spec in (entity.get("fields") or {}).values():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("ref"), str):
            found.add(spec["ref"])
        for rule in spec.get("rules") or []:
            other = rule.get("exists_in") if isinstance(rule, dict) else None
            found.add(other if isinstance(other, str) else other.get("entity") if isinstance(other, dict) else None)
    return found - {None}


def _check_range(argument: dict[str, Any], kind: str, at: tuple, add: Callable[[tuple, str], None]) -> None:
    if kind not in (*_NUMERIC, "date", "timestamp"):
        add(at, f"`range` is checked on number, date and timestamp fields; this field is {kind}")
        return
    bounds = []
    for key in ("min", "max"):
        if key not in argument:
            continue
        try:
            bounds.append(_bound(argument[key], kind))
        except (TypeError, ValueError):
            wanted = "a number" if kind in _NUMERIC else f"an ISO 8601 {kind} text"
            add((*at, key), f"expected {wanted}; found {argument[key]!r}")
            return
    if len(bounds) == 2 and bounds[0] > bounds[1]:
        add(at, "expected `min` at most `max`")


def _bound(value: Any, kind: str) -> Any:
    if kind in _NUMERIC:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        return float(value)
    if not isinstance(value, str):
        raise TypeError(value)
    if kind == "date":
        return pd.Timestamp(dt.date.fromisoformat(value))
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def build_rules(raw: list[dict[str, Any]] | None, at: str) -> tuple[RuleSpec, ...]:
    rules = []
    for j, rule in enumerate(raw or []):
        kind = next(k for k in KINDS if k in rule)
        when = rule.get("when")
        condition = None
        if when:
            condition = ((when["field"], "equals", when["equals"]) if "equals" in when
                         else (when["field"], "in", tuple(when["in"])) if "in" in when
                         else (when["field"], "present", None))
        rules.append(RuleSpec(kind, rule[kind], rule.get("severity", "reject"), condition, rule.get("message"),
                              f"{at}.rules[{j}]"))
    return tuple(rules)


# --- per batch -----------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """The text a rule compares: booleans as true/false, whole floats without `.0`."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _texts(values: pd.Series) -> pd.Series:
    return pd.Series([_text(v) for v in values.astype(object).tolist()], index=values.index, dtype=object)


def applies(rule: RuleSpec, fields: dict[str, pd.Series], length: int) -> np.ndarray:
    """Rows the rule applies to (its `when`)."""
    if rule.when is None:
        return np.ones(length, dtype=bool)
    name, how, value = rule.when
    other = fields[name]
    present = other.notna().to_numpy(dtype=bool)
    if how == "present":
        return present
    wanted = {_text(value)} if how == "equals" else {_text(v) for v in value}
    return present & _texts(other).isin(wanted).to_numpy(dtype=bool)


def broken(rule: RuleSpec, spec: FieldSpec, values: pd.Series) -> np.ndarray:
    """Rows whose value breaks a per-batch rule (a missing value breaks only `required`)."""
    present = values.notna().to_numpy(dtype=bool)
    if rule.kind == "required":
        return ~present
    if rule.kind == "regex":
        pattern = re.compile(rule.argument)
        ok = [True if t is None else bool(pattern.fullmatch(t)) for t in _texts(values).tolist()]
        return present & ~np.array(ok, dtype=bool)
    if rule.kind == "enum":
        return present & ~_texts(values).isin({_text(v) for v in rule.argument}).to_numpy(dtype=bool)
    if rule.kind == "length":
        lengths = values.astype(object).map(lambda v: len(v) if isinstance(v, str) else 0).to_numpy()
        low, high = rule.argument.get("min", 0), rule.argument.get("max")
        return present & ((lengths < low) | ((lengths > high) if high is not None else False))
    if rule.kind == "range":
        return present & _out_of_range(rule.argument, spec.type, values)
    raise ValueError(rule.kind)


def _out_of_range(argument: dict[str, Any], kind: str, values: pd.Series) -> np.ndarray:
    if kind in _NUMERIC:
        numbers = pd.to_numeric(values.astype(object), errors="coerce").astype("float64")
    elif kind == "date":
        numbers = pd.to_datetime(values.astype(object), errors="coerce", format="ISO8601")
    else:
        numbers = pd.to_datetime(values, errors="coerce", utc=True)
    low = _bound(argument["min"], kind) if "min" in argument else None
    high = _bound(argument["max"], kind) if "max" in argument else None
    out = np.zeros(len(values), dtype=bool)
    if low is not None:
        out |= (numbers < low).fillna(False).to_numpy(dtype=bool)
    if high is not None:
        out |= (numbers > high).fillna(False).to_numpy(dtype=bool)
    return out


def describe(rule: RuleSpec) -> str:
    if rule.message:
        return rule.message
    argument = rule.argument
    return {
        "required": lambda: "a value is required" + (f" when `{rule.when[0]}` is set" if rule.when else ""),
        "regex": lambda: f"expected to match {argument}",
        "enum": lambda: "expected one of: " + ", ".join(str(_text(v)) for v in argument),
        "range": lambda: "expected " + " and ".join(
            f"{'at least' if k == 'min' else 'at most'} {argument[k]}" for k in ("min", "max") if k in argument),
        "length": lambda: "expected " + " and ".join(
            f"{'at least' if k == 'min' else 'at most'} {argument[k]} characters" for k in ("min", "max")
            if k in argument),
        "unique": lambda: "an earlier row of the entity has the same value",
        "exists_in": lambda: (f"no `{argument}` row has this source key" if isinstance(argument, str)
                              else f"no `{argument['entity']}` row has this `{argument['field']}`"),
    }[rule.kind]()


def apply_batch_rules(entity: Entity, fields: dict[str, pd.Series], length: int,
                      flag: Callable[[np.ndarray, FieldSpec, str, str], None],
                      warnings: dict[tuple[str, str], int]) -> None:
    """Apply every per-batch rule of the entity to its cleansed fields."""
    for spec in entity.fields.values():
        for rule in spec.rules:
            if rule.kind in ENTITY_WIDE:
                continue
            hit = broken(rule, spec, fields[spec.name]) & applies(rule, fields, length)
            if not hit.any():
                continue
            code = CODES[rule.kind]
            if rule.severity == "warn":
                warnings[(spec.name, code)] = warnings.get((spec.name, code), 0) + int(hit.sum())
            else:
                flag(hit, spec, code, describe(rule))


# --- over the staged entity ------------------------------------------------------------------------------


def check_staged(staging: Any, entity: Entity, shown_as: Callable[[FieldSpec], str]) -> dict[tuple[str, str], int]:
    """Apply the `unique` and `exists_in` rules to the staged rows; rejected rows move to the quarantine.

    Returns the rows per (field, code), rejected and warned alike. Rules run in the order written, and a
    row one rule rejected is gone for the next.
    """
    from crmbridge.masking import mask_value
    from crmbridge.staging import QuarantineRecord, table_name

    counts: dict[tuple[str, str], int] = {}
    table = table_name(entity)
    for spec in entity.fields.values():
        for rule in (r for r in spec.rules if r.kind in ENTITY_WIDE):
            column = f'"{spec.name}"'
            condition, params = _when_sql(rule)
            if rule.kind == "unique":
                query = (f"SELECT _row, _key, {column} FROM (SELECT _row, _key, {column}, row_number() OVER "
                         f"(PARTITION BY {column} ORDER BY _seq) AS n FROM \"{table}\" WHERE {column} IS NOT NULL"
                         f"{condition}) WHERE n > 1 ORDER BY _row")
            else:
                other = rule.argument if isinstance(rule.argument, str) else rule.argument["entity"]
                other_column = "_key" if isinstance(rule.argument, str) else f'"{rule.argument["field"]}"'
                query = (f"SELECT _row, _key, {column} FROM \"{table}\" s WHERE {column} IS NOT NULL{condition} "
                         f"AND NOT EXISTS (SELECT 1 FROM \"rows_{other}\" p WHERE CAST(p.{other_column} AS VARCHAR) "
                         f"= CAST(s.{column} AS VARCHAR)) ORDER BY _row")
            found = staging.con.execute(query, params).fetchall()
            if not found:
                continue
            code = CODES[rule.kind]
            counts[(spec.name, code)] = len(found)
            if rule.severity == "warn":
                log.warning("entity %s: field %s: %d rows %s (warning, loaded)", entity.name, spec.name, len(found),
                            code)
                continue
            policy = shown_as(spec)
            detail = describe(rule)
            records = [QuarantineRecord(row, key, "validate", code, [{"field": spec.name, "code": code,
                                                                       "detail": detail,
                                                                       "value": mask_value(value, policy)}])
                       for row, key, value in found]
            staging.con.begin()
            try:
                staging.add_quarantine(entity, records)
                staging.con.register("rejected_rows", pd.DataFrame({"row": [r[0] for r in found]}))
                staging.con.execute(f'DELETE FROM "{table}" WHERE _row IN (SELECT "row" FROM rejected_rows)')
                staging.con.unregister("rejected_rows")
                staging.con.commit()
            except BaseException:
                staging.con.rollback()
                raise
            log.warning("entity %s: field %s: %d rows %s (quarantined)", entity.name, spec.name, len(found), code)
    return counts


def _when_sql(rule: RuleSpec) -> tuple[str, list[Any]]:
    if rule.when is None:
        return "", []
    name, how, value = rule.when
    column = f'"{name}"'
    if how == "present":
        return f" AND {column} IS NOT NULL", []
    values = [_text(value)] if how == "equals" else [_text(v) for v in value]
    marks = ", ".join("?" for _ in values)
    return f" AND CAST({column} AS VARCHAR) IN ({marks})", values
