"""File sources (CSV, Excel, JSON Lines, Parquet): encodings, options, malformed rows, batching, errors.

Every input file is written by the test itself into its own temporary directory.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crmbridge.connectors import connector_for
from crmbridge.connectors.base import SourceBatch
from crmbridge.errors import SchemaDriftError, SourceError
from crmbridge.mappings.model import Connection, Entity, Mapping

# --- helpers -------------------------------------------------------------------------------------------


def open_source(tmp_path: Path, kind: str, filename: str, **options):
    """A source of the given connector kind reading `filename` (relative to the mapping's directory)."""
    mapping = Mapping(path=tmp_path / "mapping.yaml", name="test", sha256="", sources={}, targets={},
                      entities=[])
    connection = Connection("legacy", kind, {"path": filename, **options})
    entity = Entity(name="people", index=0, source="legacy", table=None, query=None, key=("id",), columns={},
                    target="crm", target_table="person", external_id_column="ext_id",
                    target_key_column="ext_id", mode="upsert", create_table=True, fields={})
    return connector_for(connection, mapping).open_source(entity)


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> str:
    (tmp_path / name).write_bytes(text.encode(encoding))
    return name


def read_all(source, columns, batch_size: int = 1000) -> tuple[pd.DataFrame, list[int], list]:
    """Every batch joined: the rows, their numbers, and the rejected rows."""
    batches = list(source.read(columns, batch_size))
    frames = [b.frame for b in batches]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    numbers = [int(n) for b in batches for n in b.row_numbers]
    rejected = [r for b in batches for r in b.rejected]
    return frame, numbers, rejected


def rows(frame: pd.DataFrame) -> list[list]:
    """Rows as plain Python lists, missing values as None."""
    return [[None if pd.isna(v) else v for v in row] for row in frame.astype(object).itertuples(index=False)]


# --- CSV: encodings ------------------------------------------------------------------------------------


def test_csv_utf8(tmp_path):
    name = write(tmp_path, "people.csv", "id,name,city\n1,Zoë,Köln\n2,Bob,Paris\n")
    source = open_source(tmp_path, "csv", name)
    assert [c.name for c in source.columns()] == ["id", "name", "city"]
    assert {(c.type, c.native) for c in source.columns()} == {("unknown", "text")}  # text has no types
    frame, numbers, rejected = read_all(source, ["id", "name", "city"])
    assert rows(frame) == [["1", "Zoë", "Köln"], ["2", "Bob", "Paris"]]
    assert numbers == [2, 3]
    assert rejected == []


@pytest.mark.parametrize("declared", ["utf-8", "UTF8", "utf-8-sig"])
def test_csv_utf8_with_bom_header_has_no_bom(tmp_path, declared):
    name = write(tmp_path, "bom.csv", "\ufeffid,name\n1,Ann\n")
    source = open_source(tmp_path, "csv", name, encoding=declared)
    assert [c.name for c in source.columns()] == ["id", "name"]
    frame, numbers, _ = read_all(source, ["id", "name"])
    assert list(frame.columns) == ["id", "name"]
    assert rows(frame) == [["1", "Ann"]]
    assert numbers == [2]


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "GB2312", "cp936"])
def test_csv_chinese_encodings(tmp_path, encoding):
    text = "编号,姓名,城市\n1,张伟,北京\n2,李娜,上海\n3,王芳,广州市天河区\n"
    name = write(tmp_path, "partners.csv", text, encoding)
    source = open_source(tmp_path, "csv", name, encoding=encoding)
    assert [c.name for c in source.columns()] == ["编号", "姓名", "城市"]
    frame, numbers, rejected = read_all(source, ["姓名", "城市"])
    assert rows(frame) == [["张伟", "北京"], ["李娜", "上海"], ["王芳", "广州市天河区"]]
    assert numbers == [2, 3, 4]
    assert rejected == []


def test_csv_gb18030_four_byte_characters(tmp_path):
    # 𠮷 lies outside GBK: GB18030 writes it as a four-byte sequence
    name = write(tmp_path, "names.csv", "id,姓名\n1,𠮷野\n2,张伟\n", "gb18030")
    frame, numbers, _ = read_all(open_source(tmp_path, "csv", name, encoding="gb18030"), ["姓名"])
    assert frame["姓名"].tolist() == ["𠮷野", "张伟"]
    assert numbers == [2, 3]


@pytest.mark.parametrize("declared", ["latin-1", "iso-8859-1", "cp1252"])
def test_csv_latin1(tmp_path, declared):
    name = write(tmp_path, "west.csv", "id,name,city\n1,Müller,Zürich\n2,José,São Paulo\n", "latin-1")
    frame, _, _ = read_all(open_source(tmp_path, "csv", name, encoding=declared), ["name", "city"])
    assert rows(frame) == [["Müller", "Zürich"], ["José", "São Paulo"]]


def test_csv_unknown_encoding_name(tmp_path):
    name = write(tmp_path, "a.csv", "id\n1\n")
    with pytest.raises(SourceError, match="unknown encoding `klingon`"):
        open_source(tmp_path, "csv", name, encoding="klingon")


# --- CSV: wrong encodings ------------------------------------------------------------------------------


def test_csv_gb18030_file_declared_utf8(tmp_path):
    text = "id,name,city\n1,Ann,Boston\n2,张伟,北京\n3,李娜,上海\n"
    name = write(tmp_path, "partners.csv", text, "gb18030")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "csv", name)  # utf-8 by default
    message = str(caught.value)
    assert str(tmp_path / name) in message
    assert f"{name}:3:3:" in message  # line 3, third character (the first of the name)
    assert "column `name`" in message
    assert "gb18030" in message
    assert "张" not in message and "0x" not in message  # neither the text nor its bytes


def test_csv_gb18030_header_declared_utf8_names_the_header(tmp_path):
    name = write(tmp_path, "partners.csv", "编号,姓名\n1,张伟\n", "gb18030")
    with pytest.raises(SourceError, match=r"partners\.csv:1:1: .*the header, field 1.*encoding: gb18030"):
        open_source(tmp_path, "csv", name, encoding="utf-8")


def test_csv_decode_error_inside_a_quoted_field_names_the_column(tmp_path):
    lines = ['id,note,city', '1,"two, parts",Lyon', '2,"a note', 'over lines, with 张伟",北京']
    name = write(tmp_path, "q.csv", "\n".join(lines) + "\n", "gb18030")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "csv", name)
    message = str(caught.value)
    assert ":4:" in message and "column `note`" in message and "gb18030" in message


@pytest.mark.parametrize("declared", ["gb18030", "gbk", "latin-1"])
def test_csv_utf8_file_declared_otherwise(tmp_path, declared):
    name = write(tmp_path, "partners.csv", "id,name\n1,Ann\n2,张伟\n", "utf-8")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "csv", name, encoding=declared)
    message = str(caught.value)
    assert "the file is UTF-8" in message and "encoding: utf-8" in message
    assert f"{name}:3:3:" in message
    assert "张" not in message


def test_csv_latin1_file_declared_utf8_suggests_a_western_encoding(tmp_path):
    name = write(tmp_path, "west.csv", "id,name\n1,Ann\n2,Müller\n", "latin-1")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "csv", name)
    message = str(caught.value)
    assert ":3:4:" in message and "column `name`" in message
    assert "encoding: cp1252" in message
    assert "gb18030" not in message


def test_csv_bad_byte_past_the_sniff_window_fails_mid_stream(tmp_path):
    good = "".join(f"{i},customer number {i},somewhere in a long street name\n" for i in range(1, 3001))
    assert len(good.encode()) > 1 << 16
    path = tmp_path / "late.csv"
    path.write_bytes(b"id,name,address\n" + good.encode() + "3001,张伟,北京\n".encode("gb18030")
                     + b"3002,Ann,Boston\n")
    source = open_source(tmp_path, "csv", "late.csv")  # the start of the file is fine
    batches: list[SourceBatch] = []
    with pytest.raises(SourceError) as caught:
        for batch in source.read(["id", "name"], 500):
            batches.append(batch)
    assert batches, "the rows before the bad line come out first"
    assert all(batch.row_numbers.max() < 3002 for batch in batches)
    message = str(caught.value)
    assert "late.csv:3002:6:" in message  # header + 3000 lines, then the bad one
    assert "column `name`" in message and "gb18030" in message


def test_csv_file_cut_inside_a_character(tmp_path):
    (tmp_path / "cut.csv").write_bytes("id,name\n1,张伟\n".encode()[:-2])
    with pytest.raises(SourceError, match=r"cut\.csv:2: the file ends inside a multi-byte character"):
        open_source(tmp_path, "csv", "cut.csv")


# --- CSV: dialect options ------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiters(tmp_path, delimiter):
    text = "\n".join(delimiter.join(cells) for cells in [["id", "name", "note"], ["1", "Ann", "a,b"],
                                                            ["2", "Bob", ""]]) + "\n"
    name = write(tmp_path, "d.csv", text)
    frame, numbers, rejected = read_all(open_source(tmp_path, "csv", name, delimiter=delimiter),
                                        ["id", "name", "note"])
    assert rows(frame) == [["1", "Ann", "a,b"], ["2", "Bob", None]]
    assert numbers == [2, 3] and rejected == []


def test_csv_pipe_delimiter_with_gbk(tmp_path):
    # GBK second bytes can be 0x7C (`|`): decoding must happen before splitting
    text = "id|名称\n1|磡村\n2|张伟\n"
    assert b"|" in "磡".encode("gbk")
    name = write(tmp_path, "p.csv", text, "gbk")
    frame, _, rejected = read_all(open_source(tmp_path, "csv", name, encoding="gbk", delimiter="|"), ["名称"])
    assert frame["名称"].tolist() == ["磡村", "张伟"] and rejected == []


def test_csv_quotechar(tmp_path):
    name = write(tmp_path, "q.csv", "id,name\n1,'Smith, John'\n2,'O''Brien'\n")
    frame, _, _ = read_all(open_source(tmp_path, "csv", name, quotechar="'"), ["name"])
    assert frame["name"].tolist() == ["Smith, John", "O'Brien"]


def test_csv_without_header(tmp_path):
    name = write(tmp_path, "n.csv", "1,Ann,Boston\n2,Bob,Paris\n")
    source = open_source(tmp_path, "csv", name, header=False)
    assert [c.name for c in source.columns()] == ["column_1", "column_2", "column_3"]
    frame, numbers, _ = read_all(source, ["column_3", "column_1"])
    assert rows(frame) == [["Boston", "1"], ["Paris", "2"]]
    assert numbers == [1, 2]


def test_csv_skip_rows_skips_title_lines(tmp_path):
    # title lines are skipped as lines: a stray quote or a comma in them does not matter
    text = 'Customer export "Q3\nGenerated 2024-10-01, by admin\nid,name\n1,Ann\n2,Bob\n'
    name = write(tmp_path, "t.csv", text)
    source = open_source(tmp_path, "csv", name, skip_rows=2)
    assert [c.name for c in source.columns()] == ["id", "name"]
    frame, numbers, rejected = read_all(source, ["id", "name"])
    assert rows(frame) == [["1", "Ann"], ["2", "Bob"]]
    assert numbers == [4, 5] and rejected == []


def test_csv_skip_rows_without_header(tmp_path):
    name = write(tmp_path, "t.csv", "Report\n\n1,Ann\n2,Bob\n")
    frame, numbers, _ = read_all(open_source(tmp_path, "csv", name, skip_rows=1, header=False), ["column_2"])
    assert frame["column_2"].tolist() == ["Ann", "Bob"] and numbers == [3, 4]


def test_csv_null_values(tmp_path):
    name = write(tmp_path, "n.csv", "id,a,b,c\n1,,NULL,N/A\n2,x,null,n/a\n3, ,NULLS,\n")
    source = open_source(tmp_path, "csv", name, null_values=["", "NULL", "N/A"])
    frame, _, _ = read_all(source, ["a", "b", "c"])
    assert rows(frame) == [[None, None, None], ["x", "null", "n/a"], [" ", "NULLS", None]]
    assert frame["a"].isna().tolist() == [True, False, False]


def test_csv_default_null_is_only_the_empty_string(tmp_path):
    name = write(tmp_path, "n.csv", "id,a\n1,\n2,NULL\n")
    frame, _, _ = read_all(open_source(tmp_path, "csv", name), ["a"])
    assert rows(frame) == [[None], ["NULL"]]
    keep = open_source(tmp_path, "csv", name, null_values=[])
    assert rows(read_all(keep, ["a"])[0]) == [[""], ["NULL"]]


def test_csv_quoted_fields(tmp_path):
    text = ('id,name,note\n'
            '1,"Smith, John","said ""hi"""\n'
            '2,Ann,"first line\n'
            'second line, with comma\n'
            'third line"\n'
            '3,"Bob",""\n'
            '\n'
            '4,Eve,plain\n')
    name = write(tmp_path, "q.csv", text)
    frame, numbers, rejected = read_all(open_source(tmp_path, "csv", name), ["id", "name", "note"])
    assert rows(frame) == [
        ["1", "Smith, John", 'said "hi"'],
        ["2", "Ann", "first line\nsecond line, with comma\nthird line"],
        ["3", "Bob", None],
        ["4", "Eve", "plain"],
    ]
    assert numbers == [2, 3, 6, 8]  # the multi-line record counts from the line where it starts
    assert rejected == []


def test_csv_crlf_line_endings(tmp_path):
    text = 'id,note\r\n1,"a\r\nb"\r\n2,c\r\n'
    name = write(tmp_path, "w.csv", text)
    frame, numbers, _ = read_all(open_source(tmp_path, "csv", name), ["id", "note"])
    assert rows(frame) == [["1", "a\r\nb"], ["2", "c"]]
    assert numbers == [2, 4]


def test_csv_header_names_are_trimmed(tmp_path):
    name = write(tmp_path, "h.csv", " id , name \n1,Ann\n")
    assert [c.name for c in open_source(tmp_path, "csv", name).columns()] == ["id", "name"]


@pytest.mark.parametrize(("options", "problem"), [
    ({"delimiter": ";;"}, "`delimiter` must be one character"),
    ({"quotechar": "\n"}, "`quotechar` must be one character"),
    ({"delimiter": '"'}, "must differ"),
])
def test_csv_bad_dialect_options(tmp_path, options, problem):
    name = write(tmp_path, "a.csv", "id\n1\n")
    with pytest.raises(SourceError, match=problem):
        open_source(tmp_path, "csv", name, **options)


# --- CSV: malformed rows -------------------------------------------------------------------------------


def test_csv_wrong_field_counts_are_rejected_not_lost(tmp_path):
    text = ("id,name,city\n"
            "1,Ann,Boston\n"
            "2,Bob,Paris,secret-extra\n"
            "3,Carol\n"
            "4,Dan,Rome\n")
    name = write(tmp_path, "m.csv", text)
    frame, numbers, rejected = read_all(open_source(tmp_path, "csv", name), ["id", "name", "city"])
    assert frame["id"].tolist() == ["1", "4"]
    assert numbers == [2, 5]
    assert [(r.row_number, r.reason, r.detail) for r in rejected] == [
        (3, "malformed_row", "expected 3 fields, found 4"),
        (4, "malformed_row", "expected 3 fields, found 2"),
    ]


UNCLOSED_TAILS = {
    # what follows the line with the unclosed quote decides how the parser notices it
    "no quote until the end": ["7,Gus,Oslo", "8,Hal,Kyiv", "9,Ida,Riga"],
    "a later quoted field": ["7,Gus,Oslo", '8,"Hal",Kyiv', "9,Ida,Riga"],
    "a later line ending in a quote": ["7,Gus,Oslo", '8,Hal,Kyiv"', "9,Ida,Riga"],
}


@pytest.mark.parametrize("tail", list(UNCLOSED_TAILS), ids=list(UNCLOSED_TAILS))
def test_csv_unclosed_quote_rejects_only_its_line(tmp_path, tail):
    lines = ["id,name,city", "1,Ann,Boston", "2,Bob,Paris", '3,"Carol secret,Lima', "4,Dan,Rome",
             "5,Eve,Bern", "6,Fay,Wien", *UNCLOSED_TAILS[tail]]
    name = write(tmp_path, "u.csv", "\n".join(lines) + "\n")
    frame, numbers, rejected = read_all(open_source(tmp_path, "csv", name), ["id", "name", "city"], 3)
    data_lines = len(lines) - 1
    assert len(frame) + len(rejected) == data_lines
    assert [r.row_number for r in rejected] == [4]
    assert rejected[0].reason == "malformed_row"
    assert "Carol" not in rejected[0].detail and "secret" not in rejected[0].detail
    assert numbers == [2, 3, 5, 6, 7, 8, 9, 10]
    assert frame["id"].tolist() == ["1", "2", "4", "5", "6", "7", "8", "9"]


def test_csv_unclosed_quote_early_in_a_long_file(tmp_path):
    # the open quote would swallow the rest of the file; every later line must still come back as a row
    body = "".join(f"{i},name {i},city {i}\n" for i in range(3, 8001))
    name = write(tmp_path, "long.csv", 'id,name,city\n1,Ann,Boston\n2,"Bob,Paris\n' + body)
    frame, numbers, rejected = read_all(open_source(tmp_path, "csv", name), ["id"], 5000)
    assert [r.row_number for r in rejected] == [3]
    assert len(frame) == 7999 and len(frame) + len(rejected) == 8000
    assert numbers == [2, *range(4, 8002)]


def test_csv_garbage_after_closing_quote(tmp_path):
    name = write(tmp_path, "g.csv", 'id,name\n1,"Ann"secret\n2,Bob\n')
    _, numbers, rejected = read_all(open_source(tmp_path, "csv", name), ["id", "name"])
    assert numbers == [3] and [r.row_number for r in rejected] == [2]
    assert rejected[0].detail.startswith("broken CSV quoting") and "secret" not in rejected[0].detail


def test_csv_rejected_detail_never_holds_cell_text(tmp_path):
    cells = ["SECRET-A", "SECRET-B", "SECRET-C", "SECRET-D"]
    text = "id,name\n" + ",".join(cells) + "\n" + f'1,"{cells[0]}"{cells[1]}\n' + f'2,"{cells[2]}\n'
    name = write(tmp_path, "s.csv", text)
    _, _, rejected = read_all(open_source(tmp_path, "csv", name), ["id", "name"])
    assert len(rejected) == 3
    for item in rejected:
        assert not any(cell in item.detail for cell in cells)


# --- CSV: batching and schema --------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 50])
def test_csv_batches_are_bounded_ordered_and_complete(tmp_path, batch_size):
    lines = ["id,name,city"]
    for i in range(1, 31):
        if i % 9 == 0:
            lines.append(f"{i},too,many,fields")
        elif i == 14:
            lines.append(f'{i},"multi\nline",X')
        else:
            lines.append(f"{i},n{i},c{i}")
    name = write(tmp_path, "b.csv", "\n".join(lines) + "\n")
    batches = list(open_source(tmp_path, "csv", name).read(["id", "city"], batch_size))
    assert all(0 < len(b.frame) + len(b.rejected) <= batch_size for b in batches)
    assert all(len(b.frame) == len(b.row_numbers) for b in batches)
    assert all(b.row_numbers.dtype == np.int64 for b in batches)
    numbers = [int(n) for b in batches for n in b.row_numbers]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    # ids 9, 18, 27 are broken; lines after the two-line record of id 14 shift by one
    assert sorted(r.row_number for b in batches for r in b.rejected) == [10, 20, 29]
    assert len(numbers) == 27
    frame = pd.concat([b.frame for b in batches], ignore_index=True)
    assert frame["id"].tolist() == [str(i) for i in range(1, 31) if i % 9]
    assert numbers[12] == 15  # id 14 starts on line 15 and spans two lines
    assert numbers[13] == 17


def test_csv_only_requested_columns_in_requested_order(tmp_path):
    name = write(tmp_path, "c.csv", "id,name,city,phone\n1,Ann,Boston,555\n")
    frame, _, _ = read_all(open_source(tmp_path, "csv", name), ["phone", "id"])
    assert list(frame.columns) == ["phone", "id"]
    assert rows(frame) == [["555", "1"]]


def test_csv_missing_column_is_schema_drift(tmp_path):
    name = write(tmp_path, "c.csv", "id,name,city\n1,Ann,Boston\n")
    with pytest.raises(SchemaDriftError) as caught:
        list(open_source(tmp_path, "csv", name).read(["id", "email"], 10))
    message = str(caught.value)
    assert "email" in message and "id, name, city" in message


def test_csv_duplicate_header_names(tmp_path):
    name = write(tmp_path, "d.csv", "id,name,Name,name\n1,a,b,c\n")
    with pytest.raises(SourceError, match=r"d\.csv:1: duplicate column name\(s\) in the header: name"):
        open_source(tmp_path, "csv", name).columns()


@pytest.mark.parametrize("content", ["", "\n\n\n"], ids=["empty", "blank lines"])
def test_csv_empty_file(tmp_path, content):
    name = write(tmp_path, "e.csv", content)
    source = open_source(tmp_path, "csv", name)
    with pytest.raises(SourceError, match="the file is empty"):
        source.columns()
    with pytest.raises(SourceError, match="the file is empty"):
        list(source.read(["id"], 10))


def test_csv_header_only(tmp_path):
    name = write(tmp_path, "h.csv", "id,name\n")
    source = open_source(tmp_path, "csv", name)
    assert [c.name for c in source.columns()] == ["id", "name"]
    assert list(source.read(["id"], 10)) == []


def test_csv_file_not_found(tmp_path):
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "csv", "data/missing.csv")
    assert "file not found" in str(caught.value)
    assert str(tmp_path / "data" / "missing.csv") in str(caught.value)


def test_csv_reads_again_and_frames_are_strings(tmp_path):
    name = write(tmp_path, "r.csv", "id,amount\n1,12.50\n2,\n")
    source = open_source(tmp_path, "csv", name)
    first, _, _ = read_all(source, ["amount"])
    second, _, _ = read_all(source, ["amount"])
    assert first.equals(second)
    assert isinstance(first["amount"].dtype, pd.StringDtype)
    assert rows(first) == [["12.50"], [None]]


# --- Excel ---------------------------------------------------------------------------------------------


def make_workbook(path: Path) -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Summary"
    sheet.append(["nothing to read here"])
    data = book.create_sheet("Customers")
    data.append(["Customer export"])  # row 1: a title
    data.append([])  # row 2: blank
    data.append(["id", "name", "amount", "since", "joined", "note"])  # row 3: the header
    data.append([1, "张伟", 12.5, dt.date(2020, 1, 2), dt.datetime(2021, 3, 4, 5, 6, 7), "N/A"])
    data.append([2, "Ann", 3, dt.date(2019, 12, 31), None, "ok"])
    data.append([])  # row 6: blank, skipped
    data.append([None, None, None, None, None, None])  # row 7: blank, skipped
    data.append([3, "Bob", None, None, None, ""])
    book.save(path)


@pytest.mark.parametrize("sheet", ["Customers", 1])
def test_excel_reads_typed_values_with_sheet_row_numbers(tmp_path, sheet):
    make_workbook(tmp_path / "book.xlsx")
    source = open_source(tmp_path, "excel", "book.xlsx", sheet=sheet, skip_rows=1, null_values=["", "N/A"])
    assert [c.name for c in source.columns()] == ["id", "name", "amount", "since", "joined", "note"]
    frame, numbers, rejected = read_all(source, ["id", "name", "amount", "since", "joined", "note"])
    assert numbers == [4, 5, 8]
    assert rejected == []
    assert frame["id"].tolist() == [1, 2, 3]
    assert str(frame["id"].dtype) == "Int64"
    assert frame["name"].tolist() == ["张伟", "Ann", "Bob"]
    assert frame["amount"].tolist()[:2] == [12.5, 3.0] and pd.isna(frame["amount"][2])
    assert frame["since"].tolist()[:2] == [dt.datetime(2020, 1, 2), dt.datetime(2019, 12, 31)]
    assert frame["joined"][0] == dt.datetime(2021, 3, 4, 5, 6, 7)
    assert rows(frame[["note"]]) == [[None], ["ok"], [None]]


def test_excel_first_sheet_by_default_and_blank_rows_before_header(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet["A3"], sheet["B3"] = "id", "name"
    sheet["A4"], sheet["B4"] = 7, "Eve"
    book.save(tmp_path / "b.xlsx")
    frame, numbers, _ = read_all(open_source(tmp_path, "excel", "b.xlsx"), ["name", "id"])
    assert rows(frame) == [["Eve", 7]] and numbers == [4]


def test_excel_batches(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["id", "name"])
    for i in range(1, 24):
        sheet.append([i, f"n{i}"] if i % 5 else [])
    book.save(tmp_path / "b.xlsx")
    batches = list(open_source(tmp_path, "excel", "b.xlsx").read(["id"], 4))
    assert all(len(b.frame) <= 4 for b in batches)
    numbers = [int(n) for b in batches for n in b.row_numbers]
    assert numbers == [i + 1 for i in range(1, 24) if i % 5]


@pytest.mark.parametrize("sheet", ["Missing", 5])
def test_excel_unknown_sheet_lists_sheets(tmp_path, sheet):
    make_workbook(tmp_path / "book.xlsx")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "excel", "book.xlsx", sheet=sheet).columns()
    assert "'Summary', 'Customers'" in str(caught.value)


def test_excel_missing_column_and_duplicate_header(tmp_path):
    from openpyxl import Workbook

    make_workbook(tmp_path / "book.xlsx")
    with pytest.raises(SchemaDriftError, match=r"email.*the file has: id, name"):
        list(open_source(tmp_path, "excel", "book.xlsx", sheet="Customers", skip_rows=1).read(["email"], 5))
    book = Workbook()
    book.active.append(["id", "id"])
    book.save(tmp_path / "dup.xlsx")
    with pytest.raises(SourceError, match="duplicate column name"):
        open_source(tmp_path, "excel", "dup.xlsx").columns()


def test_excel_empty_sheet(tmp_path):
    from openpyxl import Workbook

    Workbook().save(tmp_path / "empty.xlsx")
    with pytest.raises(SourceError, match="is empty"):
        open_source(tmp_path, "excel", "empty.xlsx").columns()


@pytest.mark.parametrize(("filename", "content"), [
    ("text.xlsx", b"id,name\n1,Ann\n"),
    ("old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100)),
    ("empty.xlsx", b""),
])
def test_excel_not_a_workbook(tmp_path, filename, content):
    (tmp_path / filename).write_bytes(content)
    source = open_source(tmp_path, "excel", filename)
    with pytest.raises(SourceError, match=r"not a readable \.xlsx workbook"):
        source.columns()
    with pytest.raises(SourceError, match=r"not a readable \.xlsx workbook"):
        list(source.read(["id"], 10))


def test_excel_file_not_found(tmp_path):
    with pytest.raises(SourceError, match="file not found"):
        open_source(tmp_path, "excel", "nope.xlsx")


# --- JSON Lines ----------------------------------------------------------------------------------------


def test_jsonl_rows_missing_keys_blank_lines_and_rejects(tmp_path):
    lines = [
        json.dumps({"id": 1, "name": "张伟", "tags": ["a"], "amount": 1.5}, ensure_ascii=False),
        json.dumps({"id": 2}),
        "",
        "   ",
        '{"id": 3, "name": "secret-name"',  # cut short
        '["not", "an", "object"]',
        '"just a string"',
        json.dumps({"id": 4, "name": "Bob", "extra": True}),
    ]
    name = write(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    source = open_source(tmp_path, "jsonl", name)
    assert source.columns() is None
    frame, numbers, rejected = read_all(source, ["id", "name", "amount"])
    assert numbers == [1, 2, 8]
    assert rows(frame) == [[1, "张伟", 1.5], [2, None, None], [4, "Bob", None]]
    assert [(r.row_number, r.reason) for r in rejected] == [(5, "malformed_row"), (6, "malformed_row"),
                                                            (7, "malformed_row")]
    assert rejected[0].detail.startswith("invalid JSON")
    assert rejected[1].detail == "expected a JSON object per line, found an array"
    assert rejected[2].detail == "expected a JSON object per line, found a string"
    assert all("secret" not in r.detail for r in rejected)


def test_jsonl_invalid_escape_detail_has_no_text(tmp_path):
    name = write(tmp_path, "e.jsonl", '{"id": 1, "name": "\\q"}\n')
    _, _, rejected = read_all(open_source(tmp_path, "jsonl", name), ["id"])
    assert rejected[0].row_number == 1 and rejected[0].detail.startswith("invalid JSON (Invalid \\escape")
    assert "'q'" not in rejected[0].detail and "\\q" not in rejected[0].detail


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_jsonl_batches(tmp_path, batch_size):
    lines = [json.dumps({"id": i}) if i % 4 else "{broken" for i in range(1, 12)]
    name = write(tmp_path, "b.jsonl", "\n".join(lines) + "\n")
    batches = list(open_source(tmp_path, "jsonl", name).read(["id"], batch_size))
    assert all(len(b.frame) + len(b.rejected) <= batch_size for b in batches)
    numbers = [int(n) for b in batches for n in b.row_numbers]
    assert numbers == [i for i in range(1, 12) if i % 4]
    assert [r.row_number for b in batches for r in b.rejected] == [4, 8]


def test_jsonl_utf8_bom_and_crlf(tmp_path):
    name = write(tmp_path, "b.jsonl", '\ufeff{"id": 1}\r\n{"id": 2}\r\n')
    frame, numbers, rejected = read_all(open_source(tmp_path, "jsonl", name), ["id"])
    assert frame["id"].tolist() == [1, 2] and numbers == [1, 2] and rejected == []


def test_jsonl_gb18030(tmp_path):
    name = write(tmp_path, "g.jsonl", json.dumps({"姓名": "张伟"}, ensure_ascii=False) + "\n", "gb18030")
    frame, _, _ = read_all(open_source(tmp_path, "jsonl", name, encoding="gb18030"), ["姓名"])
    assert frame["姓名"].tolist() == ["张伟"]


def test_jsonl_gb18030_declared_utf8(tmp_path):
    text = json.dumps({"id": 1}) + "\n" + json.dumps({"id": 2, "name": "张伟"}, ensure_ascii=False) + "\n"
    name = write(tmp_path, "g.jsonl", text, "gb18030")
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path, "jsonl", name)
    message = str(caught.value)
    assert "g.jsonl:2:" in message and "gb18030" in message and "张" not in message


def test_jsonl_utf8_declared_gb18030(tmp_path):
    name = write(tmp_path, "u.jsonl", json.dumps({"name": "张伟"}, ensure_ascii=False) + "\n")
    with pytest.raises(SourceError, match="the file is UTF-8"):
        open_source(tmp_path, "jsonl", name, encoding="gb18030")


def test_jsonl_bad_byte_past_the_sniff_window(tmp_path):
    good = "".join(json.dumps({"id": i, "name": f"customer number {i}"}) + "\n" for i in range(1, 3001))
    (tmp_path / "late.jsonl").write_bytes(good.encode() + '{"name": "张伟"}\n'.encode("gb18030"))
    source = open_source(tmp_path, "jsonl", "late.jsonl")
    with pytest.raises(SourceError, match=r"late\.jsonl:3001:11: .*gb18030"):
        list(source.read(["id"], 1000))


# --- Parquet -------------------------------------------------------------------------------------------


def make_parquet(path: Path, count: int = 10, row_group_size: int | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    utc = dt.UTC
    table = pa.table({
        "id": pa.array(range(1, count + 1), pa.int64()),
        "score": pa.array([i / 4 for i in range(count)], pa.float64()),
        "amount": pa.array([Decimal(f"{i}.25") for i in range(count)], pa.decimal128(10, 2)),
        "name": pa.array([f"name {i}" if i % 3 else None for i in range(count)], pa.string()),
        "born": pa.array([dt.date(2000, 1, 1) + dt.timedelta(days=i) for i in range(count)], pa.date32()),
        "seen_utc": pa.array([dt.datetime(2024, 1, 1, i % 24, tzinfo=utc) for i in range(count)],
                             pa.timestamp("us", tz="UTC")),
        "seen_local": pa.array([dt.datetime(2024, 1, 1, i % 24) for i in range(count)], pa.timestamp("ms")),
        "small": pa.array([i % 100 if i % 2 else None for i in range(count)], pa.int16()),
        "city": pa.array([["Oslo", "Riga"][i % 2] for i in range(count)]).dictionary_encode(),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_column_types(tmp_path):
    make_parquet(tmp_path / "p.parquet")
    infos = {c.name: c for c in open_source(tmp_path, "parquet", "p.parquet").columns()}
    assert {n: i.type for n, i in infos.items()} == {
        "id": "integer", "score": "float", "amount": "decimal", "name": "string", "born": "date",
        "seen_utc": "timestamp", "seen_local": "timestamp", "small": "integer", "city": "string",
    }
    assert infos["seen_utc"].timezone_aware is True
    assert infos["seen_local"].timezone_aware is False
    assert infos["id"].timezone_aware is None
    assert infos["amount"].native == "decimal128(10, 2)"


@pytest.mark.parametrize("batch_size", [3, 100])
def test_parquet_reads_batches_with_values(tmp_path, batch_size):
    make_parquet(tmp_path / "p.parquet", count=10, row_group_size=4)
    columns = ["seen_utc", "id", "amount", "name", "born", "seen_local", "small", "city", "score"]
    batches = list(open_source(tmp_path, "parquet", "p.parquet").read(columns, batch_size))
    assert all(len(b.frame) <= batch_size for b in batches)
    frame = pd.concat([b.frame for b in batches], ignore_index=True)
    assert list(frame.columns) == columns
    assert [int(n) for b in batches for n in b.row_numbers] == list(range(1, 11))
    assert frame["id"].tolist() == list(range(1, 11)) and str(frame["id"].dtype) == "Int64"
    assert frame["amount"].tolist() == [Decimal(f"{i}.25") for i in range(10)]
    assert frame["score"].tolist() == [i / 4 for i in range(10)]
    assert rows(frame[["name"]]) == [[f"name {i}" if i % 3 else None] for i in range(10)]
    assert frame["born"].tolist() == [dt.date(2000, 1, 1) + dt.timedelta(days=i) for i in range(10)]
    assert frame["seen_utc"][5] == dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC)
    assert frame["seen_local"][5] == dt.datetime(2024, 1, 1, 5)
    assert rows(frame[["small"]]) == [[i % 100 if i % 2 else None] for i in range(10)]
    assert frame["city"].tolist() == [["Oslo", "Riga"][i % 2] for i in range(10)]


def test_parquet_missing_column(tmp_path):
    make_parquet(tmp_path / "p.parquet")
    with pytest.raises(SchemaDriftError, match=r"email.*the file has: id, score"):
        list(open_source(tmp_path, "parquet", "p.parquet").read(["id", "email"], 5))


def test_parquet_damaged_files(tmp_path):
    make_parquet(tmp_path / "p.parquet", count=2000)
    whole = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "noise.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (tmp_path / "text.parquet").write_text("id,name\n1,Ann\n")
    for name in ("cut.parquet", "noise.parquet", "text.parquet"):
        with pytest.raises(SourceError, match=r"not a readable Parquet file"):
            open_source(tmp_path, "parquet", name)


def test_parquet_damaged_data_pages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [f"customer {i:06d} " * 4 for i in range(5000)]
    pq.write_table(pa.table({"name": names}), tmp_path / "p.parquet", compression="snappy",
                   use_dictionary=False)
    data = bytearray((tmp_path / "p.parquet").read_bytes())
    middle = len(data) // 3
    data[middle: middle + 4000] = bytes(4000)  # the footer stays readable, the pages do not
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    source = open_source(tmp_path, "parquet", "bad.parquet")
    assert [c.name for c in source.columns()] == ["name"]
    with pytest.raises(SourceError, match=r"bad\.parquet: damaged Parquet data"):
        list(source.read(["name"], 1000))


# --- a CSV batch through the real cleansing step -------------------------------------------------------


def test_csv_batch_through_cleanse(tmp_path):
    from crmbridge.flows.steps import check_source_schema
    from crmbridge.mappings.cleanse import cleanse
    from crmbridge.mappings.loader import load_mapping

    text = ("合作伙伴导出\n"
            "编号,姓名,年龄,城市\n"
            "1,张伟,35,北京\n"
            "2,李娜,N/A,上海\n"
            "3,王芳,abc,广州\n"
            "4,赵磊,40,深圳,多余\n"
            "5,,28,杭州\n")
    write(tmp_path, "partners.csv", text, "gb18030")
    (tmp_path / "mapping.yaml").write_text("""
version: 1
name: partners
sources:
  partner_export:
    type: csv
    path: partners.csv
    encoding: gb18030
    skip_rows: 1
    null_values: ["", "N/A"]
targets:
  crm:
    type: sql
    url: sqlite:///crm.db
entities:
  - name: partners
    source: partner_export
    key: 编号
    columns:
      编号: string
      姓名: string
      年龄: integer
      城市: string
    target: crm
    target_table: partner
    fields:
      name: {from: 姓名, required: true}
      age: {from: 年龄, type: integer}
      city: {from: 城市}
""", encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml", env={})
    entity = mapping.entity("partners")
    source = connector_for(mapping.sources["partner_export"], mapping).open_source(entity)
    check_source_schema(mapping, entity, source, "partners.csv")  # declared types are checked per value
    batch = next(source.read(entity.source_columns, 100))
    assert [r.row_number for r in batch.rejected] == [6]
    result = cleanse(mapping, entity, batch.frame, batch.row_numbers)
    assert sorted(result.quarantined) == [5, 7]  # 'abc' is not an integer; the name is missing
    staged = result.frame.set_index("_row")
    assert staged.loc[3, "name"] == "张伟" and staged.loc[3, "age"] == 35
    assert pd.isna(staged.loc[4, "age"]) and staged.loc[4, "city"] == "上海"
