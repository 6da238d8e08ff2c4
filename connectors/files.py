"""File sources: CSV (any encoding, incl. GB18030 and UTF-8 with BOM), Excel .xlsx, JSON Lines, Parquet.

Every reader streams in batches and reports each source row by its position in the file (the physical
line for text files, the sheet row for Excel), so quarantine and errors can point at it.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.connectors.base import ColumnInfo, Connector, Rejected, SourceBatch
from crmbridge.errors import SchemaDriftError, SourceError
from crmbridge.mappings.model import Entity
from crmbridge.values import column_from_values

_GB_FAMILY = {"gb18030", "gbk", "gb2312", "cp936"}
_SNIFF_BYTES = 1 << 16


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


def check_encoding(path: Path, encoding: str, source: str) -> None:
    """Fail early, with a hint, when the start of the file plainly is not in the declared encoding."""
    with path.open("rb") as handle:
        sample = handle.read(_SNIFF_BYTES)
    cut = _complete_lines(sample)
    if encoding in _GB_FAMILY and _is_utf8_text(cut):
        raise SourceError(f"{path}: declared encoding {encoding} for source `{source}`, but the file is UTF-8 "
                          "(it decodes as UTF-8 with multi-byte characters): set `encoding: utf-8`")
    try:
        cut.decode(encoding)
    except UnicodeDecodeError as error:
        raise decode_error(path, encoding, source, sample, error) from None


def _complete_lines(sample: bytes) -> bytes:
    """The sample up to its last newline, so a multi-byte character cut at the end is not an error."""
    end = sample.rfind(b"\n")
    return sample[: end + 1] if end >= 0 and len(sample) == _SNIFF_BYTES else sample


def _is_utf8_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return any(ord(ch) > 127 for ch in text)


def _guess(data: bytes) -> str | None:
    for candidate in ("utf-8", "gb18030"):
        try:
            data.decode(candidate)
            return candidate
        except UnicodeDecodeError:
            continue
    return None


def decode_error(path: Path, encoding: str, source: str, data: bytes, error: UnicodeDecodeError) -> SourceError:
    """A message naming line, column and the offending bytes (not the text around them)."""
    offset = error.start
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    bad = " ".join(f"0x{b:02X}" for b in data[error.start:min(error.end, error.start + 4)])
    guess = _guess(data[: _SNIFF_BYTES])
    hint = f"; the file looks like {guess.upper()}: set `encoding: {guess}`" if guess and guess != encoding else ""
    return SourceError(f"{path}:{line}:{column}: cannot decode bytes {bad} as {encoding} "
                       f"(source `{source}`){hint}")


def locate_decode_error(path: Path, encoding: str, source: str) -> SourceError:
    """Find the first undecodable line in the whole file (slow path, only after a failure)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line_no = 0
    with path.open("rb") as handle:
        for raw_line in handle:
            line_no += 1
            try:
                decoder.decode(raw_line)
            except UnicodeDecodeError as error:
                column = error.start + 1
                bad = " ".join(f"0x{b:02X}" for b in raw_line[error.start:error.start + 4])
                guess = _guess(raw_line)
                hint = (f"; the line looks like {guess.upper()}: set `encoding: {guess}`"
                        if guess and guess != encoding else "")
                return SourceError(f"{path}:{line_no}:{column}: cannot decode bytes {bad} as {encoding} "
                                   f"(source `{source}`){hint}")
    return SourceError(f"{path}: cannot decode the file as {encoding} (source `{source}`)")


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
        self.encoding = codec_name(options.get("encoding", "utf-8"))
        self.delimiter = options.get("delimiter", ",")
        self.quotechar = options.get("quotechar", '"')
        self.header = options.get("header", True)
        self.skip_rows = options.get("skip_rows", 0)
        self.null_values = set(options.get("null_values", [""]))
        check_encoding(self.path, self.encoding.replace("-sig", ""), self.name)

    def _open(self):
        return self.path.open("r", encoding=self.encoding, errors="strict", newline="")

    def _reader(self, handle):
        return csv.reader(handle, delimiter=self.delimiter, quotechar=self.quotechar, strict=True)

    def _header(self) -> tuple[list[str], int]:
        """Column names and the number of the header's line (0 without a header)."""
        with self._open() as handle:
            reader = self._reader(handle)
            try:
                for _ in range(self.skip_rows):
                    next(reader)
                first = next(reader)
            except StopIteration:
                raise SourceError(f"{self.path}: the file is empty (source `{self.name}`)") from None
            except UnicodeDecodeError:
                raise locate_decode_error(self.path, self.encoding, self.name) from None
            except csv.Error as error:
                raise SourceError(f"{self.path}:{reader.line_num}: cannot read the header ({error})") from None
            if not self.header:
                return [f"column_{i + 1}" for i in range(len(first))], 0
            names = [name.strip() for name in first]
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if duplicated:
                raise SourceError(f"{self.path}:{reader.line_num}: duplicate column name(s) in the header: "
                                  f"{', '.join(duplicated)}")
            return names, reader.line_num

    def columns(self) -> list[ColumnInfo]:
        names, _ = self._header()
        return [ColumnInfo(name, "string", "text") for name in names]

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        names, _ = self._header()
        index = _column_index(names, columns, self.path)
        width = len(names)
        values: list[list[Any]] = [[] for _ in columns]
        numbers: list[int] = []
        rejected: list[Rejected] = []
        with self._open() as handle:
            lines = _Lines(handle, self.path, self.encoding, self.name)
            for _ in range(self.skip_rows + (1 if self.header else 0)):
                lines.skip_record(self._reader)
            for line, record, problem in _records(lines, self._reader, width):
                if problem:
                    rejected.append(Rejected(line, "malformed_row", problem))
                elif record:
                    for out, i in zip(values, index, strict=True):
                        cell = record[i]
                        out.append(None if cell in self.null_values else cell)
                    numbers.append(line)
                if len(numbers) + len(rejected) >= batch_size:
                    yield _text_batch(columns, values, numbers, rejected)
                    values, numbers, rejected = [[] for _ in columns], [], []
        if numbers or rejected:
            yield _text_batch(columns, values, numbers, rejected)

    def close(self) -> None:
        pass


class _Lines:
    """Physical lines of a text file, numbered, with the lines of the current record kept so a broken
    record can be given back and re-read from its second line."""

    def __init__(self, handle, path: Path, encoding: str, source: str):
        self._handle, self._path, self._encoding, self._source = handle, path, encoding, source
        self._pending: list[tuple[int, str]] = []
        self.number = 0  # number of the last line handed out
        self.taken: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._pending:
            self.number, text = self._pending.pop(0)
        else:
            try:
                text = self._handle.readline()
            except UnicodeDecodeError:
                raise locate_decode_error(self._path, self._encoding, self._source) from None
            if not text:
                raise StopIteration
            self.number += 1
        self.taken.append((self.number, text))
        return text

    def give_back_all_but_first(self) -> None:
        self._pending = self.taken[1:] + self._pending
        self.taken = []

    def skip_record(self, make_reader) -> None:
        self.taken = []
        next(make_reader(self), None)
        self.taken = []


def _records(lines: _Lines, make_reader, width: int):
    """Yield (line number, fields, problem) per record. A record whose quoting is broken, or whose
    field count is wrong while it spans several lines (an unclosed quote swallowing the lines after
    it), is rejected as its first line only; the lines after it are parsed again."""
    reader = make_reader(lines)
    while True:
        lines.taken = []
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            first = lines.taken[0][0] if lines.taken else lines.number
            yield first, None, f"broken CSV quoting ({error})"
            lines.give_back_all_but_first()
            reader = make_reader(lines)
            continue
        if not lines.taken:
            return
        first = lines.taken[0][0]
        if not record:  # a blank line is not a row
            continue
        if len(record) != width:
            yield first, None, f"expected {width} fields, found {len(record)}"
            if len(lines.taken) > 1:
                lines.give_back_all_but_first()
                reader = make_reader(lines)
            continue
        yield first, record, None


def _column_index(names: list[str], columns: Sequence[str], path: Path) -> list[int]:
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaDriftError(f"{path}: column(s) {', '.join(missing)} not found; the file has: {', '.join(names)}")
    return [names.index(c) for c in columns]


def _text_batch(columns, values, numbers, rejected) -> SourceBatch:
    frame = pd.DataFrame({c: pd.Series(v, dtype=pd.StringDtype("pyarrow")) for c, v in zip(columns, values, strict=True)})
    return SourceBatch(frame, np.asarray(numbers, dtype=np.int64), rejected)


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
        self.skip_rows = options.get("skip_rows", 0)
        self.null_values = set(options.get("null_values", [""]))

    def _rows(self):
        from openpyxl import load_workbook
        from openpyxl.utils.exceptions import InvalidFileException

        try:
            book = load_workbook(self.path, read_only=True, data_only=True)
        except (InvalidFileException, OSError, KeyError, ValueError) as error:
            raise SourceError(f"{self.path}: not a readable .xlsx workbook ({type(error).__name__})") from None
        try:
            if isinstance(self.sheet, int):
                sheet = book.worksheets[self.sheet]
            else:
                sheet = book[self.sheet]
        except (IndexError, KeyError):
            book.close()
            raise SourceError(f"{self.path}: no sheet {self.sheet!r}; sheets: {', '.join(book.sheetnames)}") from None
        try:
            yield from enumerate(sheet.iter_rows(values_only=True), start=1)
        finally:
            book.close()

    def _header(self, rows) -> list[str]:
        for number, row in rows:
            if number <= self.skip_rows:
                continue
            return [str(c).strip() if c is not None else f"column_{i + 1}" for i, c in enumerate(row)]
        raise SourceError(f"{self.path}: the sheet is empty")

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
    frame = pd.DataFrame({c: column_from_values(v, c) for c, v in zip(columns, values, strict=True)})
    return SourceBatch(frame, np.asarray(numbers, dtype=np.int64), rejected or [])


# --- JSON Lines ----------------------------------------------------------------------------------------


class JsonLinesConnector(FileConnector):
    kind = "jsonl"

    def open_source(self, entity: Entity) -> JsonLinesSource:
        return JsonLinesSource(self, entity)


class JsonLinesSource:
    def __init__(self, connector: JsonLinesConnector, entity: Entity):
        self.name = connector.connection.name
        self.path = connector.check_exists()
        self.encoding = codec_name(connector.connection.options.get("encoding", "utf-8"))
        check_encoding(self.path, self.encoding.replace("-sig", ""), self.name)

    def columns(self) -> None:
        return None  # each line may carry different keys; missing keys read as NULL

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        values: list[list[Any]] = [[] for _ in columns]
        numbers: list[int] = []
        rejected: list[Rejected] = []
        with self.path.open("r", encoding=self.encoding, errors="strict") as handle:
            line_no = 0
            while True:
                try:
                    line = handle.readline()
                except UnicodeDecodeError:
                    raise locate_decode_error(self.path, self.encoding, self.name) from None
                if not line:
                    break
                line_no += 1
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    rejected.append(Rejected(line_no, "malformed_row", f"invalid JSON ({error.msg} at column "
                                                                       f"{error.colno})"))
                else:
                    if isinstance(record, dict):
                        for out, column in zip(values, columns, strict=True):
                            out.append(record.get(column))
                        numbers.append(line_no)
                    else:
                        rejected.append(Rejected(line_no, "malformed_row", "expected a JSON object per line"))
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


def _arrow_category(arrow_type) -> tuple[str, bool | None]:
    import pyarrow as pa

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
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string", None
    return "unknown", None


class ParquetSource:
    def __init__(self, connector: ParquetConnector, entity: Entity):
        import pyarrow.parquet as pq

        self.path = connector.check_exists()
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise SourceError(f"{self.path}: not a readable Parquet file ({type(error).__name__})") from None

    def columns(self) -> list[ColumnInfo]:
        infos = []
        for field in self.file.schema_arrow:
            kind, aware = _arrow_category(field.type)
            infos.append(ColumnInfo(field.name, kind, str(field.type), aware))
        return infos

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        _column_index(self.file.schema_arrow.names, columns, self.path)
        position = 0
        for record_batch in self.file.iter_batches(batch_size=batch_size, columns=list(columns)):
            frame = pd.DataFrame({
                c: column_from_values(record_batch.column(c).to_pylist(), c) for c in columns
            })
            numbers = np.arange(position + 1, position + len(frame) + 1)
            position += len(frame)
            yield SourceBatch(frame, numbers)

    def close(self) -> None:
        self.file.close()
