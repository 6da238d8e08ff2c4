"""Typed values: building columns from database rows, and canonical forms for comparing values across
systems (a target may hand back `'2024-01-02'`, `date(2024, 1, 2)` or a datetime for the same date)."""

from __future__ import annotations

import datetime as dt
import gc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, overload

import pandas as pd
import pyarrow as pa

_ARROW_TO_PANDAS = {
    pa.int8(): pd.Int64Dtype(), pa.int16(): pd.Int64Dtype(), pa.int32(): pd.Int64Dtype(),
    pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype(), pa.string(): pd.StringDtype("pyarrow"),
    pa.large_string(): pd.StringDtype("pyarrow"),
}


_KEPT_AS_OBJECTS = (Decimal, dt.date, dt.time, dt.timedelta)  # dt.datetime is a dt.date


def column_from_values(values: list[Any] | tuple[Any, ...], name: str) -> pd.Series:
    """A pandas column for values fetched from a database, keeping integers integral with NULLs.

    Mixed-type columns (SQLite is dynamically typed) stay as Python objects rather than failing.
    """
    first = next((v for v in values if v is not None), None)
    if isinstance(first, _KEPT_AS_OBJECTS):
        # Arrow would infer a decimal, date or time type, or fail on a mix: either way the column keeps the
        # Python objects, so skip the (slow, for decimals) inference.
        return pd.Series(list(values), dtype=object, name=name)
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pd.Series(values, dtype=object, name=name)
    mapped = _ARROW_TO_PANDAS.get(array.type)
    if mapped is not None:
        return pd.Series(array.to_pandas(types_mapper={array.type: mapped}.get), name=name)
    if pa.types.is_floating(array.type):
        return pd.Series(array.to_pandas(), name=name)
    if pa.types.is_null(array.type):
        return pd.Series([None] * len(values), dtype=object, name=name)
    return pd.Series(list(values), dtype=object, name=name)  # decimals, dates, bytes: keep Python objects


def is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def canonical(value: Any, kind: str) -> str | None:
    """A text form that is equal for equal values of a field type, whatever system produced them."""
    if is_missing(value):
        return None
    try:
        if kind == "integer":
            return str(int(Decimal(str(value))))
        if kind == "decimal":
            number = Decimal(str(value)).normalize()
            return format(number, "f")
        if kind == "float":
            return repr(round(float(value), 9))
        if kind == "boolean":
            if isinstance(value, str):
                return "true" if value.strip().lower() in ("1", "true", "t", "yes", "y") else "false"
            return "true" if bool(value) else "false"
        if kind == "date":
            if isinstance(value, dt.datetime):
                return value.date().isoformat()
            if isinstance(value, dt.date):
                return value.isoformat()
            if isinstance(value, pd.Timestamp):
                return value.date().isoformat()
            return str(value)[:10]
        if kind == "timestamp":
            return _utc_text(value)
    except (InvalidOperation, ValueError, TypeError):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# Per field type, the Python type whose equal values always have equal canonical forms (so the texts need
# not be built). Floats have none: -0.0 == 0.0, but their forms differ; decimal zeros keep their sign.
_PLAIN_TYPE = {"string": str, "integer": int, "decimal": Decimal, "boolean": bool, "date": dt.date,
               "timestamp": dt.datetime}


def same_value(a: Any, b: Any, kind: str) -> bool:
    """`canonical(a, kind) == canonical(b, kind)`, without building the texts for plainly equal values."""
    if a is None and b is None:
        return True
    plain = _PLAIN_TYPE.get(kind)
    if type(a) is plain and type(b) is plain and a == b and not (plain is Decimal and a.is_zero()):
        return True
    return canonical(a, kind) == canonical(b, kind)


def _utc_text(value: Any) -> str:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:  # targets without zones hold naive UTC, which we write
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ", timespec="microseconds")
    return str(value)


def key_text(value: Any) -> str | None:
    """Canonical text of one source key part: `5`, `5.0` and `'5'` are the same key."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return str(int(value))
    text = str(value).strip()
    return text or None


class RowBatch(Sequence[dict[str, Any]]):
    """Rows to write, held as equally long columns.

    To any target it is a sequence of `{column: value}` dicts, built on access; a target that knows it reads
    `columns` directly and saves building and taking apart one dict per row.
    """

    def __init__(self, columns: dict[str, list[Any]]):
        self.columns = columns
        self._length = len(next(iter(columns.values()))) if columns else 0

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> RowBatch: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | RowBatch:
        if isinstance(index, slice):
            return RowBatch({name: values[index] for name, values in self.columns.items()})
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return {name: values[index] for name, values in self.columns.items()}

    def __iter__(self):
        names = list(self.columns)
        for values in zip(*self.columns.values(), strict=True):
            yield dict(zip(names, values, strict=True))


@contextmanager
def bulk_work() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is processed.

    A batch allocates millions of short-lived containers (rows, columns) but no reference cycles, so
    reference counting frees them all; meanwhile the collector would walk every object the process holds,
    Prefect's included, again and again (about a tenth of the run time at a million rows).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
