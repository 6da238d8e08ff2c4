"""Load a mapping file: parse YAML safely, check it against the JSON Schema, interpolate `${ENV}`, then
check its meaning. Every problem found is collected, located (file, line, column, document path) and
reported together."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import yaml
from dotenv import dotenv_values
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from crmbridge.errors import MappingError, Problem
from crmbridge.mappings import transforms
from crmbridge.mappings.envvars import MissingVariable, interpolate
from crmbridge.mappings.model import (
    DEFAULT_BATCH_SIZE,
    ColumnSpec,
    Connection,
    Entity,
    FieldSpec,
    Mapping,
    TransformStep,
)
from crmbridge.mappings.yamlpos import LocatedDocument, Path as DocPath, format_path, load_located
from crmbridge.schemas import load_schema


class _Problems:
    def __init__(self, file: str, doc: LocatedDocument | None):
        self.file, self.doc, self.items = file, doc, []

    def add(self, path: DocPath, message: str) -> None:
        line, column = self.doc.locate(path) if self.doc else (None, None)
        self.items.append(Problem(self.file, line, column, format_path(path), message))


def load_mapping(path: str | Path, env: dict[str, str] | None = None) -> Mapping:
    """Load and fully validate a mapping; raises MappingError listing every problem."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise MappingError([Problem(file, None, None, "", f"cannot read the file ({error.strerror})")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MappingError([Problem(file, None, None, "", f"not UTF-8 text (byte {error.start})")]) from None
    try:
        doc = load_located(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        reason = getattr(error, "problem", None) or str(error)
        raise MappingError([Problem(file, line, col, "", f"invalid YAML: {reason}")]) from None

    problems = _Problems(file, doc)
    if not isinstance(doc.data, dict):
        problems.add((), "expected a mapping document (an object with version, name, sources, ...)")
        raise MappingError(problems.items)
    _check_schema(doc.data, problems)
    if problems.items:
        raise MappingError(problems.items)

    environment = {**_dotenv(path.parent), **(env if env is not None else os.environ)}
    secrets: set[str] = set()
    data = _interpolate(doc.data, environment, secrets, problems)
    _check_meaning(data, problems)
    if problems.items:
        raise MappingError(problems.items)
    return _build(path, raw, data, secrets)


def _dotenv(directory: Path) -> dict[str, str]:
    env_file = directory / ".env"
    if not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


# --- JSON Schema ---------------------------------------------------------------------------------------


def _check_schema(data: dict[str, Any], problems: _Problems) -> None:
    validator = Draft202012Validator(load_schema("mapping"))
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        for path, message in _explain(error):
            problems.add(path, message)


def _explain(error: ValidationError) -> list[tuple[DocPath, str]]:
    """Turn a jsonschema error into (path, message) pairs a person can act on."""
    path: DocPath = tuple(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in error.schema.get("properties", {})]
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return [((*path, key), f"unknown key `{key}`{hint}") for key in extra]
    if kind == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        name = missing[0] if missing else error.message
        return [(path, f"missing required key `{name}`")]
    if kind == "oneOf" and error.schema.get("oneOf") and "required" in str(error.schema["oneOf"]):
        return [(path, "expected exactly one of `from` (a source column) or `value` (a constant)")]
    if kind == "oneOf":
        return [(path, f"expected {_describe_options(error.schema['oneOf'])}")]
    if kind == "not" and "table" in str(error.validator_value):
        return [(path, "expected either `table` or `query`, not both")]
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [(path, f"expected {_article(expected)}, found {_kind_of(error.instance)}")]
    if kind in ("enum", "const"):
        options = error.validator_value if kind == "enum" else [error.validator_value]
        return [(path, f"expected one of: {', '.join(map(str, options))}; found {error.instance!r}")]
    if kind == "pattern":
        return [(path, f"expected a value matching {error.validator_value}; found {error.instance!r}")]
    if kind in ("minProperties", "minItems"):
        return [(path, "expected at least one entry")]
    return [(path, error.message)]


def _describe_options(options: list[dict[str, Any]]) -> str:
    kinds = []
    for option in options:
        if "$ref" in option:
            kinds.append(option["$ref"].rsplit("/", 1)[-1].replace("_", " "))
        elif "type" in option:
            kinds.append(_article(option["type"]))
    return " or ".join(kinds) or "one of the allowed forms"


def _article(kind: Any) -> str:
    kind = str(kind)
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


# --- ${ENV} -------------------------------------------------------------------------------------------


def _interpolate(data: Any, env: dict[str, str], secrets: set[str], problems: _Problems, path=()) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, env, secrets, problems, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, env, secrets, problems, (*path, i)) for i, v in enumerate(data)]
    if isinstance(data, str):
        try:
            return interpolate(data, env, secrets)
        except MissingVariable as missing:
            problems.add(path, f"environment variable `{missing.name}` is not set (set it, or add it to .env)")
            return data
    return data


# --- meaning -----------------------------------------------------------------------------------------


_TYPES_NEEDING_TZ = {"timestamp"}


def _check_meaning(data: dict[str, Any], problems: _Problems) -> None:
    from crmbridge.connectors import connector_kinds  # late: connectors import the mapping model

    kinds = connector_kinds()
    zones = available_timezones()
    for section in ("sources", "targets"):
        for name, conn in data[section].items():
            if conn["type"] not in kinds:
                problems.add(
                    (section, name, "type"),
                    f"unknown connector `{conn['type']}`; expected one of: {', '.join(sorted(kinds))}",
                )
            if conn.get("timezone") and conn["timezone"] not in zones:
                problems.add((section, name, "timezone"), f"unknown time zone `{conn['timezone']}` (IANA name)")
    default_tz = data.get("settings", {}).get("timezone")
    if default_tz and default_tz not in zones:
        problems.add(("settings", "timezone"), f"unknown time zone `{default_tz}` (IANA name)")

    names: dict[str, int] = {}
    for i, entity in enumerate(data["entities"]):
        if entity["name"] in names:
            problems.add(("entities", i, "name"), f"duplicate entity name `{entity['name']}`")
        names.setdefault(entity["name"], i)

    for i, entity in enumerate(data["entities"]):
        _check_entity(data, i, entity, names, zones, default_tz, problems)
    _check_cycles(data["entities"], names, problems)


def _check_entity(data, i, entity, names, zones, default_tz, problems: _Problems) -> None:
    at = ("entities", i)
    source = data["sources"].get(entity["source"])
    if source is None:
        problems.add((*at, "source"), f"unknown source `{entity['source']}`; expected one of: "
                     f"{', '.join(sorted(data['sources']))}")
    elif source["type"] == "sql" and not (entity.get("table") or entity.get("query")):
        problems.add(at, "a sql source needs `table` or `query` on the entity")
    elif source["type"] != "sql" and (entity.get("table") or entity.get("query")):
        problems.add((*at, "table" if entity.get("table") else "query"),
                     f"`table`/`query` only apply to sql sources; `{entity['source']}` is {source['type']}")
    if entity["target"] not in data["targets"]:
        problems.add((*at, "target"), f"unknown target `{entity['target']}`; expected one of: "
                     f"{', '.join(sorted(data['targets']))}")

    declared = entity.get("columns")
    keys = [entity["key"]] if isinstance(entity["key"], str) else entity["key"]
    for k in keys:
        if declared is not None and k not in declared:
            problems.add((*at, "key"), f"key column `{k}` is not among the declared `columns`")
    for column, spec in (declared or {}).items():
        ctype, tz = (spec, None) if isinstance(spec, str) else (spec["type"], spec.get("timezone"))
        if tz and tz not in zones:
            problems.add((*at, "columns", column, "timezone"), f"unknown time zone `{tz}` (IANA name)")
        source_tz = source.get("timezone") if source else None
        if ctype in _TYPES_NEEDING_TZ and not (tz or source_tz or default_tz):
            problems.add((*at, "columns", column),
                         "naive timestamp column needs a declared time zone: set `timezone` on the column, "
                         "on the source, or in settings")

    ext = entity.get("external_id", "external_id")
    for fname, spec in entity["fields"].items():
        fat = (*at, "fields", fname)
        if fname == ext:
            problems.add(fat, f"`{fname}` is the external id column; it is filled by crmbridge")
        column = spec.get("from")
        if column is not None and declared is not None and column not in declared:
            problems.add((*fat, "from"), f"unknown source column `{column}`; declared columns: "
                         f"{', '.join(declared)}")
        if spec.get("type") in _TYPES_NEEDING_TZ and column is not None:
            source_tz = source.get("timezone") if source else None
            col_spec = (declared or {}).get(column)
            col_tz = col_spec.get("timezone") if isinstance(col_spec, dict) else None
            if not (col_tz or source_tz or default_tz):
                problems.add((*fat, "type"), f"timestamp field reads `{column}`, which has no declared time "
                             "zone: set `timezone` on the column, on the source, or in settings")
        if spec.get("pattern") is not None:
            try:
                re.compile(spec["pattern"])
            except re.error as error:
                problems.add((*fat, "pattern"), f"expected a valid regular expression ({error})")
        ref = spec.get("ref")
        if ref is not None:
            if ref not in names:
                problems.add((*fat, "ref"), f"unknown entity `{ref}`; expected one of: {', '.join(names)}")
            elif data["entities"][names[ref]]["target"] != entity["target"]:
                problems.add((*fat, "ref"), f"entity `{ref}` loads into another target; a reference must stay "
                             "within one target")
            if column is None:
                problems.add(fat, "a `ref` field needs `from`: the source column holding the parent's key")
        for j, step in enumerate(spec.get("transform", [])):
            _check_transform(step, (*fat, "transform", j), problems)


def _check_transform(step: Any, path: DocPath, problems: _Problems) -> None:
    known = transforms.registry()
    name, argument = (step, None) if isinstance(step, str) else next(iter(step.items()))
    found = known.get(name)
    if found is None:
        problems.add(path, f"unknown transform `{name}`; expected one of: {', '.join(sorted(known))}")
        return
    if found.takes_argument and isinstance(step, str):
        problems.add(path, f"transform `{name}` needs an argument: write it as `{{{name}: ...}}`")
    elif not found.takes_argument and not isinstance(step, str):
        problems.add(path, f"transform `{name}` takes no argument: write it as a plain `{name}`")
    elif found.validate_argument:
        wrong = found.validate_argument(argument)
        if wrong:
            problems.add(path, f"transform `{name}` expects {wrong}")


def _check_cycles(entities: list[dict[str, Any]], names: dict[str, int], problems: _Problems) -> None:
    graph = {
        e["name"]: sorted({f["ref"] for f in e["fields"].values() if f.get("ref") in names}) for e in entities
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for parent in graph[node]:
            if state.get(parent) == 1:
                cycle = [*trail[trail.index(parent):], parent] if parent in trail else [node, parent]
                problems.add(("entities", names[node]), "entity references form a cycle: " + " -> ".join(cycle))
            elif parent not in state:
                visit(parent, [*trail, parent])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


# --- model -------------------------------------------------------------------------------------------


def _connection(name: str, raw: dict[str, Any]) -> Connection:
    options = {k: v for k, v in raw.items() if k not in ("type", "timezone")}
    return Connection(name, raw["type"], options, raw.get("timezone"))


def _build(path: Path, raw: bytes, data: dict[str, Any], secrets: set[str]) -> Mapping:
    settings = data.get("settings", {})
    entities = []
    for i, e in enumerate(data["entities"]):
        fields = {}
        for fname, f in e["fields"].items():
            steps = tuple(
                TransformStep(s, None, f"entities[{i}].fields.{fname}.transform[{j}]")
                if isinstance(s, str)
                else TransformStep(*next(iter(s.items())), f"entities[{i}].fields.{fname}.transform[{j}]")
                for j, s in enumerate(f.get("transform", []))
            )
            fields[fname] = FieldSpec(
                name=fname, source_column=f.get("from"), constant=f.get("value"),
                type=f.get("type", "string"), transforms=steps, required=f.get("required", False),
                pattern=f.get("pattern"), max_length=f.get("max_length"), ref=f.get("ref"),
                mask=f.get("mask", "none"),
            )
        columns = {
            c: ColumnSpec(c, s) if isinstance(s, str) else ColumnSpec(c, s["type"], s.get("timezone"))
            for c, s in (e.get("columns") or {}).items()
        }
        ext = e.get("external_id", "external_id")
        entities.append(Entity(
            name=e["name"], index=i, source=e["source"], table=e.get("table"), query=e.get("query"),
            key=tuple([e["key"]] if isinstance(e["key"], str) else e["key"]), columns=columns,
            target=e["target"], target_table=e["target_table"], external_id_column=ext,
            target_key_column=e.get("target_key", ext), mode=e.get("mode", "upsert"),
            create_table=e.get("create_table", False), fields=fields,
        ))
    state_dir = Path(settings.get("state_dir", ".crmbridge"))
    return Mapping(
        path=path.resolve(), name=data["name"], sha256=hashlib.sha256(raw).hexdigest(),
        sources={n: _connection(n, c) for n, c in data["sources"].items()},
        targets={n: _connection(n, c) for n, c in data["targets"].items()},
        entities=entities, batch_size=settings.get("batch_size", DEFAULT_BATCH_SIZE),
        state_dir=state_dir if state_dir.is_absolute() else path.resolve().parent / state_dir,
        timezone=settings.get("timezone"), secrets=secrets,
    )
