"""File sources: CSV (any encoding, incl. GB18030 and UTF-8 with BOM), Excel .xlsx, JSON Lines, Parquet.

Every reader streams in batches and reports each source row by its position in the file (the physical
line for text files, the sheet row for Excel, the row's position for Parquet), so quarantine and errors
can point at it. Error messages name the file, the line and the column, never a value.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crmbridge.connectors.base import ColumnInfo, Connector, Rejected, SourceBatch
from crmbridge.errors import SchemaDriftError, SourceError
from crmbridge.mappings.model import Entity
from crmbridge.values import column_from_values

_SNIFF_BYTES = 1 << 16
_UTF8 = {"utf-8", "utf-8-sig"}
_STRING = pd.StringDtype("pyarrow")


class FileConnector(Connector):
    suffixes: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        raw = self.connection.options.get("path")
        if not raw:
            raise SourceError(f"source `{self.connection.name}` needs a `path`")
        path = Path(raw)
        return path if path.is_absolute() else self.base_dir / path

    def describe(self) -> str:
        return str(self.path)

    def check_exists(self) -> Path:
        path = self.path
        if not path.is_file():
            raise SourceError(f"source `{self.connection.name}`: file not found: {path}")
        return path


# --- text decoding -------------------------------------------------------------------------------------


def codec_name(encoding: str) -> str:
    """Normalise an encoding name; plain UTF-8 also accepts a byte-order mark (common in Excel exports)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise SourceError(f"unknown encoding `{encoding}`") from None
    return "utf-8-sig" if name == "utf-8" else name


def _decodes(data: bytes, encoding: str, final: bool = True) -> bool:
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final)
    except UnicodeDecodeError:
        return False
    return True


def _looks_chinese(data: bytes) -> bool:
    """Whether undecodable text reads as GB18030 Chinese rather than a Western single-byte encoding.

    Common Chinese characters (the GB2312 block) have both bytes at 0xA1 or above; Western accented
    letters read as GB18030 pair with the ASCII letter after them (second byte below 0x80)."""
    high = low = 0
    i, end = 0, len(data)
    while i < end:
        byte = data[i]
        if byte < 0x81 or byte == 0xFF or i + 1 >= end:
            i += 1
            continue
        second = data[i + 1]
        if 0x30 <= second <= 0x39:  # a four-byte GB18030 sequence
            high += 1
            i += 4
        elif second >= 0x80:
            high += 1
            i += 2
        else:
            low += 1
            i += 2
    return high > low


def _guess(data: bytes, final: bool) -> tuple[str, str] | None:
    """(encoding, description) the bytes most likely are in, or None."""
    if not data:
        return None
    if _decodes(data, "utf-8", final):
        return "utf-8", "UTF-8"
    if _decodes(data, "gb18030", final) and _looks_chinese(data):
        return "gb18030", "GB18030 (Chinese; GBK and GB2312 are subsets)"
    if _decodes(data, "cp1252", final):
        return "cp1252", "Windows-1252 (Western European)"
    return "latin-1", "Latin-1 (Western European)"


@dataclass(frozen=True)
class _CsvLayout:
    """What is needed to tell which CSV column a position in the file falls in."""

    delimiter: str
    quotechar: str
    skip_rows: int
    header: bool


class _FieldTracker:
    """Follows CSV text piece by piece and knows which field of its record the end of the text is in.

    Quote parity decides inside/outside a quoted field, which is exact for well-formed CSV (a doubled
    quote flips twice)."""

    def __init__(self, layout: _CsvLayout):
        self.delimiter, self.quotechar = layout.delimiter, layout.quotechar
        self.in_quotes = False
        self.field = 0

    def feed(self, text: str) -> None:
        for i, part in enumerate(text.split(self.quotechar)):
            if i:
                self.in_quotes = not self.in_quotes
            if self.in_quotes:
                continue
            end = max(part.rfind("\n"), part.rfind("\r"))
            if end >= 0:
                self.field = part.count(self.delimiter, end + 1)
            else:
                self.field += part.count(self.delimiter)


def _encoding_error(path: Path, declared: str, encoding: str, source: str,
                    layout: _CsvLayout | None = None) -> SourceError:
    """Scan the file line by line for the first byte that does not decode, and describe where it is (never
    the bytes themselves: they are part of a value). The slow path, only taken after a failure."""
    base = "utf-8" if encoding == "utf-8-sig" else encoding
    decoder = codecs.getincrementaldecoder(base)()
    tracker = _FieldTracker(layout) if layout else None
    names: list[str] | None = None
    header_line = None
    line_no = 0
    with path.open("rb") as handle:
        for raw in handle:
            line_no += 1
            data = raw[3:] if line_no == 1 and base == "utf-8" and raw.startswith(codecs.BOM_UTF8) else raw
            try:
                text = decoder.decode(data)
            except UnicodeDecodeError as error:
                prefix = data[: error.start].decode(base, errors="replace")
                where = ""
                if tracker is not None and layout is not None and line_no > layout.skip_rows:
                    tracker.feed(prefix)
                    if layout.header and header_line is None:
                        where = f", the header, field {tracker.field + 1}"
                    elif names is not None and tracker.field < len(names):
                        where = f", column `{names[tracker.field].strip()}`"
                    else:
                        where = f", field {tracker.field + 1}"
                handle.seek(handle.tell() - len(raw))
                hint = _hint(handle.read(_SNIFF_BYTES), base)
                return SourceError(f"{path}:{line_no}:{len(prefix) + 1}: cannot decode the text as "
                                   f"{declared} (source `{source}`{where}){hint}")
            if tracker is None or layout is None or line_no <= layout.skip_rows:
                continue
            if layout.header and header_line is None:
                if not text.strip():
                    continue
                header_line = line_no
                names = next(csv.reader([text], delimiter=layout.delimiter, quotechar=layout.quotechar), [])
            tracker.feed(text)
        try:
            decoder.decode(b"", True)
        except UnicodeDecodeError:
            return SourceError(f"{path}:{line_no}: the file ends inside a multi-byte character: it is not "
                               f"{declared} (source `{source}`), or it was cut off")
    return SourceError(f"{path}: cannot decode the file as {declared} (source `{source}`)")


def _hint(window: bytes, encoding: str) -> str:
    cut = window.rfind(b"\n")
    final = len(window) < _SNIFF_BYTES
    if not final and cut > 0:
        window, final = window[: cut + 1], True
    guess = _guess(window, final)
    if guess is None or guess[0] == codec_name(encoding).replace("-sig", ""):
        return ""
    name, description = guess
    return f"; the file looks like {description}: set `encoding: {name}`"


def check_encoding(path: Path, declared: str, encoding: str, source: str,
                   layout: _CsvLayout | None = None) -> None:
    """Fail early, with a hint, when the start of the file plainly is not in the declared encoding."""
    with path.open("rb") as handle:
        sample = handle.read(_SNIFF_BYTES)
    final = len(sample) < _SNIFF_BYTES
    if encoding not in _UTF8 and _decodes(sample, "utf-8", final) and not sample.isascii():
        offset = next(i for i, b in enumerate(sample) if b >= 0x80)
        line = sample.count(b"\n", 0, offset) + 1
        column = len(sample[sample.rfind(b"\n", 0, offset) + 1: offset].decode("utf-8")) + 1
        raise SourceError(f"{path}:{line}:{column}: declared encoding {declared} for source `{source}`, but "
                          "the file is UTF-8 (it decodes as UTF-8 with multi-byte characters): "
                          "set `encoding: utf-8`")
    if not _decodes(sample, encoding, final):
        raise _encoding_error(path, declared, encoding, source, layout)


# --- CSV -----------------------------------------------------------------------------------------------


class CsvConnector(FileConnector):
    kind = "csv"

    def open_source(self, entity: Entity) -> CsvSource:
        return CsvSource(self, entity)


class CsvSource:
    def __init__(self, connector: CsvConnector, entity: Entity):
        options = connector.connection.options
        self.connector, self.entity = connector, entity
        self.name = connector.connection.name
        self.path = connector.check_exists()
        self.declared = str(options.get("encoding", "utf-8"))
        self.encoding = codec_name(self.declared)
        self.delimiter = options.get("delimiter", ",")
        self.quotechar = options.get("quotechar", '"')
        self.header = bool(options.get("header", True))
        self.skip_rows = int(options.get("skip_rows", 0))
        self.null_values = [str(v) for v in options.get("null_values", [""])]
        for option, value in (("delimiter", self.delimiter), ("quotechar", self.quotechar)):
            if not isinstance(value, str) or len(value) != 1 or value in "\r\n":
                raise SourceError(f"source `{self.name}`: `{option}` must be one character, not a newline")
        if self.delimiter == self.quotechar:
            raise SourceError(f"source `{self.name}`: `delimiter` and `quotechar` must differ")
        self.layout = _CsvLayout(self.delimiter, self.quotechar, self.skip_rows, self.header)
        check_encoding(self.path, self.declared, self.encoding, self.name, self.layout)

    def _open(self):
        return self.path.open("r", encoding=self.encoding, errors="strict", newline="")

    def _reader(self, lines):
        return csv.reader(lines, delimiter=self.delimiter, quotechar=self.quotechar, strict=True)

    def _decode_failure(self) -> SourceError:
        return _encoding_error(self.path, self.declared, self.encoding, self.name, self.layout)

    def _header(self) -> tuple[list[str], int]:
        """Column names and the number of physical lines before the first data line."""
        with self._open() as handle:
            lines = _Lines(handle, self._decode_failure)
            lines.skip(self.skip_rows)
            for line, record, problem in _records(lines, self._reader, None):
                if problem:
                    what = "header" if self.header else "first row"
                    raise SourceError(f"{self.path}:{line}: cannot read the {what} ({problem}) "
                                      f"(source `{self.name}`)")
                if not self.header:
                    return [f"column_{i + 1}" for i in range(len(record))], line - 1
                names = [name.strip() or f"column_{i + 1}" for i, name in enumerate(record)]
                duplicated = _duplicates(names)
                if duplicated:
                    raise SourceError(f"{self.path}:{line}: duplicate column name(s) in the header: "
                                      f"{', '.join(duplicated)} (source `{self.name}`)")
                return names, lines.number
        raise SourceError(f"{self.path}: the file is empty (source `{self.name}`)")

    def columns(self) -> list[ColumnInfo]:
        """The header's names. Text cells carry no type, so a declared type is checked per value later
        (cleansing casts and quarantines), never against the file."""
        names, _ = self._header()
        return [ColumnInfo(name, "unknown", "text") for name in names]

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        names, before_data = self._header()
        index = _column_index(names, columns, self.path)
        width = len(names)
        records: list[list[str]] = []
        numbers: list[int] = []
        rejected: list[Rejected] = []
        with self._open() as handle:
            lines = _Lines(handle, self._decode_failure)
            lines.skip(before_data)
            for line, record, problem in _records(lines, self._reader, width):
                if problem:
                    rejected.append(Rejected(line, "malformed_row", problem))
                else:
                    records.append(record)
                    numbers.append(line)
                if len(numbers) + len(rejected) >= batch_size:
                    yield self._batch(columns, index, records, numbers, rejected)
                    records, numbers, rejected = [], [], []
        if numbers or rejected:
            yield self._batch(columns, index, records, numbers, rejected)

    def _batch(self, columns, index, records, numbers, rejected) -> SourceBatch:
        nulls = pa.array(self.null_values, pa.string()) if self.null_values else None
        frame = {}
        for column, i in zip(columns, index, strict=True):
            array = pa.array(list(map(itemgetter(i), records)), pa.string())
            if nulls is not None and len(array):
                array = pc.if_else(pc.is_in(array, value_set=nulls), pa.scalar(None, pa.string()), array)
            frame[column] = array.to_pandas(types_mapper={pa.string(): _STRING}.get)
        return SourceBatch(pd.DataFrame(frame, columns=list(columns)), np.asarray(numbers, dtype=np.int64),
                           rejected)

    def close(self) -> None:
        pass


class _Lines:
    """Physical lines of a text file, numbered. The lines of the record being parsed are kept, so a
    broken record can give back its lines after the first to be parsed again as records of their own."""

    def __init__(self, handle, on_decode_error: Callable[[], SourceError]):
        self._readline = handle.readline
        self._on_decode_error = on_decode_error
        self._pending: deque[str] = deque()
        self.number = 0  # number of the last line handed out
        self.start = 1  # number of the first line of the current record
        self.taken: list[str] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._pending:
            text = self._pending.popleft()
        else:
            try:
                text = self._readline()
            except UnicodeDecodeError:
                raise self._on_decode_error() from None
            if not text:
                raise StopIteration
        self.number += 1
        self.taken.append(text)
        return text

    def begin_record(self) -> None:
        self.start = self.number + 1
        self.taken.clear()

    def give_back_all_but_first(self) -> None:
        self._pending.extendleft(reversed(self.taken[1:]))
        self.number = self.start
        self.taken.clear()

    def skip(self, count: int) -> None:
        for _ in range(count):
            if next(self, None) is None:
                break
        self.taken.clear()


def _records(lines: _Lines, make_reader, width: int | None):
    """Yield (first line number, fields, problem) per record, skipping blank lines.

    A record whose quoting is broken, or whose field count is wrong while it spans several lines (an
    unclosed quote swallowing the lines after it), is rejected as its first line only; the lines after it
    are parsed again as records of their own. Without `width` every field count is accepted."""
    reader = make_reader(lines)
    while True:
        lines.begin_record()
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if not lines.taken:
                return
            yield lines.start, None, f"broken CSV quoting ({_csv_problem(error)})"
            lines.give_back_all_but_first()
            reader = make_reader(lines)
            continue
        if not record:  # a blank line is not a row
            continue
        if width is not None and len(record) != width:
            yield lines.start, None, f"expected {width} fields, found {len(record)}"
            if len(lines.taken) > 1:
                lines.give_back_all_but_first()
                reader = make_reader(lines)
            continue
        yield lines.start, record, None


def _csv_problem(error: csv.Error) -> str:
    """The csv module's message names only the delimiter, quote and limits; keep it but guard against text."""
    message = str(error)
    if "field larger than field limit" in message:
        return f"a field is longer than {csv.field_size_limit()} characters, or a quote is never closed"
    if "unexpected end of data" in message:
        return "a quote is never closed"
    return message if len(message) <= 60 else "invalid quoting"


def _column_index(names: Sequence[str], columns: Sequence[str], path: Path) -> list[int]:
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaDriftError(f"{path}: column(s) {', '.join(missing)} not found; "
                               f"the file has: {', '.join(names)}")
    positions = {}
    for i, name in enumerate(names):
        positions.setdefault(name, i)
    return [positions[c] for c in columns]


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


# --- Excel ---------------------------------------------------------------------------------------------


class ExcelConnector(FileConnector):
    kind = "excel"

    def open_source(self, entity: Entity) -> ExcelSource:
        return ExcelSource(self, entity)


class ExcelSource:
    def __init__(self, connector: ExcelConnector, entity: Entity):
        options = connector.connection.options
        self.name = connector.connection.name
        self.path = connector.check_exists()
        self.sheet = options.get("sheet", 0)
        self.skip_rows = int(options.get("skip_rows", 0))
        self.null_values = set(options.get("null_values", [""]))

    def _rows(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(sheet row number, cell values) of every row after `skip_rows`, blank ones included."""
        from openpyxl import load_workbook

        try:
            book = load_workbook(self.path, read_only=True, data_only=True)
        except Exception as error:  # openpyxl and zipfile raise many types for a file that is not .xlsx
            raise SourceError(f"{self.path}: not a readable .xlsx workbook ({type(error).__name__}) "
                              f"(source `{self.name}`)") from None
        try:
            try:
                if isinstance(self.sheet, int) and not isinstance(self.sheet, bool):
                    sheet = book.worksheets[self.sheet]
                else:
                    sheet = book[str(self.sheet)]
            except (IndexError, KeyError):
                raise SourceError(f"{self.path}: no sheet {self.sheet!r}; the workbook has: "
                                  f"{', '.join(repr(name) for name in book.sheetnames)}") from None
            if not hasattr(sheet, "reset_dimensions"):
                raise SourceError(f"{self.path}: sheet {self.sheet!r} is a chart sheet, not a worksheet")
            sheet.reset_dimensions()  # a stored dimension can be wrong; read every row that is there
            rows = enumerate(sheet.iter_rows(values_only=True), start=1)
            number = 0
            while True:
                try:
                    number, row = next(rows)
                except StopIteration:
                    return
                except Exception as error:  # a damaged sheet part
                    raise SourceError(f"{self.path}: sheet {self.sheet!r} is damaged after row {number} "
                                      f"({type(error).__name__})") from None
                if number > self.skip_rows:
                    yield number, row
        finally:
            book.close()

    def _header(self, rows) -> list[str]:
        for number, row in rows:
            if all(cell is None or (isinstance(cell, str) and not cell.strip()) for cell in row):
                continue
            names = [str(c).strip() if c is not None and str(c).strip() else f"column_{i + 1}"
                     for i, c in enumerate(row)]
            duplicated = _duplicates(names)
            if duplicated:
                raise SourceError(f"{self.path}: duplicate column name(s) in the header (row {number}): "
                                  f"{', '.join(duplicated)}")
            return names
        raise SourceError(f"{self.path}: sheet {self.sheet!r} is empty (source `{self.name}`)")

    def columns(self) -> list[ColumnInfo]:
        rows = self._rows()
        try:
            return [ColumnInfo(name, "unknown", "cell") for name in self._header(rows)]
        finally:
            rows.close()

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        rows = self._rows()
        try:
            names = self._header(rows)
            index = _column_index(names, columns, self.path)
            values: list[list[Any]] = [[] for _ in columns]
            numbers: list[int] = []
            for number, row in rows:
                if all(cell is None for cell in row):
                    continue
                for out, i in zip(values, index, strict=True):
                    cell = row[i] if i < len(row) else None
                    out.append(None if isinstance(cell, str) and cell in self.null_values else cell)
                numbers.append(number)
                if len(numbers) >= batch_size:
                    yield _object_batch(columns, values, numbers)
                    values, numbers = [[] for _ in columns], []
            if numbers:
                yield _object_batch(columns, values, numbers)
        finally:
            rows.close()

    def close(self) -> None:
        pass


def _object_batch(columns, values, numbers, rejected=None) -> SourceBatch:
    frame = pd.DataFrame({c: column_from_values(v, c) for c, v in zip(columns, values, strict=True)},
                         columns=list(columns))
    return SourceBatch(frame, np.asarray(numbers, dtype=np.int64), rejected or [])


# --- JSON Lines ----------------------------------------------------------------------------------------


class JsonLinesConnector(FileConnector):
    kind = "jsonl"

    def open_source(self, entity: Entity) -> JsonLinesSource:
        return JsonLinesSource(self, entity)


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


class JsonLinesSource:
    def __init__(self, connector: JsonLinesConnector, entity: Entity):
        self.name = connector.connection.name
        self.path = connector.check_exists()
        self.declared = str(connector.connection.options.get("encoding", "utf-8"))
        self.encoding = codec_name(self.declared)
        check_encoding(self.path, self.declared, self.encoding, self.name)

    def columns(self) -> None:
        return None  # each line may carry different keys; missing keys read as NULL

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        values: list[list[Any]] = [[] for _ in columns]
        numbers: list[int] = []
        rejected: list[Rejected] = []
        with self.path.open("r", encoding=self.encoding, errors="strict", newline="\n") as handle:
            line_no = 0
            while True:
                try:
                    line = handle.readline()
                except UnicodeDecodeError:
                    raise _encoding_error(self.path, self.declared, self.encoding, self.name) from None
                if not line:
                    break
                line_no += 1
                if not line.strip():
                    continue
                problem = None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    problem = f"invalid JSON ({error.msg.split(':')[0]} at column {error.colno})"
                except (ValueError, RecursionError) as error:
                    problem = f"invalid JSON ({type(error).__name__})"
                else:
                    if isinstance(record, dict):
                        for out, column in zip(values, columns, strict=True):
                            out.append(record.get(column))
                        numbers.append(line_no)
                    else:
                        kind = _JSON_KINDS.get(type(record), "not an object")
                        problem = f"expected a JSON object per line, found {kind}"
                if problem:
                    rejected.append(Rejected(line_no, "malformed_row", problem))
                if len(numbers) + len(rejected) >= batch_size:
                    yield _object_batch(columns, values, numbers, rejected)
                    values, numbers, rejected = [[] for _ in columns], [], []
        if numbers or rejected:
            yield _object_batch(columns, values, numbers, rejected)

    def close(self) -> None:
        pass


# --- Parquet -------------------------------------------------------------------------------------------


class ParquetConnector(FileConnector):
    kind = "parquet"

    def open_source(self, entity: Entity) -> ParquetSource:
        return ParquetSource(self, entity)


def _is_text(arrow_type) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        pa.types.is_string_view(arrow_type))


def _arrow_category(arrow_type) -> tuple[str, bool | None]:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_boolean(arrow_type):
        return "boolean", None
    if pa.types.is_integer(arrow_type):
        return "integer", None
    if pa.types.is_floating(arrow_type):
        return "float", None
    if pa.types.is_decimal(arrow_type):
        return "decimal", None
    if pa.types.is_timestamp(arrow_type):
        return "timestamp", arrow_type.tz is not None
    if pa.types.is_date(arrow_type):
        return "date", None
    if _is_text(arrow_type):
        return "string", None
    return "unknown", None


def _arrow_column(array: pa.Array, name: str) -> pd.Series:
    """A pandas column typed as `column_from_values` types database values, without a Python round trip
    for integers, floats, booleans and strings."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    if _is_text(kind):
        text = array.cast(pa.string()).to_pandas(types_mapper={pa.string(): _STRING}.get)
        return pd.Series(text, name=name)
    if pa.types.is_signed_integer(kind) or (pa.types.is_unsigned_integer(kind) and kind.bit_width < 64):
        numbers = array.cast(pa.int64()).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        return pd.Series(numbers, name=name)
    if pa.types.is_boolean(kind):
        return pd.Series(array.to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get), name=name)
    if pa.types.is_floating(kind):
        return pd.Series(array.to_pandas(), name=name)
    return column_from_values(array.to_pylist(), name)


class ParquetSource:
    def __init__(self, connector: ParquetConnector, entity: Entity):
        import pyarrow.parquet as pq

        self.name = connector.connection.name
        self.path = connector.check_exists()
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise SourceError(f"{self.path}: not a readable Parquet file ({type(error).__name__}) "
                              f"(source `{self.name}`)") from None

    def columns(self) -> list[ColumnInfo]:
        infos = []
        for column in self.file.schema_arrow:
            kind, aware = _arrow_category(column.type)
            infos.append(ColumnInfo(column.name, kind, str(column.type), aware))
        return infos

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        names = self.file.schema_arrow.names
        _column_index(names, columns, self.path)
        duplicated = [c for c in _duplicates(names) if c in columns]
        if duplicated:
            raise SourceError(f"{self.path}: the file has more than one column named {', '.join(duplicated)}")
        wanted = list(dict.fromkeys(columns))
        batches = self.file.iter_batches(batch_size=batch_size, columns=wanted)
        position = 0
        while True:
            try:
                record_batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as error:
                raise SourceError(f"{self.path}: damaged Parquet data after row {position} "
                                  f"({type(error).__name__}) (source `{self.name}`)") from None
            converted = {c: _arrow_column(record_batch.column(c), c) for c in wanted}
            frame = pd.DataFrame({c: converted[c] for c in columns}, columns=list(columns))
            numbers = np.arange(position + 1, position + len(frame) + 1, dtype=np.int64)
            position += len(frame)
            yield SourceBatch(frame, numbers)

    def close(self) -> None:
        self.file.close()
