"""Load a mapping file: parse YAML safely, check it against the JSON Schema, interpolate `${ENV}`, then
check its meaning. Every problem found is collected, located (file, line, column, document path) and
reported together."""

from __future__ import annotations

import ast
import codecs
import difflib
import hashlib
import os
import re
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import pandas as pd
import yaml
from dotenv import dotenv_values
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from crmbridge.errors import MappingError, Problem
from crmbridge.mappings import rules, transforms
from crmbridge.mappings.dedupe_spec import check_dedupe, dedupe_spec
from crmbridge.mappings.envvars import (
    MissingVariable,
    Redactor,
    interpolate,
    missing_variables,
    redact_url_password,
    variables_in,
)
from crmbridge.mappings.model import (
    DEFAULT_BATCH_SIZE,
    AuditSettings,
    ColumnSpec,
    Connection,
    Entity,
    FieldSpec,
    Mapping,
    SyncSpec,
    TransformStep,
)
from crmbridge.mappings.yamlpos import LocatedDocument, format_path, load_located
from crmbridge.mappings.yamlpos import Path as DocPath
from crmbridge.protection import mapping_rules as protection_rules
from crmbridge.schemas import load_schema


class _Problems:
    """Problems found so far, each located in the file. Messages are redacted when reported."""

    def __init__(self, file: str, doc: LocatedDocument | None):
        self.file, self.doc = file, doc
        self.items: list[tuple[DocPath, str]] = []

    def add(self, path: DocPath, message: str) -> None:
        self.items.append((tuple(path), message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self, secrets: set[str] | None = None) -> MappingError:
        """The MappingError listing every problem; secret values and URL passwords never appear in it."""
        redact = Redactor(secrets)
        problems = []
        for path, message in self.items:
            line, column = self.doc.locate(path) if self.doc else (None, None)
            problems.append(Problem(self.file, line, column, format_path(path), redact(message)))
        return MappingError(problems)


def load_mapping(path: str | Path, env: dict[str, str] | None = None) -> Mapping:
    """Load and fully validate a mapping; raises MappingError listing every problem.

    `env` replaces the process environment for `${VAR}` interpolation (a `.env` file next to the mapping
    is read either way; `env`/the process environment win over it).
    """
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        problem = Problem(file, None, None, "", f"cannot read the file ({error.strerror})")
        raise MappingError([problem]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise MappingError([Problem(file, line, column, "", f"expected UTF-8 text; byte {error.start} "
                                    "is not UTF-8 (save the mapping as UTF-8)")]) from None
    try:
        doc = load_located(text)
    except yaml.YAMLError as error:
        line, column, reason = _yaml_error(error, text)
        raise MappingError([Problem(file, line, column, "", f"invalid YAML: {reason}")]) from None

    if doc.problems:  # duplicate keys and the like, each with its exact position
        raise MappingError([
            Problem(file, p.line, p.column, format_path(p.path), redact_url_password(p.message))
            for p in doc.problems
        ])
    if not isinstance(doc.data, dict):
        found = "an empty file" if doc.data is None else _kind_of(doc.data)
        message = (f"expected a mapping document (an object with version, name, sources, targets, entities); "
                   f"found {found}")
        line, column = doc.locate(())
        raise MappingError([Problem(file, line or 1, column or 1, "", message)])
    problems = _Problems(file, doc)
    _check_schema(doc.data, problems, before_interpolation=True)
    if problems:
        raise problems.error()

    environment = {**_dotenv(path.parent), **(env if env is not None else os.environ)}
    secrets: set[str] = set()
    data = _interpolate(doc.data, environment, secrets, problems)
    if problems:
        raise problems.error(secrets)
    if data != doc.data:  # an interpolated value must fit the schema too (a `${SEP}` of two characters)
        _check_schema(data, problems, suffix=" (after `${...}` interpolation)")
        if problems:
            raise problems.error(secrets)
    folder = transforms.mapping_dir.set(path.resolve().parent)  # lookup files are relative to the mapping
    try:
        _check_meaning(data, problems)
    finally:
        transforms.mapping_dir.reset(folder)
    if problems:
        raise problems.error(secrets)
    return _build(path, raw, data, secrets)


def _yaml_error(error: yaml.YAMLError, text: str) -> tuple[int | None, int | None, str]:
    """Line, column and a readable reason for a YAML syntax error."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = ord(error.character) if isinstance(error.character, str) else error.character
        return line, column, f"character U+{code:04X} is not allowed in YAML ({error.reason})"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    if context and context.startswith("while") and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem = f"{context}, {problem}"
    if "\t" in problem or "'\\t'" in problem:
        problem += "; indent with spaces, not tabs"
    return line, column, problem


def _dotenv(directory: Path) -> dict[str, str]:
    env_file = directory / ".env"
    if not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


# --- JSON Schema ---------------------------------------------------------------------------------------


_TEXT_CHECKS = {"pattern", "enum", "const", "minLength", "maxLength"}


def _check_schema(data: dict[str, Any], problems: _Problems, suffix: str = "",
                  before_interpolation: bool = False) -> None:
    validator = Draft202012Validator(load_schema("mapping"))
    found: list[tuple[DocPath, str]] = []
    for error in validator.iter_errors(data):
        has_variable = isinstance(error.instance, str) and bool(variables_in(error.instance))
        if before_interpolation and has_variable and error.validator in _TEXT_CHECKS:
            continue  # `delimiter: ${SEP}`: checked once the variable is filled in
        explained = _explain(error)
        if has_variable and error.validator == "type":
            hint = " (a `${...}` variable always gives text)"
            explained = [(path, message + hint) for path, message in explained]
        found.extend(explained)
    # In the order of the file, so the list reads top to bottom.
    position = {path: problems.doc.locate(path) if problems.doc else (None, None) for path, _ in found}
    found.sort(key=lambda item: (*(n or 0 for n in position[item[0]]), format_path(item[0])))
    seen = set()
    for path, message in found:
        if (path, message) not in seen:
            seen.add((path, message))
            problems.add(path, message + suffix)


_TYPE_WORDS = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "a boolean (true or false)", "null": "null"}
_PATTERN_WORDS = {
    "^[A-Za-z_][A-Za-z0-9_]*$": "a name of letters, digits and `_` that does not start with a digit",
    "^[A-Za-z0-9][A-Za-z0-9_.-]*$": "a name of letters, digits, `_`, `.` and `-` that starts with a letter "
                                    "or digit",
}


def _explain(error: ValidationError) -> list[tuple[DocPath, str]]:
    """Turn a jsonschema error into (path, message) pairs a person can act on."""
    path: DocPath = tuple(error.absolute_path)
    kind = error.validator
    if "propertyNames" in error.schema_path:  # the instance is the offending key; point at it
        return [((*path, error.instance), f"`{error.instance}` is not a valid name: expected "
                 f"{_PATTERN_WORDS.get(error.validator_value, _describe(error.schema))}")]
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in error.schema.get("properties", {})]
        return [((*path, key), f"unknown key `{key}`{_suggest(key, allowed)}; expected one of: "
                 f"{', '.join(allowed)}") for key in extra]
    if kind == "required":
        match = re.fullmatch(r"(.+) is a required property", error.message)
        name = ast.literal_eval(match.group(1)) if match else error.message
        return [(path, f"missing required key `{name}`")]
    if kind == "oneOf":
        return _explain_one_of(error, path)
    if kind == "not" and error.validator_value == {"required": ["table", "query"]}:
        return [(path, "expected either `table` or `query`, not both")]
    if kind == "type":
        return [(path, f"expected {_type_words(error.schema)}, found {_kind_of(error.instance)}")]
    if kind == "enum":
        options = ", ".join(map(str, error.validator_value))
        hint = _suggest(str(error.instance), [str(o) for o in error.validator_value])
        return [(path, f"expected one of: {options}; found {_kind_of(error.instance)}{hint}")]
    if kind == "const":
        return [(path, f"expected {error.validator_value!r}; found {_kind_of(error.instance)}")]
    if kind == "pattern":
        words = _PATTERN_WORDS.get(error.validator_value, f"a value matching {error.validator_value}")
        return [(path, f"expected {words}; found {_kind_of(error.instance)}")]
    if kind in ("minLength", "maxLength"):
        low, high = error.schema.get("minLength"), error.schema.get("maxLength")
        if low == high == 1:
            want = "a single character"
        elif kind == "minLength":
            want = f"at least {low} character{'s' if low != 1 else ''}"
        else:
            want = f"at most {high} character{'s' if high != 1 else ''}"
        return [(path, f"expected {want}; found {_kind_of(error.instance)}")]
    if kind in ("minimum", "maximum"):
        bound = "at least" if kind == "minimum" else "at most"
        return [(path, f"expected {_type_words(error.schema)} of {bound} {error.validator_value}; found "
                 f"{error.instance!r}")]
    if kind == "minProperties":
        return [(path, "expected at least one entry; found none")]
    if kind == "minItems":
        return [(path, "expected at least one item; found an empty list")]
    return [(path, error.message)]


def _explain_one_of(error: ValidationError, path: DocPath) -> list[tuple[DocPath, str]]:
    options: list[dict[str, Any]] = error.validator_value
    instance = error.instance
    if error.schema == _definitions().get("field"):  # exactly one of `from` / `value`
        if not isinstance(instance, dict):
            return []  # the type error says what is wrong
        if "from" in instance and "value" in instance:
            return [(path, "has both `from` and `value`; expected exactly one: `from` (a source column) or "
                     "`value` (a constant)")]
        return [(path, "has neither `from` nor `value`; expected exactly one: `from` (a source column) or "
                 "`value` (a constant)")]
    if error.schema == _definitions().get("transform_step"):
        if isinstance(instance, dict):
            names = ", ".join(f"`{k}`" for k in instance) or "none"
            return [(path, f"expected a one-key object `{{transform: argument}}`; found {len(instance)} keys "
                     f"({names})")]
        return [(path, f"expected a transform name or a one-key object `{{transform: argument}}`; found "
                 f"{_kind_of(instance)}")]
    # Explain the option whose type fits the value: `key: []` is a list too short, not "not a string".
    checker = Draft202012Validator.TYPE_CHECKER
    fitting = [i for i, option in enumerate(options)
               if any(checker.is_type(instance, t) for t in _types_of(_resolve(option)))]
    if len(fitting) == 1 and error.context:
        inner = [e for e in error.context if list(e.relative_schema_path)[:1] == [fitting[0]]]
        explained = [item for e in inner for item in _explain(e)]
        if explained:
            return explained
    wanted = " or ".join(_describe(option) for option in options)
    return [(path, f"expected {wanted}; found {_kind_of(instance)}")]


def _definitions() -> dict[str, Any]:
    return load_schema("mapping")["$defs"]


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema and schema["$ref"].startswith("#/$defs/"):
        schema = _definitions()[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _types_of(schema: dict[str, Any]) -> list[str]:
    kinds = schema.get("type", [])
    return [kinds] if isinstance(kinds, str) else list(kinds)


def _describe(schema: dict[str, Any]) -> str:
    """What a (sub)schema accepts, in words."""
    schema = _resolve(schema)
    if "enum" in schema:
        return "one of: " + ", ".join(map(str, schema["enum"]))
    kinds = _types_of(schema)
    if not kinds and "oneOf" in schema:
        return " or ".join(_describe(option) for option in schema["oneOf"])
    if kinds == ["object"] and schema.get("required"):
        return "an object with " + ", ".join(f"`{k}`" for k in schema["required"])
    if kinds == ["array"] and "items" in schema:
        return f"a list of {_plural(_describe(schema['items']))}"
    return " or ".join(_TYPE_WORDS.get(k, k) for k in kinds) or "an allowed value"


def _type_words(schema: dict[str, Any]) -> str:
    return " or ".join(_TYPE_WORDS.get(k, k) for k in _types_of(_resolve(schema))) or "an allowed value"


def _plural(words: str) -> str:
    return re.sub(r"\b(?:a|an) (\w+)", r"\1s", words)


def _kind_of(value: Any) -> str:
    """The kind of a found value, with the value when it is short and plain."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    kind = {str: "a string", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown})" if len(shown) <= 60 else kind


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.7)
    if not close:  # `partner` for `partner_export`
        close = [o for o in options if word and (o.startswith(word) or word.startswith(o))][:1]
        close = close if len([o for o in options if word and o.startswith(word)]) <= 1 else []
    return f" (did you mean `{close[0]}`?)" if close else ""


# --- ${ENV} -------------------------------------------------------------------------------------------


def _interpolate(data: Any, env: dict[str, str], secrets: set[str], problems: _Problems, path=()) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, env, secrets, problems, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, env, secrets, problems, (*path, i)) for i, v in enumerate(data)]
    if isinstance(data, str):
        try:
            return interpolate(data, env, secrets)
        except MissingVariable:
            for name in dict.fromkeys(missing_variables(data, env)):
                problems.add(path, f"environment variable `{name}` is not set; expected it in the "
                             "environment or in the .env file next to the mapping (or write "
                             f"`${{{name}:-default}}`)")
            return data
    return data


# --- meaning -----------------------------------------------------------------------------------------


_TYPES_NEEDING_TZ = {"timestamp"}
_FILE_KINDS = {"csv", "excel", "jsonl", "parquet"}

# Options of the built-in connector kinds (besides `type`); plug-in connectors check their own.
CONNECTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "sql": ("url", "schema", "timezone", "receives"),
    "csv": ("path", "encoding", "delimiter", "quotechar", "header", "skip_rows", "null_values", "timezone"),
    "excel": ("path", "sheet", "skip_rows", "null_values", "timezone"),
    "jsonl": ("path", "encoding", "timezone"),
    "parquet": ("path", "timezone"),
    "soap": ("wsdl", "service", "port", "list_operation", "changes_operation", "get_operation", "upsert_operation",
             "delete_operation", "paging", "page_size", "username", "password", "timeout", "retries", "timezone"),
    "salesforce": ("instance_url", "session_id", "username", "password", "security_token", "domain", "consumer_key",
                   "consumer_secret", "private_key_file", "api_version", "ca_bundle", "bulk_threshold", "api_budget",
                   "retries", "extract", "include_deleted", "timezone"),
}
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "sql": ("url",), "csv": ("path",), "excel": ("path",), "jsonl": ("path",), "parquet": ("path",),
    "soap": ("wsdl",),
}


def _check_meaning(data: dict[str, Any], problems: _Problems) -> None:
    from crmbridge.connectors import _registry  # late: connectors import the mapping model

    connectors = _registry()
    kinds = set(connectors)
    zones = available_timezones()
    for section in ("sources", "targets"):
        for name, conn in data[section].items():
            _check_connection(section, name, conn, kinds, zones, problems)
            kind = connectors.get(conn["type"])
            if section == "targets" and kind is not None and not getattr(kind, "can_write", False):
                writable = sorted(k for k, c in connectors.items() if getattr(c, "can_write", False))
                problems.add((section, name, "type"), f"a {conn['type']} connection cannot be written; "
                             f"expected a target of type: {', '.join(writable)}")
    default_tz = data.get("settings", {}).get("timezone")
    if default_tz and default_tz not in zones:
        problems.add(("settings", "timezone"), _unknown_zone(default_tz))

    names: dict[str, int] = {}
    for i, entity in enumerate(data["entities"]):
        if entity["name"] in names:
            problems.add(("entities", i, "name"), f"duplicate entity name `{entity['name']}` (also "
                         f"entities[{names[entity['name']]}]); expected unique names")
        names.setdefault(entity["name"], i)

    for i, entity in enumerate(data["entities"]):
        _check_entity(data, i, entity, names, zones, default_tz, problems)
    _check_cycles(data["entities"], names, problems)
    protection_rules.check(data, problems.add)


def _unknown_zone(zone: str) -> str:
    return f"unknown time zone `{zone}`; expected an IANA name such as UTC, Europe/Berlin or Asia/Shanghai"


def _check_connection(section: str, name: str, conn: dict[str, Any], kinds: set[str], zones: set[str],
                      problems: _Problems) -> None:
    at = (section, name)
    kind = conn["type"]
    if kind not in kinds:
        problems.add((*at, "type"), f"unknown connector `{kind}`{_suggest(kind, sorted(kinds))}; expected "
                     f"one of: {', '.join(sorted(kinds))}")
    if conn.get("timezone") and conn["timezone"] not in zones:
        problems.add((*at, "timezone"), _unknown_zone(conn["timezone"]))
    allowed = CONNECTION_OPTIONS.get(kind)
    if allowed is None:
        return  # a plug-in connector checks its own options
    takes = ", ".join(("type", *allowed))
    known = set(load_schema("mapping")["$defs"]["connection"]["properties"])
    for key in conn:
        if key == "type" or key in allowed:
            continue
        if key in known:
            problems.add((*at, key), f"`{key}` does not apply to a {kind} connection; expected one of: "
                         f"{takes}")
        else:
            problems.add((*at, key), f"unknown key `{key}`{_suggest(key, list(allowed))}; a {kind} "
                         f"connection takes: {takes}")
    for key in REQUIRED_OPTIONS.get(kind, ()):
        if not conn.get(key):
            problems.add(at, f"missing required key `{key}` (a {kind} connection needs it)")
    if "encoding" in conn and "encoding" in allowed:
        try:
            codecs.lookup(conn["encoding"])
        except LookupError:
            problems.add((*at, "encoding"), f"unknown text encoding `{conn['encoding']}`; expected a name "
                         "such as utf-8, gb18030, gbk or latin-1")


def _check_entity(data, i, entity, names, zones, default_tz, problems: _Problems) -> None:
    at = ("entities", i)
    source = data["sources"].get(entity["source"])
    source_kind = source["type"] if source else None
    if source is None:
        problems.add((*at, "source"), f"unknown source `{entity['source']}`"
                     f"{_suggest(entity['source'], list(data['sources']))}; expected one of: "
                     f"{', '.join(sorted(data['sources']))}")
    elif source_kind == "sql" and not (entity.get("table") or entity.get("query")):
        problems.add(at, f"missing `table` or `query`: source `{entity['source']}` is sql, so the entity "
                     "must name the table to read or a query")
    elif source_kind in _FILE_KINDS and ("table" in entity or "query" in entity):
        problems.add((*at, "table" if "table" in entity else "query"),
                     f"`table`/`query` only apply to sql sources; `{entity['source']}` is a {source_kind} "
                     "file (remove it: the file is the table)")
    if entity["target"] not in data["targets"]:
        problems.add((*at, "target"), f"unknown target `{entity['target']}`"
                     f"{_suggest(entity['target'], list(data['targets']))}; expected one of: "
                     f"{', '.join(sorted(data['targets']))}")

    declared = entity.get("columns")
    source_tz = source.get("timezone") if source else None
    if isinstance(entity["key"], str):
        key_paths = [(entity["key"], (*at, "key"))]
    else:
        key_paths = [(k, (*at, "key", j)) for j, k in enumerate(entity["key"])]
    seen_keys: set[str] = set()
    for k, kpath in key_paths:
        if declared is not None and k not in declared:
            problems.add(kpath, f"key column `{k}` is not among the declared `columns`; expected one of: "
                         f"{', '.join(declared)}")
        if k in seen_keys:
            problems.add(kpath, f"key column `{k}` is listed twice; expected each column once")
        seen_keys.add(k)
    for column, spec in (declared or {}).items():
        ctype, tz = (spec, None) if isinstance(spec, str) else (spec["type"], spec.get("timezone"))
        if tz and tz not in zones:
            problems.add((*at, "columns", column, "timezone"), _unknown_zone(tz))
        if ctype in _TYPES_NEEDING_TZ and not (tz or source_tz or default_tz):
            problems.add((*at, "columns", column),
                         f"naive timestamp column `{column}` has no time zone; expected `timezone` on the "
                         "column, on the source, or in settings")

    if "sync" in entity:
        _check_sync(entity, at, declared, problems)
    ext = entity.get("external_id", "external_id")
    for fname, spec in entity["fields"].items():
        _check_field(entity, (*at, "fields", fname), fname, spec, declared, ext, names, data,
                     source_tz or default_tz, problems)
    if entity.get("dedupe"):
        check_dedupe(entity, (*at, "dedupe"), problems.add)


def _check_sync(entity: dict[str, Any], at: DocPath, declared: dict[str, Any] | None, problems: _Problems) -> None:
    """`sync:` settings must name real columns and fields of the right type for the chosen policies."""
    sync, fields = entity["sync"], entity["fields"]
    sat = (*at, "sync")
    for key in ("watermark", "deleted_flag"):
        column = sync.get(key)
        if column and declared is not None and column not in declared:
            problems.add((*sat, key), f"unknown source column `{column}`{_suggest(column, list(declared))}; "
                         f"expected one of the declared `columns`: {', '.join(declared)}")

    def field_of_type(key: str, kind: str, needed_by: str) -> None:
        name = sync.get(key)
        if name is None:
            problems.add(sat, f"missing `{key}`: {needed_by} needs a {kind} field to use")
        elif name not in fields:
            problems.add((*sat, key), f"unknown field `{name}`{_suggest(name, list(fields))}; expected one of "
                         f"the entity's fields: {', '.join(fields)}")
        elif fields[name].get("type", "string") != kind:
            problems.add((*sat, key), f"field `{name}` is {fields[name].get('type', 'string')}; expected a {kind} "
                         "field")

    deletes = sync.get("deletes", "ignore")
    if deletes != "ignore" and not sync.get("deleted_flag"):
        problems.add(sat, f"`deletes: {deletes}` needs `deleted_flag`: the source column that marks a deleted "
                     "record")
    if deletes == "deactivate":
        field_of_type("active_field", "boolean", "`deletes: deactivate`")
    conflicts = sync.get("conflicts", "source_wins")
    if conflicts == "newest_wins":
        field_of_type("modified_field", "timestamp", "`conflicts: newest_wins`")
    if conflicts == "fields" and not sync.get("target_fields"):
        problems.add(sat, "`conflicts: fields` needs `target_fields`: the fields the target keeps")
    for j, name in enumerate(sync.get("target_fields", [])):
        if name not in fields:
            problems.add((*sat, "target_fields", j), f"unknown field `{name}`{_suggest(name, list(fields))}; "
                         f"expected one of the entity's fields: {', '.join(fields)}")


def _check_field(entity, fat, fname, spec, declared, ext, names, data, zone, problems: _Problems) -> None:
    kind = spec.get("type", "string")
    if fname == ext:
        problems.add(fat, f"`{fname}` is the entity's external id column (see `external_id`); crmbridge "
                     "fills it, so expected no field of that name")
    column = spec.get("from")
    if column is not None and declared is not None and column not in declared:
        problems.add((*fat, "from"), f"unknown source column `{column}`{_suggest(column, list(declared))}; "
                     f"expected one of the declared `columns`: {', '.join(declared)}")
    if kind in _TYPES_NEEDING_TZ and not spec.get("ref"):
        col_spec = (declared or {}).get(column) if column is not None else None
        col_tz = col_spec.get("timezone") if isinstance(col_spec, dict) else None
        reads = f"reads `{column}`, which" if column is not None else "is a constant that"
        if not (col_tz or zone) and not _has_offset(spec.get("value")):
            problems.add((*fat, "type"), f"timestamp field {reads} has no declared time zone; expected "
                         "`timezone` on the column, on the source, or in settings")
    for key in ("pattern", "max_length"):
        if spec.get(key) is not None and kind != "string":
            problems.add((*fat, key), f"`{key}` is checked on string fields only; this field is {kind} "
                         "(remove it, or make the field `type: string`)")
    if spec.get("pattern") is not None:
        try:
            re.compile(spec["pattern"])
        except re.error as error:
            problems.add((*fat, "pattern"), f"expected a valid regular expression ({error})")
    constant = spec.get("value")
    if constant is not None and not spec.get("transform") and not _constant_casts(constant, kind):
        problems.add((*fat, "value"), f"expected a constant of type {kind}; found {_kind_of(constant)}, "
                     "which does not convert")
    ref = spec.get("ref")
    if ref is not None:
        if ref not in names:
            problems.add((*fat, "ref"), f"unknown entity `{ref}`{_suggest(ref, list(names))}; expected one "
                         f"of: {', '.join(names)}")
        elif data["entities"][names[ref]]["target"] != entity["target"]:
            problems.add((*fat, "ref"), f"entity `{ref}` loads into target "
                         f"`{data['entities'][names[ref]]['target']}`, this one into `{entity['target']}`; "
                         "expected a reference within one target")
        else:
            parent = data["entities"][names[ref]]
            parent_ext = parent.get("external_id", "external_id")
            if parent.get("target_key", parent_ext) == parent_ext and kind not in ("string", None):
                problems.add((*fat, "type"), f"entity `{ref}` is referenced by its external id (text); expected "
                             f"`type: string` here, or a `target_key` on `{ref}` such as an integer `id`")
        if column is None:
            problems.add(fat, "a `ref` field needs `from`: the source column holding the parent's key")
    rules.check_rules(entity, fat, spec, names, data, problems.add)
    for j, step in enumerate(spec.get("transform", [])):
        _check_transform(step, (*fat, "transform", j), problems)
        if declared is not None and isinstance(step, (str, dict)) and step:
            name, argument = (step, None) if isinstance(step, str) else next(iter(step.items()))
            if name in transforms.registry():  # `columns_read` gives nothing for a malformed argument
                for other in transforms.columns_read(name, argument):
                    if other not in declared:
                        problems.add((*fat, "transform", j), f"transform `{name}` reads unknown source column "
                                     f"`{other}`{_suggest(other, list(declared))}; expected one of the declared "
                                     f"`columns`: {', '.join(declared)}")


def _has_offset(value: Any) -> bool:
    """Whether a timestamp constant carries its own UTC offset (so it needs no declared time zone)."""
    if not isinstance(value, str):
        return False
    try:
        return pd.Timestamp(value.strip()).tzinfo is not None
    except (ValueError, TypeError):
        return False


def _constant_casts(value: Any, kind: str) -> bool:
    from crmbridge.mappings.cleanse import cast  # late: cleanse pulls in numpy/pandas

    if kind == "timestamp":
        try:
            return pd.Timestamp(str(value).strip()) is not pd.NaT
        except (ValueError, TypeError):
            return False
    _, invalid = cast(pd.Series([value], dtype=object), kind, None)
    return not bool(invalid.iloc[0])


def _check_transform(step: Any, path: DocPath, problems: _Problems) -> None:
    known = transforms.registry()
    name, argument = (step, None) if isinstance(step, str) else next(iter(step.items()))
    found = known.get(name)
    if found is None:
        problems.add(path, f"unknown transform `{name}`{_suggest(name, list(known))}; expected one of: "
                     f"{', '.join(sorted(known))}")
        return
    if found.takes_argument and isinstance(step, str) and not found.optional_argument:
        problems.add(path, f"transform `{name}` needs an argument; expected `{{{name}: ...}}`")
    elif not found.takes_argument and not isinstance(step, str):
        problems.add(path, f"transform `{name}` takes no argument; expected a plain `{name}`")
    elif found.validate_argument:
        wrong = found.validate_argument(argument)
        if wrong:
            problems.add(path, f"transform `{name}` expects {wrong}")


def _check_cycles(entities: list[dict[str, Any]], names: dict[str, int], problems: _Problems) -> None:
    """Entities load parents first, so references must not loop back (a -> b -> a, or a -> a)."""
    graph: dict[str, list[tuple[str, str]]] = {}  # entity -> [(parent, field holding the ref)]
    for e in entities:
        refs = {(f["ref"], fname) for fname, f in e["fields"].items() if f.get("ref") in names}
        graph.setdefault(e["name"], sorted(refs))
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for parent, fname in graph[node]:
            if state.get(parent) == 1:
                cycle = [*trail[trail.index(parent):], parent]
                where = ("entities", names[node], "fields", fname, "ref")
                what = "refers to itself" if parent == node else "closes a cycle"
                problems.add(where, f"entity references form a cycle: {' -> '.join(cycle)} (this `ref` "
                             f"{what}); expected parents that do not refer back to their children")
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


def _sync_spec(raw: dict[str, Any] | None) -> SyncSpec | None:
    if raw is None:
        return None
    return SyncSpec(
        watermark=raw["watermark"], overlap_seconds=float(raw.get("overlap", 300)),
        deleted_flag=raw.get("deleted_flag"), deletes=raw.get("deletes", "ignore"),
        active_field=raw.get("active_field"), conflicts=raw.get("conflicts", "source_wins"),
        modified_field=raw.get("modified_field"), target_fields=tuple(raw.get("target_fields", ())),
    )


def _step(raw: Any, where: str, folder: Path) -> TransformStep:
    """A transform step, with the source columns it reads and lookup files made absolute."""
    name, argument = (raw, None) if isinstance(raw, str) else next(iter(raw.items()))
    if isinstance(argument, dict) and isinstance(argument.get("file"), str):
        argument = {**argument, "file": str(folder / argument["file"])}
    return TransformStep(name, argument, where, tuple(transforms.columns_read(name, argument)))


def _build(path: Path, raw: bytes, data: dict[str, Any], secrets: set[str]) -> Mapping:
    settings = data.get("settings", {})
    entities = []
    for i, e in enumerate(data["entities"]):
        fields = {}
        for fname, f in e["fields"].items():
            steps = tuple(
                _step(s, f"entities[{i}].fields.{fname}.transform[{j}]", path.resolve().parent)
                for j, s in enumerate(f.get("transform", []))
            )
            fields[fname] = FieldSpec(
                name=fname, source_column=f.get("from"), constant=f.get("value"),
                type=f.get("type", "string"), transforms=steps, required=f.get("required", False),
                pattern=f.get("pattern"), max_length=f.get("max_length"), ref=f.get("ref"),
                rules=rules.build_rules(f.get("rules"), f"entities[{i}].fields.{fname}"),
                **protection_rules.field_extras(f),  # protect, and the mask (never none when protected)
                personal_data=f.get("personal_data"),
            )
        fields = protection_rules.add_index_fields(fields)
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
            sync=_sync_spec(e.get("sync")), subject=e.get("subject"),
            dedupe=dedupe_spec(e.get("dedupe")),
        ))
    state_dir = Path(settings.get("state_dir", ".crmbridge"))
    return Mapping(
        path=path.resolve(), name=data["name"], sha256=hashlib.sha256(raw).hexdigest(),
        sources={n: _connection(n, c) for n, c in data["sources"].items()},
        targets={n: _connection(n, c) for n, c in data["targets"].items()},
        entities=entities, batch_size=settings.get("batch_size", DEFAULT_BATCH_SIZE),
        state_dir=state_dir if state_dir.is_absolute() else path.resolve().parent / state_dir,
        timezone=settings.get("timezone"), dask=settings.get("dask"), secrets=secrets,
        protection=protection_rules.settings(data, path.resolve().parent),
        audit=_audit_settings(settings.get("audit") or {}, path.resolve().parent),
    )


def _audit_settings(raw: dict[str, Any], base: Path) -> AuditSettings:
    key = raw.get("signing_key")
    return AuditSettings(
        url=raw.get("url"), record_events=raw.get("record_events", True),
        retention_days=raw.get("retention_days", AuditSettings.retention_days), operator=raw.get("operator"),
        purpose=raw.get("purpose"), lawful_basis=raw.get("lawful_basis"),
        data_subjects=tuple(raw.get("data_subjects", ())), recipients=tuple(raw.get("recipients", ())),
        transfers=tuple(raw.get("transfers", ())), signing_key=None if key is None else base / key,
    )
