"""Apply an entity's fields to one batch of source rows: transforms, type casts and validation rules.

Vectorised over pandas columns. A row that fails any rule is not dropped: it is returned as a quarantine
record naming every field that failed, why (reason code and message) and the original source value, masked
by the field's `mask` (it goes only to the run's staging store and the consultant's export, never to logs
or the audit trail). Transforms that warn (e.g. `truncate`) are counted per field and code.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from hashlib import sha1
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crmbridge.errors import CrmbridgeError
from crmbridge.mappings import rules, transforms
from crmbridge.mappings.model import Entity, FieldSpec, Mapping
from crmbridge.masking import mask_value
from crmbridge.values import key_text

# Fixed namespace: external ids must stay the same across runs, machines and versions.
EXTERNAL_ID_NAMESPACE = uuid.UUID("5d0c9a3e-5e0b-4d4e-9b8a-63726d627267")
KEY_SEPARATOR = "\x1f"


@dataclass
class FieldProblem:
    field: str
    code: str
    detail: str
    value: str | None = None  # the original source value, masked as the field's `mask` says

    def as_dict(self) -> dict[str, str]:
        found = {"field": self.field, "code": self.code, "detail": self.detail}
        if self.value is not None:
            found["value"] = self.value
        return found


@dataclass
class CleansedBatch:
    frame: pd.DataFrame  # _row, _key, _ext, then one column per field, in the field's target type
    quarantined: dict[int, list[FieldProblem]] = field(default_factory=dict)  # row number -> problems
    keys: dict[int, str | None] = field(default_factory=dict)  # source key of each quarantined row
    warnings: dict[tuple[str, str], int] = field(default_factory=dict)  # (field, code) -> rows warned


def external_id(source: str, entity: str, key: str) -> str:
    """Deterministic id of a source record in every target: same source, entity and key -> same id."""
    return str(uuid.uuid5(EXTERNAL_ID_NAMESPACE, f"{source}{KEY_SEPARATOR}{entity}{KEY_SEPARATOR}{key}"))


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def external_ids(source: str, entity: str, keys: list[str]) -> list[str]:
    """`external_id` of many keys at once: the same UUID-5 texts, with the bit fiddling and hex formatting
    done on arrays rather than one `uuid.UUID` per key."""
    if not keys:
        return []
    prefix = EXTERNAL_ID_NAMESPACE.bytes + f"{source}{KEY_SEPARATOR}{entity}{KEY_SEPARATOR}".encode()
    digests = b"".join([sha1(prefix + key.encode()).digest()[:16] for key in keys])
    raw = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.empty((len(keys), 32), dtype=np.uint8)
    hexed[:, 0::2] = _HEX_DIGITS[raw >> 4]
    hexed[:, 1::2] = _HEX_DIGITS[raw & 0x0F]
    text = np.full((len(keys), 36), ord("-"), dtype=np.uint8)
    text[:, 0:8], text[:, 9:13], text[:, 14:18] = hexed[:, 0:8], hexed[:, 8:12], hexed[:, 12:16]
    text[:, 19:23], text[:, 24:36] = hexed[:, 16:20], hexed[:, 20:32]
    return text.view("S36").ravel().astype(str).tolist()


def _key_part(column: pd.Series) -> pd.Series:
    """`key_text` of every value, as `Series.map(key_text)` returns it (missing values come back as NaN)."""
    if pd.api.types.is_integer_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        # The text of an integer is its decimal digits: Arrow's cast gives exactly what `str(int)` does.
        text = pc.cast(pa.array(column, from_pandas=True), pa.string()).to_numpy(zero_copy_only=False)
        if column.hasnans:
            text[column.isna().to_numpy()] = np.nan
        return pd.Series(text, index=column.index, dtype=object)
    return column.map(key_text, na_action=None).astype(object)


def source_keys(frame: pd.DataFrame, key_columns: tuple[str, ...]) -> pd.Series:
    parts = [_key_part(frame[c]) for c in key_columns]
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

    warnings: dict[tuple[str, str], int] = {}

    def flag(mask: pd.Series, fname: str, code: str, detail: str, spec: FieldSpec | None = None) -> None:
        original = frame[spec.source_column] if spec is not None and spec.source_column in frame else None
        policy = shown_as(spec) if spec is not None else "full"
        for position in np.flatnonzero(mask.to_numpy(dtype=bool, na_value=False)):
            value = None if original is None else mask_value(original.iloc[position], policy)
            problems.setdefault(int(position), []).append(FieldProblem(fname, code, detail, value))

    keys = source_keys(frame, entity.key)
    flag(keys.isna(), ",".join(entity.key), "missing_key", "the source key is empty")

    out: dict[str, Any] = {"_row": row_numbers.astype(np.int64), "_key": keys.astype(object)}
    for spec in entity.fields.values():
        values = _field_values(spec, frame)
        refused = np.zeros(len(frame), dtype=bool)  # rows a transform rejected: no further checks pile up
        for step in spec.transforms:
            try:
                result = transforms.apply_checked(values, step.name, step.argument,
                                                  {c: frame[c] for c in step.columns if c in frame})
            except Exception as error:  # a transform bug must name where it sits, never the data
                raise CrmbridgeError(f"entity `{entity.name}`: transform failed at {step.path} "
                                     f"({type(error).__name__})") from None
            values = result.values
            for rejection in result.rejections:
                hit = rejection.invalid.to_numpy(dtype=bool, na_value=False) & ~refused
                if not hit.any():
                    continue
                if rejection.severity == "warn":
                    where = (spec.name, rejection.code)
                    warnings[where] = warnings.get(where, 0) + int(hit.sum())
                    continue
                flag(pd.Series(hit), spec.name, rejection.code, rejection.detail, spec)
                refused |= hit
                values = values.astype(object).where(~hit, None)
        values = _blank_to_missing(values)
        if spec.ref:
            values = values.map(key_text, na_action=None).astype(object)
        else:
            values, invalid = cast(values, spec.type, mapping.timezone_for(entity, spec.source_column or ""))
            flag(invalid, spec.name, "invalid_type", f"expected {_describe_type(spec.type)}", spec)
        if spec.required:
            flag(values.isna() & ~refused, spec.name, "required_missing", "a value is required", spec)
        if spec.pattern and spec.type == "string":
            text = values.astype(object)
            matches = text.map(lambda v, p=re.compile(spec.pattern): bool(p.fullmatch(v)) if isinstance(v, str)
                               else True)
            flag(~matches.astype(bool), spec.name, "pattern_mismatch", f"expected to match {spec.pattern}", spec)
        if spec.max_length and spec.type == "string":
            lengths = values.astype(object).map(lambda v: len(v) if isinstance(v, str) else 0)
            flag(lengths > spec.max_length, spec.name, "too_long", f"expected at most {spec.max_length} characters",
                 spec)
        out[spec.name] = values

    rules.apply_batch_rules(entity, {n: out[n] for n in entity.fields}, len(frame),
                            lambda hit, spec, code, detail: flag(pd.Series(hit), spec.name, code, detail, spec),
                            warnings)
    result = pd.DataFrame(out)
    bad = sorted(problems)
    quarantined = {int(row_numbers[p]): problems[p] for p in bad}
    bad_keys = {int(row_numbers[p]): keys.iloc[p] for p in bad}
    if bad:
        result = result.drop(index=bad).reset_index(drop=True)
    result.insert(2, "_ext", external_ids(entity.source, entity.name, result["_key"].tolist()))
    return CleansedBatch(result, quarantined, bad_keys, warnings)


def shown_as(spec: FieldSpec) -> str:
    """How a quarantined value of this field is kept: its `mask`, and fully hidden when the field is protected
    (encrypted, hashed, dropped) without a mask of its own."""
    if spec.mask != "none":
        return spec.mask
    return "full" if getattr(spec, "protect", "none") != "none" else "none"


def _field_values(spec: FieldSpec, frame: pd.DataFrame) -> pd.Series:
    if spec.source_column is not None:
        return frame[spec.source_column]
    return pd.Series([spec.constant] * len(frame), dtype=object)


# Every character `str.strip()` removes (they all lie below U+3001), for matching blanks in bulk.
_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE) + "]*$"  # RE2 (Arrow) syntax


def _blank_to_missing(values: pd.Series) -> pd.Series:
    """Empty or whitespace-only text means 'no value' everywhere after cleansing."""
    if isinstance(values.dtype, pd.StringDtype) and values.dtype.storage == "pyarrow":
        blank = pc.match_substring_regex(pa.array(values, from_pandas=True), _BLANK)
        blank = blank.fill_null(False).to_numpy(zero_copy_only=False)
        if blank.any():
            values = values.astype(object).where(~blank, None)
    elif values.dtype == object:
        blank = np.array([isinstance(v, str) and not v.strip() for v in values.tolist()], dtype=bool)
        if blank.any():
            values = values.astype(object).where(~blank, None)
    elif pd.api.types.is_string_dtype(values.dtype):
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
        if isinstance(values.dtype, pd.StringDtype):  # already text: `_as_text` would return each value as is
            return values.astype(pd.StringDtype("pyarrow")), pd.Series(False, index=values.index)
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
        if values.dtype == object and not values.hasnans:  # e.g. a database column: skip `map`'s machinery
            decimals = pd.Series([_as_decimal_text(v) for v in values.tolist()], index=values.index, dtype=object)
        else:
            decimals = values.map(_as_decimal_text, na_action="ignore")
        return decimals.astype(object), present & decimals.isna()
    if kind == "boolean":
        flags = values.map(_as_bool, na_action="ignore").astype(object)
        return flags.astype("boolean"), present & flags.isna()
    if kind == "date":
        dates = _plain_dates(values)
        if dates is not None:
            return dates, pd.Series(False, index=values.index)
        parsed = pd.to_datetime(values.astype(object).map(_strip_or_keep, na_action="ignore"),
                                errors="coerce", format="mixed")
        text = parsed.dt.strftime("%Y-%m-%d").astype(object)
        return text.where(parsed.notna(), None), present & parsed.isna()
    if kind == "timestamp":
        stamps, invalid = _cast_timestamp(values, timezone, present)
        return stamps, invalid & present  # a missing value (None, NaN, NaT) is never an invalid one
    raise ValueError(kind)


# ISO 8601 texts that `pd.Timestamp` and `pd.to_datetime(format="ISO8601")` read alike: date, optional time
# to the microsecond, then (aware) a `Z` or a full `+hh:mm` / `+hhmm` offset, or (naive) nothing.
_BULK_YEARS = (1678, 2261)  # well inside what every pandas time unit represents, zone shifts included
_ISO_NAIVE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)?")
_ISO_AWARE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})")


def _cast_timestamp(values: pd.Series, timezone: str | None, present: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Each value is naive (interpreted in the declared zone) or carries its own offset; the result is UTC.

    Vectorised for the common kinds of value (ISO texts, `datetime` objects, datetime64 columns), grouped
    into naive and aware; every other value goes through `_cast_timestamp_each`, the one-by-one reference.
    A naive time that the declared zone skips or repeats (a DST change) is invalid, as is anything unreadable.
    """
    del present
    index = values.index
    if _is_datetime64(values.dtype):
        return _cast_datetime64(values, lambda: _stripped(values).tolist(), index, timezone)
    stripped = _stripped(values)
    if _is_datetime64(stripped.dtype):  # pandas read the column as datetimes (None became NaT)
        return _cast_datetime64(stripped, stripped.tolist, index, timezone)
    raw = stripped.tolist()
    micros = np.full(len(values), np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    invalid = np.zeros(len(values), dtype=bool)
    groups: dict[str, list[int]] = {"naive_text": [], "aware_text": [], "naive": [], "aware": [], "other": []}
    for position, value in enumerate(raw):
        kind = type(value)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if kind is str:
            year = int(value[:4]) if value[:4].isdigit() else 0
            group = ("other" if not _BULK_YEARS[0] <= year <= _BULK_YEARS[1]
                     else "naive_text" if _ISO_NAIVE.fullmatch(value)
                     else "aware_text" if _ISO_AWARE.fullmatch(value) else "other")
        elif ((kind is dt.datetime or (kind is pd.Timestamp and not value.nanosecond))
              and _BULK_YEARS[0] <= value.year <= _BULK_YEARS[1] and not value.fold):
            group = "naive" if value.tzinfo is None else "aware"
        else:
            group = "other"
        groups[group].append(position)
    if timezone is None:  # naive values cannot be placed in time: the reference fails on them
        groups["other"] += groups.pop("naive_text") + groups.pop("naive")
    for group, positions in groups.items():
        if not positions or group == "other":
            continue
        aware = group.startswith("aware")
        try:
            stamps = pd.DatetimeIndex(pd.to_datetime([raw[p] for p in positions], errors="coerce", utc=aware,
                                                     format="ISO8601" if group.endswith("text") else None))
            unread = stamps.isna()
            if unread.any():  # e.g. 2024-02-30: let the reference judge it
                groups["other"] += [p for p, bad in zip(positions, unread, strict=True) if bad]
            positions, stamps = np.asarray(positions, dtype=np.int64)[~unread], stamps[~unread]
            if aware:
                found = stamps.tz_convert("UTC").as_unit("us").asi8
                micros[positions] = found
            else:
                _localize(stamps, positions, timezone, micros, invalid)
        except Exception:  # e.g. near the ends of the representable range: the reference decides
            micros[positions], invalid[positions] = np.iinfo(np.int64).min, False
            groups["other"] += [int(p) for p in positions]
    others = sorted(groups["other"])
    if others:
        each, each_invalid = _cast_timestamp_each([raw[p] for p in others], index[others], timezone)
        micros[others] = each.array.as_unit("us").asi8
        invalid[others] = each_invalid.to_numpy()
    return _timestamp_result(micros, index), pd.Series(invalid, index=index)


def _is_datetime64(dtype: Any) -> bool:
    return isinstance(dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(dtype)


def _cast_datetime64(values: pd.Series, raw: Any, index: pd.Index,
                     timezone: str | None) -> tuple[pd.Series, pd.Series]:
    """`_cast_timestamp` of a datetime64 column; `raw()` gives its stripped values for the reference."""
    stamps = pd.DatetimeIndex(values)
    missing = stamps.isna()
    years = stamps.year[~missing]
    if len(years) and not (_BULK_YEARS[0] <= years.min() and years.max() <= _BULK_YEARS[1]):
        return _cast_timestamp_each(raw(), index, timezone)
    if (stamps.as_unit("ns").asi8[~missing] % 1000).any():  # finer than the result's microseconds
        return _cast_timestamp_each(raw(), index, timezone)
    micros = np.full(len(values), np.iinfo(np.int64).min, dtype=np.int64)
    invalid = missing.copy()  # the reference reads a NaT object as unreadable, not as missing
    try:
        if stamps.tz is None:
            naive = np.flatnonzero(~missing)
            if len(naive):
                if timezone is None:  # cannot be placed in time: as the reference does, fail
                    raise ValueError("naive timestamps without a time zone")
                _localize(stamps[naive], naive, timezone, micros, invalid)
        else:
            micros[:] = stamps.tz_convert("UTC").as_unit("us").asi8
    except Exception:  # e.g. near the ends of the representable range: the reference decides
        return _cast_timestamp_each(raw(), index, timezone)
    return _timestamp_result(micros, index), pd.Series(invalid, index=index)


def _localize(stamps: pd.DatetimeIndex, positions: np.ndarray, timezone: str | None, micros: np.ndarray,
              invalid: np.ndarray) -> None:
    """Place naive wall-clock times in `timezone`; the times a DST change skips or repeats are invalid."""
    local = stamps.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    bad = local.isna()
    found = local[~bad].tz_convert("UTC").as_unit("us").asi8  # may raise: then nothing is set
    invalid[positions[bad]] = True
    micros[positions[~bad]] = found


def _timestamp_result(micros: np.ndarray, index: pd.Index) -> pd.Series:
    utc = pd.DatetimeIndex(micros.view("datetime64[us]")).tz_localize("UTC")
    return pd.Series(utc, index=index, dtype="datetime64[us, UTC]")


def _stripped(values: pd.Series) -> pd.Series:
    # Computed on the whole column: how `map` infers the result's type (a pd.NA may come back as NaN, a None
    # among datetimes as NaT) depends on all the values.
    return values.astype(object).map(_strip_or_keep, na_action="ignore")


def _cast_timestamp_each(raw: list[Any], index: pd.Index, timezone: str | None) -> tuple[pd.Series, pd.Series]:
    """The one-by-one reference of `_cast_timestamp` over stripped values, for what the bulk paths skip."""
    parsed = pd.Series(pd.NaT, index=index, dtype="datetime64[us, UTC]")
    invalid = pd.Series(False, index=index)
    for position, value in zip(index, raw, strict=True):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError):
            invalid[position] = True
            continue
        if stamp is pd.NaT:
            invalid[position] = value is not pd.NaT  # NaT itself is a missing value, not a bad one
            continue
        if stamp.tzinfo is None:
            try:
                stamp = stamp.tz_localize(timezone, nonexistent="raise", ambiguous="raise")
            except Exception:  # a wall-clock time skipped or repeated by a DST change
                invalid[position] = True
                continue
        parsed[position] = stamp.tz_convert("UTC").floor("us")  # targets keep microseconds at most
    return parsed, invalid


def _plain_dates(values: pd.Series) -> pd.Series | None:
    """The `date` cast of a column holding only `datetime.date` values (a database DATE column), or None.

    Such values need no parsing: their ISO text is what the general path produces for years 1000-9999
    (outside them it formats years differently or refuses them, so those columns take that path).
    """
    if values.dtype != object:
        return None
    items = values.tolist()
    if not all((type(v) is dt.date and 1000 <= v.year <= 9999) or v is None for v in items):
        return None
    return pd.Series([None if v is None else v.isoformat() for v in items], index=values.index, dtype=object)


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
        if type(value) is Decimal:
            number = value  # Decimal(str(d)) is d, exponent and sign included
        else:
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
