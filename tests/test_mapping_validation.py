"""Mapping validation: every problem names the file, line, column and document path and says what was
expected; every problem in a file is reported at once; secrets never leak into the messages."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from crmbridge.errors import MappingError, Problem
from crmbridge.mappings import load_mapping, transforms
from crmbridge.mappings.envvars import REDACTED, Redactor, interpolate, redact_url_password
from crmbridge.mappings.loader import CONNECTION_OPTIONS
from crmbridge.schemas import load_schema

REPO = Path(__file__).resolve().parents[1]

HEAD = """\
version: 1
name: test-mapping
sources:
  legacy:
    type: sql
    url: sqlite:///legacy.db
  export:
    type: csv
    path: data/export.csv
targets:
  crm:
    type: sql
    url: sqlite:///crm.db
entities:
"""

ACCOUNTS = """\
  - name: accounts
    source: legacy
    table: customers
    key: cust_id
    target: crm
    target_table: account
    fields:
      name:
        from: company_name
"""


def mapping(*entities: str, head: str = HEAD) -> str:
    """A mapping of `head` plus entities: list items as written, or dedented blocks made into items."""
    items = []
    for entity in entities:
        if entity.startswith("  - "):
            items.append(entity if entity.endswith("\n") else entity + "\n")
        else:
            lines = textwrap.dedent(entity).strip("\n").splitlines()
            items.append("  - " + "\n    ".join(lines) + "\n")
    return head + "".join(items)


def write(tmp_path: Path, text: str, name: str = "mapping.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fail(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[Problem]:
    """Load `text` expecting MappingError; every problem must name the file."""
    path = write(tmp_path, text)
    with pytest.raises(MappingError) as caught:
        load_mapping(path, env=env if env is not None else {})
    problems = caught.value.problems
    assert problems
    for problem in problems:
        assert problem.file == str(path)
        assert problem.line is not None and problem.column is not None, str(problem)
        assert problem.message
    return problems


def at(problems: list[Problem], path: str) -> Problem:
    found = [p for p in problems if p.path == path]
    assert found, f"no problem at {path}; found:\n" + "\n".join(map(str, problems))
    return found[0]


def position(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based line and column of the nth occurrence of `needle` in `text`."""
    start = -1
    for _ in range(nth + 1):
        start = text.index(needle, start + 1)
    line = text.count("\n", 0, start) + 1
    return line, start - (text.rfind("\n", 0, start) + 1) + 1


def assert_at(problem: Problem, text: str, needle: str, nth: int = 0) -> None:
    assert (problem.line, problem.column) == position(text, needle, nth), str(problem)


def ok(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    return load_mapping(write(tmp_path, text), env=env if env is not None else {})


# --- the examples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["examples/demo/mapping.yaml", "cli/templates/mapping.yaml"])
def test_shipped_examples_load_without_problems(example: str) -> None:
    loaded = load_mapping(REPO / example, env={})
    assert loaded.entities
    assert loaded.load_order()


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(load_schema("mapping"))


def test_a_minimal_mapping_loads(tmp_path: Path) -> None:
    loaded = ok(tmp_path, mapping(ACCOUNTS))
    entity = loaded.entity("accounts")
    assert entity.key == ("cust_id",) and entity.fields["name"].source_column == "company_name"


# --- YAML itself ----------------------------------------------------------------------------------------


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    text = "version: 1\nname: test\nsources: {legacy: {type: sql\ntargets: {}\n"
    (problem,) = fail(tmp_path, text)
    assert problem.message.startswith("invalid YAML: ")
    assert problem.line == 4 and problem.column is not None
    assert "line 3" in problem.message  # where the unclosed `{` opened


def test_tab_indentation_is_explained(tmp_path: Path) -> None:
    (problem,) = fail(tmp_path, "version: 1\nsources:\n\tlegacy: {}\n")
    assert (problem.line, problem.column) == (3, 1)
    assert "tab" in problem.message


def test_several_documents_in_one_file(tmp_path: Path) -> None:
    (problem,) = fail(tmp_path, "version: 1\n---\nversion: 1\n")
    assert problem.line == 2 and "single document" in problem.message


def test_duplicate_keys_are_all_reported_with_both_positions(tmp_path: Path) -> None:
    text = mapping("""
        name: accounts
        source: legacy
        table: customers
        key: cust_id
        target: crm
        target_table: account
        fields:
          name:
            from: company_name
            from: name
          name:
            value: x
    """).replace("name: test-mapping\n", "name: test-mapping\nname: again\n")
    problems = fail(tmp_path, text)
    assert len(problems) == 3
    top = at(problems, "name")
    assert_at(top, text, "name: again")
    assert "duplicate key `name`" in top.message and "line 2, column 1" in top.message
    inner = at(problems, "entities[0].fields.name.from")
    assert_at(inner, text, "from: name")
    field = at(problems, "entities[0].fields.name")
    assert_at(field, text, "name:\n        value", 0)


def test_not_a_mapping_document(tmp_path: Path) -> None:
    for text, found in (
        ("- a\n- b\n", "found a list"),
        ("just text\n", "found a string"),
        ("# nothing\n", "found an empty file"),
    ):
        (problem,) = fail(tmp_path, text)
        assert "expected a mapping document" in problem.message and found in problem.message


def test_yaml_keys_are_names_not_booleans_or_numbers(tmp_path: Path) -> None:
    text = mapping("""
        name: accounts
        source: legacy
        table: customers
        key: cust_id
        target: crm
        target_table: account
        fields:
          on:
            from: "no"
          1:
            from: "yes"
    """)
    loaded = ok(tmp_path, text)
    fields = loaded.entity("accounts").fields
    assert set(fields) == {"on", "1"}
    assert fields["1"].source_column == "yes"


def test_a_list_used_as_key_is_rejected(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS).replace("      name:\n", "      ? [a, b]\n      : {from: x}\n      name:\n")
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields" and "expected a name as key, found a list" in problem.message
    assert_at(problem, text, "[a, b]")


def test_merge_keys_work_and_explicit_keys_win(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("  - name: accounts", "  - &base\n    name: accounts"),
        """
        <<: *base
        name: contacts
        table: contacts
        mode: sometimes
    """,
    )
    problems = fail(tmp_path, text)
    assert [p.path for p in problems] == ["entities[1].mode"]
    assert_at(problems[0], text, "mode: sometimes")
    loaded = ok(tmp_path, text.replace("    mode: sometimes\n", ""))
    assert [e.name for e in loaded.entities] == ["accounts", "contacts"]
    assert loaded.entity("contacts").table == "contacts"


def test_a_recursive_alias_is_rejected(tmp_path: Path) -> None:
    problems = fail(tmp_path, "version: 1\ndescription: &loop [a, *loop]\n")
    assert any("alias" in p.message and p.path == "description[1]" for p in problems)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_bytes("version: 1\nname: 客户\n".encode("gb18030"))
    with pytest.raises(MappingError) as caught:
        load_mapping(path, env={})
    (problem,) = caught.value.problems
    assert problem.line == 2 and "expected UTF-8" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as caught:
        load_mapping(tmp_path / "nope.yaml", env={})
    assert "cannot read the file" in str(caught.value)


# --- the schema ---------------------------------------------------------------------------------------


def test_problem_text_names_file_line_column_path_and_expectation(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("    target_table: account\n", "    target_table: account\n    mode: merge\n")
    )
    (problem,) = fail(tmp_path, text)
    line, column = position(text, "mode: merge")
    path = tmp_path / "mapping.yaml"
    assert str(problem) == (
        f"{path}:{line}:{column} at entities[0].mode: expected one of: upsert, insert, "
        "update; found a string ('merge')"
    )


def test_missing_required_keys_are_reported_together(tmp_path: Path) -> None:
    text = mapping("""
        name: accounts
        source: legacy
        table: customers
        target: crm
        target_table: account
    """)
    problems = fail(tmp_path, text)
    assert sorted(p.message for p in problems) == [
        "missing required key `fields`",
        "missing required key `key`",
    ]
    for problem in problems:
        assert problem.path == "entities[0]"
        assert_at(problem, text, "name: accounts")


def test_missing_top_level_keys(tmp_path: Path) -> None:
    problems = fail(tmp_path, "version: 1\nname: x\n")
    assert {p.message for p in problems} == {
        f"missing required key `{k}`" for k in ("sources", "targets", "entities")
    }
    assert all(p.path == "" and (p.line, p.column) == (1, 1) for p in problems)


def test_unknown_keys_list_the_allowed_ones(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace(
            "        from: company_name\n", "        from: company_name\n        transfrom: [trim]\n"
        ).replace("    key: cust_id\n", "    key: cust_id\n    colour: blue\n")
    )
    text = text.replace("version: 1\n", "version: 1\nsetings: {}\n")
    problems = fail(tmp_path, text)
    assert len(problems) == 3
    top = at(problems, "setings")
    assert "did you mean `settings`?" in top.message
    assert ("expected one of: description, entities, name, protection, settings, sources, targets, version"
            in top.message)
    entity = at(problems, "entities[0].colour")
    assert_at(entity, text, "colour: blue")
    entity_keys = sorted(load_schema("mapping")["$defs"]["entity"]["properties"])  # grows with the language
    assert {"columns", "create_table", "external_id", "fields", "key", "mode", "name", "query"} <= set(entity_keys)
    assert f"expected one of: {', '.join(entity_keys)}" in entity.message
    field = at(problems, "entities[0].fields.name.transfrom")
    assert_at(field, text, "transfrom")
    assert "unknown key `transfrom` (did you mean `transform`?)" in field.message
    field_keys = sorted(load_schema("mapping")["$defs"]["field"]["properties"])
    assert {"from", "mask", "max_length", "pattern", "ref", "required", "transform", "type", "value"} <= set(field_keys)
    assert f"expected one of: {', '.join(field_keys)}" in field.message


def test_wrong_types(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("key: cust_id", "key: 5").replace(
            "        from: company_name\n",
            "        from: company_name\n        required: yes please\n        max_length: 0\n",
        ),
        head=HEAD.replace("version: 1\n", "version: 1\nsettings:\n  batch_size: many\n  dask: local:0\n").replace(
            "    path: data/export.csv\n",
            "    path: data/export.csv\n    header: 'no'\n    delimiter: ';;'\n",
        ),
    )
    problems = fail(tmp_path, text)
    expected = {
        "settings.batch_size": ("batch_size", "expected an integer, found a string ('many')"),
        "settings.dask": ("dask", "expected a value matching ^(local(:[1-9][0-9]*)?|(tcp|tls|ucx|inproc)://"),
        "sources.export.header": ("header", "expected a boolean (true or false), found a string ('no')"),
        "sources.export.delimiter": ("delimiter", "expected a single character; found a string (';;')"),
        "entities[0].key": ("key: 5", "expected a string or a list of strings; found an integer (5)"),
        "entities[0].fields.name.required": (
            "required",
            "expected a boolean (true or false), found a string",
        ),
        "entities[0].fields.name.max_length": ("max_length", "expected an integer of at least 1; found 0"),
    }
    assert len(problems) == len(expected)
    for path, (needle, message) in expected.items():
        problem = at(problems, path)
        assert message in problem.message
        assert_at(problem, text, needle)
    # listed in the order of the file
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_bad_enum_and_const_values(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace(
            "    target_table: account\n", "    target_table: account\n    mode: merge\n"
        ).replace(
            "        from: company_name\n",
            "        from: company_name\n        type: text\n        mask: partial\n",
        ),
        head=HEAD.replace("version: 1", "version: 2"),
    )
    problems = fail(tmp_path, text)
    assert at(problems, "version").message == "expected 1; found an integer (2)"
    assert (
        "expected one of: upsert, insert, update; found a string ('merge')"
        in at(problems, "entities[0].mode").message
    )
    kind = at(problems, "entities[0].fields.name.type")
    assert "expected one of: string, integer, decimal, float, boolean, date, timestamp" in kind.message
    assert_at(kind, text, "type: text")
    assert "expected one of: full, last4, email, none" in at(problems, "entities[0].fields.name.mask").message


def test_names_must_be_identifiers(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("name: accounts", "name: 1accounts"),
        head=HEAD.replace("  export:\n", "  my-export:\n").replace("name: test-mapping", "name: 'my map'"),
    )
    problems = fail(tmp_path, text)
    source = at(problems, "sources.my-export")  # points at the offending key itself
    assert_at(source, text, "my-export")
    assert "`my-export` is not a valid name: expected a name of letters, digits and `_`" in source.message
    assert (
        "does not start with a digit; found a string ('1accounts')"
        in at(problems, "entities[0].name").message
    )
    assert "found a string ('my map')" in at(problems, "name").message


def test_field_needs_exactly_one_of_from_and_value(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS + "      both:\n        from: a\n        value: b\n      neither:\n        type: string\n"
    )
    problems = fail(tmp_path, text)
    both = at(problems, "entities[0].fields.both")
    assert both.message.startswith("has both `from` and `value`; expected exactly one")
    assert_at(both, text, "both:")
    neither = at(problems, "entities[0].fields.neither")
    assert neither.message.startswith("has neither `from` nor `value`; expected exactly one")
    assert len(problems) == 2


def test_a_field_that_is_not_an_object(tmp_path: Path) -> None:
    (problem,) = fail(tmp_path, mapping(ACCOUNTS + "      city: town\n"))
    assert problem.path == "entities[0].fields.city"
    assert problem.message == "expected an object, found a string ('town')"


def test_entity_with_both_table_and_query(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS.replace("    table: customers\n", "    table: customers\n    query: SELECT 1\n"))
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0]" and problem.message == "expected either `table` or `query`, not both"
    assert_at(problem, text, "name: accounts")


def test_column_declarations_are_explained_by_their_form(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace(
            "    target: crm\n",
            """\
    columns:
      cust_id: int
      company_name: {type: string, tz: UTC}
      created: {timezone: UTC}
    target: crm
""",
        )
    )
    problems = fail(tmp_path, text)
    assert "expected one of: string, integer, decimal" in at(problems, "entities[0].columns.cust_id").message
    assert "found a string ('int')" in at(problems, "entities[0].columns.cust_id").message
    unknown = at(problems, "entities[0].columns.company_name.tz")
    assert unknown.message == "unknown key `tz`; expected one of: timezone, type"
    assert_at(unknown, text, "tz: UTC")
    assert at(problems, "entities[0].columns.created").message == "missing required key `type`"


def test_transform_steps_of_the_wrong_shape(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("from: company_name", "from: company_name\n        transform: [5, {a: 1, b: 2}]")
    )
    problems = fail(tmp_path, text)
    assert (
        "expected a transform name or a one-key object"
        in at(problems, "entities[0].fields.name.transform[0]").message
    )
    two = at(problems, "entities[0].fields.name.transform[1]")
    assert two.message == "expected a one-key object `{transform: argument}`; found 2 keys (`a`, `b`)"
    assert_at(two, text, "{a: 1")


def test_empty_collections(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("key: cust_id", "key: []"),
        head=HEAD.replace("targets:\n  crm:\n    type: sql\n    url: sqlite:///crm.db\n", "targets: {}\n"),
    )
    problems = fail(tmp_path, text)
    assert at(problems, "targets").message == "expected at least one entry; found none"
    assert at(problems, "entities[0].key").message == "expected at least one item; found an empty list"


# --- meaning: sources, targets, connectors -----------------------------------------------------------------


def test_unknown_source_and_target_names(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("source: legacy", "source: legacy_db").replace("target: crm", "target: crmm")
    )
    problems = fail(tmp_path, text)
    source = at(problems, "entities[0].source")
    assert (
        source.message
        == "unknown source `legacy_db` (did you mean `legacy`?); expected one of: export, legacy"
    )
    assert_at(source, text, "source: legacy_db")
    target = at(problems, "entities[0].target")
    assert target.message == "unknown target `crmm` (did you mean `crm`?); expected one of: crm"


def test_unknown_connector_type(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS, head=HEAD.replace("type: csv", "type: xml"))
    (problem,) = fail(tmp_path, text)
    assert problem.path == "sources.export.type"
    assert problem.message == ("unknown connector `xml`; expected one of: csv, excel, jsonl, parquet, salesforce, "
                               "soap, sql")
    assert_at(problem, text, "type: xml")


def test_connection_options_are_checked_per_connector_type(tmp_path: Path) -> None:
    head = HEAD.replace(
        "    path: data/export.csv\n",
        "    path: data/export.csv\n    encodng: gb18030\n    sheet: 2\n    url: x\n",
    )
    head = head.replace("    url: sqlite:///legacy.db\n", "    schema: crm\n")
    text = mapping(ACCOUNTS, head=head)
    problems = fail(tmp_path, text)
    typo = at(problems, "sources.export.encodng")
    assert typo.message.startswith(
        "unknown key `encodng` (did you mean `encoding`?); a csv connection takes: type, "
    )
    assert_at(typo, text, "encodng")
    assert at(problems, "sources.export.sheet").message.startswith(
        "`sheet` does not apply to a csv connection"
    )
    assert "`url` does not apply to a csv connection" in at(problems, "sources.export.url").message
    missing = at(problems, "sources.legacy")
    assert missing.message == "missing required key `url` (a sql connection needs it)"
    assert_at(missing, text, "legacy:")


def test_unknown_text_encoding(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS, head=HEAD.replace("path: data/export.csv", "path: data/export.csv\n    encoding: utf-9")
    )
    (problem,) = fail(tmp_path, text)
    assert problem.path == "sources.export.encoding" and "unknown text encoding `utf-9`" in problem.message


def test_a_file_cannot_be_a_target(tmp_path: Path) -> None:
    head = HEAD.replace("targets:\n", "targets:\n  dump:\n    type: csv\n    path: out.csv\n")
    (problem,) = fail(tmp_path, mapping(ACCOUNTS, head=head))
    assert problem.path == "targets.dump.type"
    assert problem.message == "a csv connection cannot be written; expected a target of type: salesforce, soap, sql"


def test_connection_options_table_matches_the_schema_and_the_connectors() -> None:
    schema_options = set(load_schema("mapping")["$defs"]["connection"]["properties"]) - {"type"}
    table_options = {option for options in CONNECTION_OPTIONS.values() for option in options}
    assert table_options == schema_options
    read = set()
    for module in (REPO / "connectors").glob("*.py"):
        read |= set(re.findall(r"options\.get\(\"(\w+)\"", module.read_text(encoding="utf-8")))
    assert read, "no connector reads options any more: update this test"
    assert read <= table_options, f"options read by connectors but not validated: {read - table_options}"


def test_sql_source_entity_needs_table_or_query(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS.replace("    table: customers\n", ""))
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0]"
    assert problem.message.startswith("missing `table` or `query`: source `legacy` is sql")
    assert_at(problem, text, "name: accounts")


def test_table_on_a_csv_source(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS.replace("source: legacy", "source: export"))
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].table"
    assert problem.message.startswith("`table`/`query` only apply to sql sources; `export` is a csv file")
    assert_at(problem, text, "table: customers")


# --- meaning: columns, keys, fields --------------------------------------------------------------------


COLUMNS = """\
    columns:
      cust_id: integer
      company_name: string
      created_at: timestamp
"""


def test_unknown_source_column_and_undeclared_key(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("key: cust_id", "key: customer_id")
        .replace(
            "    target: crm\n", COLUMNS.replace("      created_at: timestamp\n", "") + "    target: crm\n"
        )
        .replace("from: company_name", "from: company")
    )
    problems = fail(tmp_path, text)
    key = at(problems, "entities[0].key")
    assert key.message == (
        "key column `customer_id` is not among the declared `columns`; expected one of: cust_id, company_name"
    )
    assert_at(key, text, "key: customer_id")
    column = at(problems, "entities[0].fields.name.from")
    assert column.message == (
        "unknown source column `company` (did you mean `company_name`?); expected one of "
        "the declared `columns`: cust_id, company_name"
    )
    assert_at(column, text, "from: company")


def test_compound_key_points_at_the_undeclared_part(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("key: cust_id", "key: [cust_id, branch, cust_id]").replace(
            "    target: crm\n", "    columns: {cust_id: integer, company_name: string}\n    target: crm\n"
        )
    )
    problems = fail(tmp_path, text)
    branch = at(problems, "entities[0].key[1]")
    assert "`branch` is not among the declared `columns`" in branch.message
    assert_at(branch, text, "branch")
    assert "listed twice" in at(problems, "entities[0].key[2]").message


def test_external_id_column_cannot_be_a_field(tmp_path: Path) -> None:
    (problem,) = fail(tmp_path, mapping(ACCOUNTS + "      external_id:\n        from: cust_id\n"))
    assert problem.path == "entities[0].fields.external_id" and "external id column" in problem.message


def test_pattern_and_max_length_only_on_string_fields(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS + "      credit:\n        from: credit\n        type: decimal\n"
        "        pattern: '\\d+'\n        max_length: 10\n"
    )
    problems = fail(tmp_path, text)
    assert at(problems, "entities[0].fields.credit.pattern").message.startswith(
        "`pattern` is checked on string fields only; this field is decimal"
    )
    assert at(problems, "entities[0].fields.credit.max_length")


def test_bad_pattern_regex(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS.replace("from: company_name", "from: company_name\n        pattern: '[A-Z'"))
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields.name.pattern"
    assert problem.message.startswith("expected a valid regular expression (unterminated character set")
    assert_at(problem, text, "pattern:")


def test_constants_must_fit_their_type(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS + "      priority:\n        value: high\n        type: integer\n"
        "      active:\n        value: yes\n        type: boolean\n"
    )
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields.priority.value"
    assert (
        problem.message
        == "expected a constant of type integer; found a string ('high'), which does not convert"
    )


# --- transforms -----------------------------------------------------------------------------------------


def test_unknown_transform_points_at_the_list_item(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace(
            "from: company_name",
            "from: company_name\n        transform:\n"
            "          - trim\n          - lower\n          - titel\n",
        )
    )
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields.name.transform[2]"
    assert problem.message.startswith("unknown transform `titel` (did you mean `title`?); expected one of: ")
    for name in transforms.registry():
        assert name in problem.message
    assert_at(problem, text, "titel")


def test_transform_arguments(tmp_path: Path) -> None:
    steps = [
        "default",  # needs an argument
        "{trim: yes}",  # takes none
        "{replace: {pattern: '(', with: ''}}",  # invalid regular expression
        "{replace: {pattern: 'a'}}",  # missing `with`
        "{replace: {pattern: 'a', with: }}",  # `with` left empty (null)
        "{replace: {pattern: 'a', with: '\\2'}}",  # group that does not exist
        "{default: [1, 2]}",  # not a scalar
        "{replace: 'a'}",
    ]
    text = mapping(
        ACCOUNTS.replace(
            "from: company_name", "from: company_name\n        transform: [" + ", ".join(steps) + "]"
        )
    )
    problems = fail(tmp_path, text)
    assert len(problems) == len(steps)
    base = "entities[0].fields.name.transform"
    expected = [
        "transform `default` needs an argument; expected `{default: ...}`",
        "transform `trim` takes no argument; expected a plain `trim`",
        "transform `replace` expects a valid regular expression in `pattern` (missing ), unterminated",
        "transform `replace` expects an object with `pattern` (a regular expression) and `with` (the "
        "replacement text); found keys: `pattern`",
        "transform `replace` expects a text in `with` (write `with: ''` to delete the matches)",
        "transform `replace` expects a valid replacement in `with` (invalid group reference 2",
        "transform `default` expects a text, number or boolean as its argument; found a list",
        "transform `replace` expects an object with `pattern`",
    ]
    for i, (step, message) in enumerate(zip(steps, expected, strict=True)):
        problem = at(problems, f"{base}[{i}]")
        assert problem.message.startswith(message), problem.message
        assert_at(problem, text, step)


def test_valid_transform_arguments_load(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace(
            "from: company_name",
            "from: company_name\n        transform: [trim, "
            "{default: unknown}, {replace: {pattern: '(\\w+) (\\w+)', with: '\\2 \\1'}}]",
        )
    )
    steps = ok(tmp_path, text).entity("accounts").fields["name"].transforms
    assert [s.name for s in steps] == ["trim", "default", "replace"]
    assert steps[2].argument == {"pattern": r"(\w+) (\w+)", "with": r"\2 \1"}
    assert steps[2].path == "entities[0].fields.name.transform[2]"


# --- references -----------------------------------------------------------------------------------------


CONTACTS = """\
  - name: contacts
    source: legacy
    table: contacts
    key: contact_id
    target: crm
    target_table: contact
    fields:
      account_id:
        from: cust_id
        ref: accounts
"""


def test_references(tmp_path: Path) -> None:
    head = HEAD.replace("targets:\n", "targets:\n  other:\n    type: sql\n    url: sqlite:///other.db\n")
    text = mapping(
        ACCOUNTS.replace("target: crm", "target: other"),
        CONTACTS
        + """\
      owner_id:
        from: owner
        ref: users
      parent_id:
        value: 1
        ref: contacts
""",
        head=head,
    )
    problems = fail(tmp_path, text)
    across = at(problems, "entities[1].fields.account_id.ref")
    assert across.message == (
        "entity `accounts` loads into target `other`, this one into `crm`; expected a "
        "reference within one target"
    )
    assert_at(across, text, "ref: accounts")
    unknown = at(problems, "entities[1].fields.owner_id.ref")
    assert unknown.message == "unknown entity `users`; expected one of: accounts, contacts"
    no_from = at(problems, "entities[1].fields.parent_id")
    assert no_from.message == "a `ref` field needs `from`: the source column holding the parent's key"


def test_a_reference_cycle_is_named(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS + "      main_contact:\n        from: contact_id\n        ref: contacts\n", CONTACTS
    )
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[1].fields.account_id.ref"
    assert problem.message.startswith("entity references form a cycle: accounts -> contacts -> accounts")
    assert_at(problem, text, "ref: accounts")


def test_a_self_reference_is_a_cycle(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS + "      parent_id:\n        from: parent_cust_id\n        ref: accounts\n")
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields.parent_id.ref"
    assert problem.message.startswith(
        "entity references form a cycle: accounts -> accounts (this `ref` refers to itself)"
    )


def test_duplicate_entity_names(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS, ACCOUNTS)
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[1].name"
    assert problem.message == "duplicate entity name `accounts` (also entities[0]); expected unique names"
    assert_at(problem, text, "name: accounts", nth=1)


def test_references_load_parents_first(tmp_path: Path) -> None:
    loaded = ok(tmp_path, mapping(CONTACTS, ACCOUNTS))
    assert [e.name for e in loaded.load_order()] == ["accounts", "contacts"]


# --- time zones -----------------------------------------------------------------------------------------


def _with_timestamps(settings: str = "", source_tz: str = "", column: str = "created_at: timestamp") -> str:
    head = HEAD
    if settings:
        head = head.replace("version: 1\n", f"version: 1\nsettings:\n  timezone: {settings}\n")
    if source_tz:
        head = head.replace(
            "    url: sqlite:///legacy.db\n", f"    url: sqlite:///legacy.db\n    timezone: {source_tz}\n"
        )
    columns = f"    columns:\n      cust_id: integer\n      company_name: string\n      {column}\n"
    return mapping(
        ACCOUNTS.replace("    target: crm\n", columns + "    target: crm\n")
        + "      created:\n        from: created_at\n        type: timestamp\n",
        head=head,
    )


def test_naive_timestamps_without_any_time_zone_are_errors(tmp_path: Path) -> None:
    text = _with_timestamps()
    problems = fail(tmp_path, text)
    column = at(problems, "entities[0].columns.created_at")
    assert column.message == (
        "naive timestamp column `created_at` has no time zone; expected `timezone` on the "
        "column, on the source, or in settings"
    )
    assert_at(column, text, "created_at: timestamp")
    field = at(problems, "entities[0].fields.created.type")
    assert field.message.startswith("timestamp field reads `created_at`, which has no declared time zone")
    assert_at(field, text, "type: timestamp")


def test_a_timestamp_field_without_declared_columns_needs_a_time_zone(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS + "      created:\n        from: created_at\n        type: timestamp\n")
    (problem,) = fail(tmp_path, text)
    assert problem.path == "entities[0].fields.created.type"
    ok(tmp_path, text.replace("version: 1\n", "version: 1\nsettings: {timezone: Europe/Berlin}\n"))


@pytest.mark.parametrize("where", ["column", "source", "settings"])
def test_a_time_zone_anywhere_in_the_chain_is_enough(tmp_path: Path, where: str) -> None:
    text = {
        "column": _with_timestamps(column="created_at: {type: timestamp, timezone: Asia/Shanghai}"),
        "source": _with_timestamps(source_tz="Asia/Shanghai"),
        "settings": _with_timestamps(settings="Asia/Shanghai"),
    }[where]
    loaded = ok(tmp_path, text)
    entity = loaded.entity("accounts")
    assert loaded.timezone_for(entity, "created_at") == "Asia/Shanghai"


def test_a_timestamp_constant_with_an_offset_needs_no_time_zone(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS + "      migrated_at:\n        value: '2024-05-01T08:00:00+08:00'\n        type: timestamp\n"
    )
    ok(tmp_path, text)
    (problem,) = fail(tmp_path, text.replace("+08:00", ""))
    assert "is a constant that has no declared time zone" in problem.message


def test_unknown_iana_time_zones(tmp_path: Path) -> None:
    text = _with_timestamps(
        settings="Mars/Olympus", source_tz="Beijing", column="created_at: {type: timestamp, timezone: CET+8}"
    )
    problems = fail(tmp_path, text)
    for path, zone in (
        ("settings.timezone", "Mars/Olympus"),
        ("sources.legacy.timezone", "Beijing"),
        ("entities[0].columns.created_at.timezone", "CET+8"),
    ):
        problem = at(problems, path)
        assert problem.message.startswith(f"unknown time zone `{zone}`; expected an IANA name")
        assert_at(problem, text, "timezone: " + zone)


# --- ${ENV} ---------------------------------------------------------------------------------------------

ENV_HEAD = HEAD.replace("    url: sqlite:///crm.db\n", "    url: ${CRM_DB_URL}\n")


def test_a_missing_variable_is_named_with_path_and_line(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS, head=ENV_HEAD)
    (problem,) = fail(tmp_path, text)
    assert problem.path == "targets.crm.url"
    assert problem.message.startswith("environment variable `CRM_DB_URL` is not set")
    assert ".env" in problem.message
    assert_at(problem, text, "url: ${CRM_DB_URL}")


def test_every_missing_variable_is_reported(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS, head=HEAD.replace("sqlite:///crm.db", "postgresql://${DB_USER}:${DB_PASSWORD}@db/crm")
    )
    problems = fail(tmp_path, text, env={})
    assert [p.message.split(";")[0] for p in problems] == [
        "environment variable `DB_USER` is not set",
        "environment variable `DB_PASSWORD` is not set",
    ]
    assert {p.path for p in problems} == {"targets.crm.url"}


def test_variables_are_interpolated(tmp_path: Path) -> None:
    loaded = ok(tmp_path, mapping(ACCOUNTS, head=ENV_HEAD), env={"CRM_DB_URL": "sqlite:///from-env.db"})
    assert loaded.targets["crm"].options["url"] == "sqlite:///from-env.db"
    assert "sqlite:///from-env.db" in loaded.secrets


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "sqlite:///fallback.db"),
        ({"CRM_DB_URL": ""}, "sqlite:///fallback.db"),
        ({"CRM_DB_URL": "sqlite:///set.db"}, "sqlite:///set.db"),
    ],
)
def test_a_default_is_used_when_the_variable_is_unset_or_empty(tmp_path: Path, env, expected) -> None:
    text = mapping(ACCOUNTS, head=HEAD.replace("sqlite:///crm.db", "${CRM_DB_URL:-sqlite:///fallback.db}"))
    assert ok(tmp_path, text, env=env).targets["crm"].options["url"] == expected


def test_interpolate_rules() -> None:
    secrets: set[str] = set()
    assert interpolate("a-${X}-${Y:-y}-${Z:-}", {"X": "x"}, secrets) == "a-x-y-"
    assert secrets == {"x"}
    assert interpolate(["${X}", {"k": "${X}"}, 5], {"X": "1"}, set()) == ["1", {"k": "1"}, 5]
    assert interpolate("${not a var} $X {X}", {}, set()) == "${not a var} $X {X}"


def test_a_dotenv_file_next_to_the_mapping_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# secrets\nCRM_DB_URL=sqlite:///from-dotenv.db\n", encoding="utf-8")
    text = mapping(ACCOUNTS, head=ENV_HEAD)
    assert ok(tmp_path, text).targets["crm"].options["url"] == "sqlite:///from-dotenv.db"
    # the environment wins over .env
    overridden = ok(tmp_path, text, env={"CRM_DB_URL": "sqlite:///from-env.db"})
    assert overridden.targets["crm"].options["url"] == "sqlite:///from-env.db"


def test_interpolated_values_must_fit_the_schema(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS, head=HEAD.replace("path: data/export.csv", "path: data/export.csv\n    delimiter: ${SEP}")
    )
    (problem,) = fail(tmp_path, text, env={"SEP": "|||"})
    assert problem.path == "sources.export.delimiter"
    assert (
        problem.message
        == "expected a single character; found a string ('***') (after `${...}` interpolation)"
    )
    assert ok(tmp_path, text, env={"SEP": ";"}).sources["export"].options["delimiter"] == ";"


def test_flow_style_needs_quotes_around_variables(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS,
        head=HEAD.replace(
            "  crm:\n    type: sql\n    url: sqlite:///crm.db\n", "  crm: {type: sql, url: ${CRM_DB_URL}}\n"
        ),
    )
    (problem,) = fail(tmp_path, text, env={"CRM_DB_URL": "sqlite:///x.db"})
    assert problem.message.startswith("invalid YAML") and problem.line == position(text, "${CRM")[0]
    ok(tmp_path, text.replace("${CRM_DB_URL}", "'${CRM_DB_URL}'"), env={"CRM_DB_URL": "sqlite:///x.db"})


# --- secrets never leak ---------------------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-horse"


def test_interpolated_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    head = HEAD.replace("    type: csv\n", "    type: ${EXPORT_KIND}\n").replace(
        "    url: sqlite:///crm.db\n", "    url: sqlite:///crm.db\n    timezone: ${CRM_ZONE}\n"
    )
    text = mapping(
        ACCOUNTS.replace("from: company_name", "from: company_name\n        pattern: '${NAME_RULE}'"),
        head=head,
    )
    env = {
        "EXPORT_KIND": f"postgresql://app:{PASSWORD}@db.internal/crm",
        "CRM_ZONE": "zone-" + PASSWORD,
        "NAME_RULE": "[" + PASSWORD,
    }
    problems = fail(tmp_path, text, env=env)
    assert {p.path for p in problems} == {
        "sources.export.type",
        "targets.crm.timezone",
        "entities[0].fields.name.pattern",
    }
    rendered = str(MappingError(problems))
    for value in (PASSWORD, *env.values()):
        assert value not in rendered
    assert REDACTED in rendered


def test_a_literal_url_password_is_redacted_in_errors(tmp_path: Path) -> None:
    text = mapping(ACCOUNTS, head=HEAD.replace("type: csv", f"type: 'postgresql://app:{PASSWORD}@db/crm'"))
    (problem,) = fail(tmp_path, text)
    assert PASSWORD not in str(problem)
    assert "postgresql://app:***@db/crm" in problem.message


def test_a_loaded_mappings_secrets_are_redacted(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS, head=HEAD.replace("sqlite:///crm.db", "postgresql://app:${DB_PASSWORD}@db.internal/crm")
    )
    loaded = ok(tmp_path, text, env={"DB_PASSWORD": PASSWORD})
    url = loaded.targets["crm"].options["url"]
    assert PASSWORD in url  # the connector needs the real value
    redact = Redactor(loaded.secrets)
    for message in (f"cannot connect to {url}", f"authentication failed, password {PASSWORD!r}"):
        assert PASSWORD not in redact(message)
    assert redact(f"cannot connect to {url}") == "cannot connect to postgresql://app:***@db.internal/crm"


def test_the_redactor_hides_secrets_and_url_passwords() -> None:
    redact = Redactor({PASSWORD, "ab"})
    assert redact(f"login with {PASSWORD} failed") == "login with *** failed"
    assert (
        redact("cannot connect to mysql://root:other@127.0.0.1/x")
        == "cannot connect to mysql://root:***@127.0.0.1/x"
    )
    assert PASSWORD not in redact(
        f"postgresql://app:{PASSWORD.replace('&', '%26')}@db/crm"
    )  # URL-encoded form
    assert redact("ab stays: too short to be a secret") == "ab stays: too short to be a secret"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/crm", "postgresql://app:***@db:5432/crm"),
        ("postgresql+psycopg://app:p@ss@db/crm and more", "postgresql+psycopg://app:***@db/crm and more"),
        ("failed: `mysql://u:pw@h/d` (timeout)", "failed: `mysql://u:***@h/d` (timeout)"),
        ("a postgresql://a:1@h1 b mysql://b:2@h2", "a postgresql://a:***@h1 b mysql://b:***@h2"),
        ("sqlite:///data/legacy.db", "sqlite:///data/legacy.db"),
        ("http://host:8080/path", "http://host:8080/path"),
        ("user:password@host without a scheme", "user:password@host without a scheme"),
    ],
)
def test_redact_url_password(text: str, expected: str) -> None:
    assert redact_url_password(text) == expected


# --- everything at once ---------------------------------------------------------------------------------


def test_many_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = mapping(
        ACCOUNTS.replace("source: legacy", "source: nowhere").replace(
            "from: company_name",
            "from: company_name\n        transform: [trim, lower, shout]\n        mask: blur",
        ),
        CONTACTS.replace("ref: accounts", "ref: account"),
    )
    # schema problems stop before meaning is checked: first the mask, alone
    problems = fail(tmp_path, text)
    assert [p.path for p in problems] == ["entities[0].fields.name.mask"]
    problems = fail(tmp_path, text.replace("        mask: blur\n", ""))
    assert {p.path for p in problems} == {
        "entities[0].source",
        "entities[0].fields.name.transform[2]",
        "entities[1].fields.account_id.ref",
    }
    message = str(MappingError(problems))
    assert message.startswith("3 problems in the mapping:")
    assert all(
        re.search(r"mapping\.yaml:\d+:\d+ at entities\[\d\]", line) for line in message.splitlines()[1:]
    )


def test_ref_to_a_parent_keyed_by_its_external_id_must_be_text(tmp_path: Path) -> None:
    child = """
        name: contacts
        source: legacy
        table: contacts
        key: id
        target: crm
        target_table: contact
        fields:
          account:
            from: cust_id
            ref: accounts
            type: integer
    """
    text = mapping(ACCOUNTS, child)
    problem = at(fail(tmp_path, text), "entities[1].fields.account.type")
    assert "referenced by its external id" in problem.message and "target_key" in problem.message
    # With an integer target key on the parent, an integer reference is right.
    parent = ACCOUNTS.replace("    target_table: account\n", "    target_table: account\n    target_key: id\n")
    assert ok(tmp_path, mapping(parent, child)).entity("contacts").fields["account"].type == "integer"
