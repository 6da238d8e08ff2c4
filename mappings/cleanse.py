"""Apply an entity's fields to one batch of source rows: transforms, type casts and validation rules.

Vectorised over pandas columns. A row that fails any rule is not dropped: it is returned as a quarantine
record naming every field that failed and why (reason codes, never the values).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.errors import CrmbridgeError
from crmbridge.mappings import transforms
from crmbridge.mappings.model import Entity, FieldSpec, Mapping
from crmbridge.values import key_text

# Fixed namespace: external ids must stay the same across runs, machines and versions.
EXTERNAL_ID_NAMESPACE = uuid.UUID("5d0c9a3e-5e0b-4d4e-9b8a-63726d627267")
KEY_SEPARATOR = "\x1f"


@dataclass
class FieldProblem:
    field: str
    code: str
    detail: str


@dataclass
class CleansedBatch:
    frame: pd.DataFrame  # _row, _key, _ext, then one column per field, in the field's target type
    quarantined: dict[int, list[FieldProblem]] = field(default_factory=dict)  # row number -> problems
    keys: dict[int, str | None] = field(default_factory=dict)  # source key of each quarantined row


def external_id(source: str, entity: str, key: str) -> str:
    """Deterministic id of a source record in every target: same source, entity and key -> same id."""
    return str(uuid.uuid5(EXTERNAL_ID_NAMESPACE, f"{source}{KEY_SEPARATOR}{entity}{KEY_SEPARATOR}{key}"))


def source_keys(frame: pd.DataFrame, key_columns: tuple[str, ...]) -> pd.Series:
    parts = [frame[c].map(key_text, na_action=None).astype(object) for c in key_columns]
    if len(parts) == 1:
        return parts[0]
    joined = parts[0].copy()
    missing = parts[0].isna()
    for part in parts[1:]:
        missing |= part.isna()
        joined = joined.astype(str) + KEY_SEPARATOR + part.astype(str)
    return joined.where(~missing, None)


def cleanse(mapping: Mapping, entity: Entity, frame: pd.DataFrame, row_numbers: np.ndarray) -> CleansedBatch:
    frame = frame.reset_index(drop=True)
    problems: dict[int, list[FieldProblem]] = {}

    def flag(mask: pd.Series, fname: str, code: str, detail: str) -> None:
        for position in np.flatnonzero(mask.to_numpy(dtype=bool, na_value=False)):
            problems.setdefault(int(position), []).append(FieldProblem(fname, code, detail))

    keys = source_keys(frame, entity.key)
    flag(keys.isna(), ",".join(entity.key), "missing_key", "the source key is empty")

    out: dict[str, Any] = {"_row": row_numbers.astype(np.int64), "_key": keys.astype(object)}
    for spec in entity.fields.values():
        values = _field_values(spec, frame)
        for step in spec.transforms:
            try:
                values = transforms.apply(values, step.name, step.argument)
            except Exception as error:  # a transform bug must name where it sits, never the data
                raise CrmbridgeError(f"entity `{entity.name}`: transform failed at {step.path} "
                                     f"({type(error).__name__})") from None
        values = _blank_to_missing(values)
        if spec.ref:
            values = values.map(key_text, na_action=None).astype(object)
        else:
            values, invalid = cast(values, spec.type, mapping.timezone_for(entity, spec.source_column or ""))
            flag(invalid, spec.name, "invalid_type", f"expected {_describe_type(spec.type)}")
        if spec.required:
            flag(values.isna(), spec.name, "required_missing", "a value is required")
        if spec.pattern and spec.type == "string":
            text = values.astype(object)
            matches = text.map(lambda v, p=re.compile(spec.pattern): bool(p.fullmatch(v)) if isinstance(v, str)
                               else True)
            flag(~matches.astype(bool), spec.name, "pattern_mismatch", f"expected to match {spec.pattern}")
        if spec.max_length and spec.type == "string":
            lengths = values.astype(object).map(lambda v: len(v) if isinstance(v, str) else 0)
            flag(lengths > spec.max_length, spec.name, "too_long", f"expected at most {spec.max_length} characters")
        out[spec.name] = values

    result = pd.DataFrame(out)
    bad = sorted(problems)
    quarantined = {int(row_numbers[p]): problems[p] for p in bad}
    bad_keys = {int(row_numbers[p]): keys.iloc[p] for p in bad}
    if bad:
        result = result.drop(index=bad).reset_index(drop=True)
    result.insert(2, "_ext", [external_id(entity.source, entity.name, k) for k in result["_key"]])
    return CleansedBatch(result, quarantined, bad_keys)


def _field_values(spec: FieldSpec, frame: pd.DataFrame) -> pd.Series:
    if spec.source_column is not None:
        return frame[spec.source_column]
    return pd.Series([spec.constant] * len(frame), dtype=object)


def _blank_to_missing(values: pd.Series) -> pd.Series:
    """Empty or whitespace-only text means 'no value' everywhere after cleansing."""
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        blank = values.map(lambda v: isinstance(v, str) and not v.strip(), na_action="ignore")
        blank = blank.astype(object).fillna(False).astype(bool)
        if blank.any():
            values = values.astype(object).where(~blank, None)
    return values


def _describe_type(kind: str) -> str:
    return {"integer": "a whole number", "decimal": "a decimal number", "float": "a number",
            "boolean": "true/false, yes/no or 1/0", "date": "a date (YYYY-MM-DD)",
            "timestamp": "a date and time (ISO 8601)", "string": "text"}[kind]


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def cast(values: pd.Series, kind: str, timezone: str | None) -> tuple[pd.Series, pd.Series]:
    """Cast to the field type; returns the values and a mask of values that could not be cast."""
    present = values.notna()
    if kind == "string":
        text = values.map(_as_text, na_action="ignore")
        return text.astype(pd.StringDtype("pyarrow")), pd.Series(False, index=values.index)
    if kind in ("integer", "float"):
        numbers = pd.to_numeric(values.astype(object).map(_strip, na_action="ignore"), errors="coerce")
        invalid = present & numbers.isna()
        if kind == "integer":
            fractional = numbers.notna() & (numbers.astype("float64") % 1 != 0)
            invalid |= fractional
            numbers = numbers.where(~fractional)
            return numbers.astype("Float64").astype("Int64"), invalid
        return numbers.astype("Float64"), invalid
    if kind == "decimal":
        decimals = values.map(_as_decimal_text, na_action="ignore")
        return decimals.astype(object), present & decimals.isna()
    if kind == "boolean":
        flags = values.map(_as_bool, na_action="ignore").astype(object)
        return flags.astype("boolean"), present & flags.isna()
    if kind == "date":
        parsed = pd.to_datetime(values.astype(object).map(_strip_or_keep, na_action="ignore"),
                                errors="coerce", format="mixed")
        text = parsed.dt.strftime("%Y-%m-%d").astype(object)
        return text.where(parsed.notna(), None), present & parsed.isna()
    if kind == "timestamp":
        return _cast_timestamp(values, timezone, present)
    raise ValueError(kind)


def _cast_timestamp(values: pd.Series, timezone: str | None, present: pd.Series) -> tuple[pd.Series, pd.Series]:
    raw = values.astype(object).map(_strip_or_keep, na_action="ignore")
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    invalid = pd.Series(False, index=values.index)
    # Each value is naive (interpreted in the declared zone) or carries its own offset.
    for position, value in raw.items():
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError):
            invalid[position] = True
            continue
        if stamp is pd.NaT:
            invalid[position] = True
            continue
        if stamp.tzinfo is None:
            try:
                stamp = stamp.tz_localize(timezone, nonexistent="raise", ambiguous="raise")
            except Exception:  # a wall-clock time skipped or repeated by a DST change
                invalid[position] = True
                continue
        parsed[position] = stamp.tz_convert("UTC")
    return parsed, invalid


def _strip(value: Any) -> Any:
    return value.strip().replace(",", "") if isinstance(value, str) else value


def _strip_or_keep(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 13800138000.0 from a spreadsheet is the text 13800138000
    return str(value)


def _as_decimal_text(value: Any) -> str | None:
    try:
        number = Decimal(value.strip().replace(",", "")) if isinstance(value, str) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite():
        return None
    return format(number.normalize(), "f")


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None
