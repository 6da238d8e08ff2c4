"""The mapping reference (docs/mapping.md) stays in step with the schema, the loader and the transforms.

Conventions the reference states at its top and these tests hold it to:
- every key has a heading that is its path in backticks (`entities[].fields.*.transform`);
- every key heading has a ```yaml example before the next heading;
- a ```yaml block whose first line is `# schema: <part> [partial]` is a fragment, valid for that part of
  the schema (`mapping` or a `$defs` name; `partial` drops that part's own required keys); every other
  ```yaml block is a complete mapping and must load.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from jsonschema import Draft202012Validator

from crmbridge.errors import MappingError
from crmbridge.mappings import load_mapping, transforms
from crmbridge.mappings.cleanse import EXTERNAL_ID_NAMESPACE, external_id
from crmbridge.mappings.envvars import variables_in
from crmbridge.mappings.loader import CONNECTION_OPTIONS, REQUIRED_OPTIONS
from crmbridge.masking import mask_value
from crmbridge.schemas import load_schema

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "mapping.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
SCHEMA = load_schema("mapping")

HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$", re.M)
KEY_HEADING = re.compile(r"^#{2,6} `([^`]+)`\s*$", re.M)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
FRAGMENT = re.compile(r"# schema: (\w+)( partial)?\s*$")

REASON_CODES = [
    "missing_key",
    "required_missing",
    "invalid_type",
    "pattern_mismatch",
    "too_long",
    "duplicate_key",
    "malformed_row",
    "unresolved_reference",
    "not_in_target",
    "target_rejected",
    "invalid_phone",
    "invalid_email",
    "invalid_date",
    "invalid_number",
    "invalid_boolean",
    "invalid_country",
    "invalid_postal_code",
    "invalid_id",
    "invalid_checksum",
    "unmapped_value",
    "not_in_enum",
    "out_of_range",
    "wrong_length",
    "not_unique",
    "reference_missing",
    "survivor_not_loaded",
]


# --- the schema's keys ----------------------------------------------------------------------------------


def _resolve(node: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    ref = node.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        return SCHEMA["$defs"][name], name
    return node, None


def schema_key_paths() -> dict[str, str]:
    """Every property of the schema, by its documented path -> the part ($def or `mapping`) it belongs to.

    Walks properties, items, additionalProperties and oneOf/anyOf/allOf branches from the top. A $def's
    keys are documented once, where the walk first meets it (`sources.*`, not again under `targets.*`).
    """
    found: dict[str, str] = {}
    seen: set[str] = set()

    def walk(node: dict[str, Any], path: str, part: str) -> None:
        node, name = _resolve(node)
        if name is not None:
            if name in seen:
                return
            seen.add(name)
            part = name
        for key, sub in node.get("properties", {}).items():
            child = f"{path}.{key}" if path else key
            found[child] = part
            walk(sub, child, part)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*", part)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", part)
        for combinator in ("oneOf", "anyOf", "allOf"):
            for option in node.get(combinator, []):
                walk(option, path, part)

    walk(SCHEMA, "", "mapping")
    return found


def all_property_names(node: Any) -> set[str]:
    """Every property name defined anywhere in the schema, $defs included."""
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                names |= set(value)
            names |= all_property_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= all_property_names(value)
    return names


def all_enum_values(node: Any) -> set[str]:
    values: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "enum" and isinstance(value, list):  # not the `enum` rule's own schema
                values |= {str(v) for v in value}
            else:
                values |= all_enum_values(value)
    elif isinstance(node, list):
        for value in node:
            values |= all_enum_values(value)
    return values


def documented_keys() -> list[str]:
    return KEY_HEADING.findall(DOC)


def test_the_walk_finds_the_schema_keys() -> None:
    paths = schema_key_paths()
    assert {
        "version",
        "settings.timezone",
        "sources.*.url",
        "entities[].key",
        "entities[].columns.*.timezone",
        "entities[].fields.*.transform",
        "entities[].fields.*.mask",
    } <= set(paths)
    assert {path.rsplit(".", 1)[-1] for path in paths} == all_property_names(SCHEMA)


def test_every_schema_key_has_a_heading() -> None:
    documented = set(documented_keys())
    missing = [path for path in schema_key_paths() if path not in documented]
    assert not missing, f"keys of the schema without a `### \\`path\\`` heading in {DOC_PATH.name}: {missing}"


def test_every_property_name_is_documented() -> None:
    names = {path.rsplit(".", 1)[-1] for path in documented_keys()}
    assert all_property_names(SCHEMA) <= names


def test_every_key_heading_is_a_schema_key_and_appears_once() -> None:
    headings = documented_keys()
    paths = schema_key_paths()
    assert [h for h in headings if h not in paths] == [], "documented keys the schema does not have"
    assert len(headings) == len(set(headings)), "a key is documented twice"


def _sections() -> list[tuple[str, str]]:
    """(heading text, body up to the next heading) for every heading."""
    marks = list(HEADING.finditer(DOC))
    # headings inside code blocks are not headings
    fences = [m.start() for m in re.finditer(r"^```", DOC, re.M)]
    spans = list(zip(fences[::2], fences[1::2], strict=True))
    marks = [m for m in marks if not any(a < m.start() < b for a, b in spans)]
    return [
        (m.group(2), DOC[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(DOC)])
        for i, m in enumerate(marks)
    ]


def test_every_key_has_a_yaml_example() -> None:
    without = [
        title for title, body in _sections() if KEY_HEADING.match(f"### {title}") and "```yaml\n" not in body
    ]
    assert not without, f"key headings without a ```yaml example: {without}"


def test_every_enum_value_and_connector_type_is_documented() -> None:
    for value in sorted(all_enum_values(SCHEMA) | set(CONNECTION_OPTIONS)):
        assert f"`{value}`" in DOC, f"`{value}` is not documented"


def test_doc_states_its_conventions() -> None:
    intro = DOC[: DOC.index("\n## ")]
    assert "`# schema: <part>`" in intro and "partial" in intro and "`entities[].fields.*.transform`" in intro


# --- the examples ---------------------------------------------------------------------------------------


def yaml_blocks() -> list[tuple[int, str]]:
    return [(DOC.count("\n", 0, m.start()) + 1, m.group(1)) for m in YAML_BLOCK.finditer(DOC)]


def fragment_validator(part: str, partial: bool) -> Draft202012Validator:
    if part == "mapping":
        schema = {k: v for k, v in SCHEMA.items() if k not in ("$defs", "$id", "$schema")}
    else:
        assert part in SCHEMA["$defs"], f"`# schema: {part}` names no part of the schema"
        schema = copy.deepcopy(SCHEMA["$defs"][part])
    schema = copy.deepcopy(schema)
    if partial:
        schema.pop("required", None)
    return Draft202012Validator({**schema, "$defs": SCHEMA["$defs"]})


def test_there_are_complete_examples_and_fragments() -> None:
    blocks = [text for _, text in yaml_blocks()]
    complete = [b for b in blocks if not FRAGMENT.match(b.split("\n", 1)[0])]
    assert len(complete) >= 1 and len(blocks) - len(complete) >= 40


@pytest.mark.parametrize(("line", "text"), yaml_blocks(), ids=[f"line{line}" for line, _ in yaml_blocks()])
def test_yaml_examples_are_valid(line: int, text: str, tmp_path: Path) -> None:
    first = text.split("\n", 1)[0]
    fragment = FRAGMENT.match(first)
    if fragment:
        data = yaml.safe_load(text)
        assert data is not None, f"docs/mapping.md:{line}: empty fragment"
        errors = [
            f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in fragment_validator(fragment.group(1), bool(fragment.group(2))).iter_errors(data)
        ]
        assert not errors, f"docs/mapping.md:{line}: fragment is not a valid {fragment.group(1)}: {errors}"
        return
    assert re.search(r"^version:", text, re.M), (
        f"docs/mapping.md:{line}: a yaml block must be a complete mapping (with `version:`) or start with "
        "`# schema: <part>`"
    )
    path = tmp_path / "mapping.yaml"
    path.write_text(text, encoding="utf-8")
    env = {name: f"value-of-{name}" for name in variables_in(text)}
    try:
        load_mapping(path, env=env)
    except MappingError as error:
        pytest.fail(f"docs/mapping.md:{line}: the complete example does not load:\n{error}")


# --- tables that must match the code --------------------------------------------------------------------


def table_rows(header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header`, as lists of cell texts."""
    start = DOC.index(header)
    lines = DOC[start:].splitlines()
    rows = []
    for row in lines[2:]:
        if not row.startswith("|"):
            break
        rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
    return rows


def code(cell: str) -> str:
    found = re.fullmatch(r"`(.*)`", cell)
    assert found, f"expected a cell in backticks, found {cell!r}"
    return found.group(1)


def test_every_transform_is_documented_with_a_working_example() -> None:
    rows = table_rows("| Transform | Step | Value | Result |")
    documented = [code(row[0]) for row in rows]
    assert sorted(documented) == sorted(transforms.registry()), "the transforms table and the registry differ"
    for name, step_cell, value_cell, result_cell, *_ in rows:
        name, step = code(name), yaml.safe_load(code(step_cell))
        step_name, argument = (step, None) if isinstance(step, str) else next(iter(step.items()))
        assert step_name == name
        transform = transforms.registry()[name]
        if transform.validate_argument:
            assert transform.validate_argument(argument) is None
        value, expected = yaml.safe_load(code(value_cell)), yaml.safe_load(code(result_cell))
        result = transforms.apply(pd.Series([value], dtype=object), name, argument).iloc[0]
        result = None if pd.isna(result) else result
        assert result == expected, f"{name}: {value!r} gives {result!r}, the reference says {expected!r}"


def test_the_connection_options_table_matches_the_loader() -> None:
    header = DOC[DOC.index("| Option | sql |"):].split("\n", 1)[0]
    kinds = [cell.strip() for cell in header.strip().strip("|").split("|")][1:]  # every connector kind column
    rows = table_rows("| Option | sql |")
    assert sorted(kinds) == sorted(CONNECTION_OPTIONS)
    documented: dict[str, set[str]] = {kind: set() for kind in kinds}
    required: dict[str, set[str]] = {kind: set() for kind in kinds}
    for option, *cells in rows:
        for kind, cell in zip(kinds, cells, strict=True):
            if cell:
                documented[kind].add(code(option))
            if cell == "required":
                required[kind].add(code(option))
    assert documented == {kind: set(options) for kind, options in CONNECTION_OPTIONS.items()}
    assert required == {kind: set(REQUIRED_OPTIONS.get(kind, ())) for kind in kinds}


def test_every_quarantine_reason_code_is_documented() -> None:
    rows = table_rows("| Code | Stage | Meaning |")
    assert sorted(code(row[0]) for row in rows) == sorted(REASON_CODES)


def test_the_mask_examples_match_masking() -> None:
    rows = table_rows("| Mask | Value | Shown as |")
    assert sorted(code(row[0]) for row in rows) == sorted(
        SCHEMA["$defs"]["field"]["properties"]["mask"]["enum"]
    )
    for mask, value, shown in rows:
        assert mask_value(code(value), code(mask)) == code(shown)


def test_the_external_id_description_matches_the_code() -> None:
    assert str(EXTERNAL_ID_NAMESPACE) in DOC
    example = re.search(
        r"source `(\w+)`, entity `(\w+)`, key `(\w+)` gives\s+the external id `([0-9a-f-]+)`", DOC
    )
    assert example, "the worked external id example is missing"
    source, entity, key, expected = example.groups()
    assert external_id(source, entity, key) == expected


def test_the_schema_line_is_documented() -> None:
    assert "# yaml-language-server: $schema=" in DOC
    assert yaml_blocks()[0][1].startswith("# yaml-language-server: $schema=")
