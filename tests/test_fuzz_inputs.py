"""Property-based tests of everything a user feeds in: mapping files, CSV files and source values.

Each input either works or fails with crmbridge's own clear error (never a stray exception), and no row is
lost: every good CSV record comes back with its exact values, every broken one is rejected on its own, and
cleansing puts every row in exactly one of two places (staged or quarantined).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_file_connectors import open_source, read_all

from crmbridge.errors import CrmbridgeError, MappingError
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import cleanse

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text as legacy exports hold it: any Unicode (CJK, accents, emoji, full-width, control characters, NUL),
# with the delimiter and the quote character in it, sometimes long.
cell_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from(list(',"; \t\x00\u3000é中文😀ＡＢ')), max_size=12),
    st.text(min_size=2_000, max_size=5_000, alphabet=st.characters(codec="utf-8")),
).map(lambda s: s.replace("\r", " ").replace("\n", " "))

good_row = st.tuples(cell_text, cell_text).map(lambda row: ("good", row))
broken_row = st.one_of(
    st.just('"an unclosed quote, and more'),  # quoting that never ends
    st.text(alphabet="abc ", min_size=1, max_size=8),  # one field where three are expected
    st.just("a,b,c,d"),  # too many fields
).map(lambda line: ("bad", line))


def _csv_line(values: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


@SETTINGS
@given(records=st.lists(st.one_of(good_row, good_row, broken_row), max_size=25),
       encoding=st.sampled_from(["utf-8", "gb18030", "utf-8-sig"]),
       batch_size=st.integers(1, 7))
def test_csv_keeps_every_good_record_and_rejects_each_broken_one_alone(
        records: list, encoding: str, batch_size: int, tmp_path: Path) -> None:
    lines = ["id,name,city\n"]
    expected: list[tuple[int, list[str]]] = []
    broken: list[int] = []
    unclosed = False
    for number, (kind, content) in enumerate(records, start=2):
        if kind == "good" and unclosed:
            # After an unclosed quote, any later quote (in a value, or around one holding the delimiter) may
            # close it and make the lines between one valid multi-line record, which CSV cannot tell from a
            # real one; so those rows need no quoting.
            content = tuple(cell.replace('"', "'").replace(",", ";") for cell in content)
        if kind == "bad" and content.startswith('"'):
            unclosed = True
        if kind == "good":
            lines.append(_csv_line((str(number), *content)))
            expected.append((number, [str(number), *content]))
        else:
            lines.append(content + "\n")
            broken.append(number)
    path = tmp_path / f"fuzz-{encoding}.csv"
    path.write_bytes("".join(lines).encode(encoding))

    source = open_source(tmp_path, "csv", path.name, encoding=encoding, null_values=[])
    frame, numbers, rejected = read_all(source, ["id", "name", "city"], batch_size)

    got = [[str(v) for v in row] for row in frame.astype(object).itertuples(index=False)]
    assert list(zip(numbers, got, strict=True)) == expected  # every good record, exact, in order
    assert sorted(r.row_number for r in rejected) == broken  # every broken record, on its own line
    assert all(r.reason == "malformed_row" and r.detail for r in rejected)


MAPPING = """\
version: 1
name: fuzz
sources:
  legacy: {type: csv, path: people.csv}
targets:
  crm: {type: sql, url: "sqlite:///target.db"}
entities:
  - name: people
    source: legacy
    key: id
    target: crm
    target_table: person
    fields:
      name: {from: name, transform: [trim, title], required: true}
      age: {from: age, type: integer}
      balance: {from: balance, type: decimal}
      born: {from: born, type: date}
      seen: {from: seen, type: timestamp}
      active: {from: active, type: boolean}
settings:
  timezone: Asia/Shanghai
"""

# A value anywhere in a mapping: what a typo, a paste or a wrong indent can put there.
yaml_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=6,
)


def _paths(node, at=()):
    yield at
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*at, i))


def _set(node, path, value):
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _delete(node, path):
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]


@SETTINGS
@given(data=st.data())
def test_any_mutation_of_a_mapping_loads_or_fails_with_a_mapping_error(data: st.DataObject, tmp_path: Path) -> None:
    document = yaml.safe_load(MAPPING)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(document) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        if data.draw(st.booleans()):
            _set(document, path, data.draw(yaml_value))
        else:
            _delete(document, path)
    path = tmp_path / "mapping.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    try:
        load_mapping(path)
    except MappingError as error:
        assert str(path) in str(error)  # it names the file (and, for each problem, line and path)
        assert str(error).strip()


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_any_bytes_as_a_mapping_fail_with_a_mapping_error(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_bytes(raw)
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    assert str(path) in str(caught.value)


source_value = st.one_of(
    st.none(),
    st.text(max_size=25),
    st.sampled_from(["42", " 42 ", "-0", "1e3", "1,234.50", "1.234,50", "NaN", "inf", "2024-02-29",
                     "2023-02-29", "0000-00-00", "31/12/2024", "2024-13-01", "true", "是", "ｔｒｕｅ", "\x00",
                     "2024-03-10 02:30:00", "9" * 40, "😀"]),
)


@pytest.fixture
def fuzz_mapping(tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("fuzz-mapping")
    (where / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    (where / "people.csv").write_text("id,name,age,balance,born,seen,active\n", encoding="utf-8")
    return load_mapping(where / "mapping.yaml")


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({c: source_value for c in
                                            ("id", "name", "age", "balance", "born", "seen", "active")}),
                     max_size=20))
def test_cleansing_puts_every_row_in_exactly_one_place(rows: list[dict], fuzz_mapping) -> None:
    entity = fuzz_mapping.entities[0]
    frame = pd.DataFrame(rows, columns=["id", "name", "age", "balance", "born", "seen", "active"], dtype="string")
    numbers = np.arange(2, 2 + len(rows), dtype=np.int64)
    try:
        result = cleanse(fuzz_mapping, entity, frame, numbers)
    except CrmbridgeError as error:  # allowed, if it says where; never a stray exception
        assert "entity `people`" in str(error)
        return
    staged = set(result.frame["_row"].tolist())
    quarantined_rows = set(result.quarantined)  # by row number
    assert not staged & quarantined_rows
    assert len(staged) + len(quarantined_rows) == len(rows)
    for problems in result.quarantined.values():
        for problem in problems:  # reasons carry no values: only codes and what was expected
            assert problem.code and problem.field
