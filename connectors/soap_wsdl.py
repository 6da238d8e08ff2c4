"""What a WSDL operation looks like to crmbridge: its paging and change parameters (found by conventional
names), the repeating element that holds the records, and the records' fields as flat dotted columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zeep import Client
from zeep.xsd import ComplexType

from crmbridge.connectors.base import ColumnInfo

# Request parameters by role; the first name is the one error messages suggest. Compared without case.
PARAMETER_NAMES: dict[str, tuple[str, ...]] = {
    "page": ("Page", "PageNumber", "PageNo"),
    "offset": ("Offset", "Skip", "Start", "StartIndex", "First"),
    "token": ("Token", "ContinuationToken", "Cursor", "NextToken", "PageToken"),
    "page_size": ("PageSize", "Limit", "MaxRows", "MaxResults", "Count", "Size"),
    "since": ("Since", "ModifiedSince", "ChangedSince", "From", "FromDate", "LastModified"),
    "ids": ("Id", "Ids", "Key", "Keys"),
}
NEXT_TOKEN_NAMES = ("NextToken", "ContinuationToken", "Cursor", "NextPageToken", "Token")
TOTAL_NAMES = ("Total", "TotalCount", "TotalRecords", "TotalSize")

_XSD_KINDS = {
    "string": "string", "normalizedString": "string", "token": "string", "anyURI": "string",
    "int": "integer", "integer": "integer", "long": "integer", "short": "integer", "byte": "integer",
    "unsignedInt": "integer", "unsignedLong": "integer", "unsignedShort": "integer",
    "nonNegativeInteger": "integer", "positiveInteger": "integer",
    "decimal": "decimal", "float": "float", "double": "float", "boolean": "boolean",
    "date": "date", "dateTime": "timestamp",
}


@dataclass
class Operation:
    name: str
    records: str  # the repeating element of the response (and of an upsert's request)
    record_columns: list[ColumnInfo] = field(default_factory=list)
    page: str | None = None
    offset: str | None = None
    token: str | None = None
    page_size: str | None = None
    since: str | None = None
    ids: str | None = None
    next_token: str | None = None
    total: str | None = None  # the response element with the number of records in all pages


def operation_names(client: Client) -> list[str]:
    return sorted(client.service._binding._operations)


def describe_operation(client: Client, name: str) -> Operation:
    """Read an operation's request and response from the WSDL; KeyError when it has no such operation."""
    binding_operation = client.service._binding._operations[name]
    inputs = _children(binding_operation.input.body.type)
    outputs = _children(binding_operation.output.body.type)
    found = Operation(name, records="")
    for role, names in PARAMETER_NAMES.items():
        wanted = {n.lower() for n in names}
        for child, element in inputs:
            if child.lower() in wanted and (role != "since" or _xsd_name(element) in ("dateTime", "date")):
                setattr(found, role, child)
                break
    if found.since is None:  # any dateTime parameter is the change timestamp
        found.since = next((c for c, e in inputs if _xsd_name(e) == "dateTime"), None)
    repeating = [(c, e) for c, e in outputs if _repeats(e) and isinstance(e.type, ComplexType)]
    if not repeating:  # an upsert: the records are in the request
        repeating = [(c, e) for c, e in inputs if _repeats(e) and isinstance(e.type, ComplexType)]
    if repeating:
        found.records, element = repeating[0]
        found.record_columns = list(_columns(element.type, ""))
    next_names = {n.lower() for n in NEXT_TOKEN_NAMES}
    found.next_token = next((c for c, _ in outputs if c.lower() in next_names), None)
    total_names = {n.lower() for n in TOTAL_NAMES}
    found.total = next((c for c, _ in outputs if c.lower() in total_names), None)
    return found


def _children(kind: Any) -> list[tuple[str, Any]]:
    return list(kind.elements) if isinstance(kind, ComplexType) else []


def _repeats(element: Any) -> bool:
    return element.max_occurs == "unbounded" or (isinstance(element.max_occurs, int) and element.max_occurs > 1)


def _xsd_name(element: Any) -> str | None:
    return getattr(element.type, "name", None)


def _columns(kind: ComplexType, prefix: str):
    for child, element in kind.elements:
        path = f"{prefix}{child}"
        if isinstance(element.type, ComplexType):
            yield from _columns(element.type, f"{path}.")
        else:
            native = _xsd_name(element) or "anyType"
            yield ColumnInfo(path, _XSD_KINDS.get(native, "unknown"), f"xsd:{native}")


def records_in(response: Any, name: str) -> list[dict[str, Any]]:
    """The records of a (serialized) response: the repeating element, or the response itself as a list."""
    if response is None:
        return []
    if isinstance(response, list):
        return response
    if isinstance(response, dict):
        rows = response.get(name)
        return [] if rows is None else rows if isinstance(rows, list) else [rows]
    return []


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"Address": {"City": "Berlin"}}` -> `{"Address.City": "Berlin"}`."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(row: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`, for requests: missing (None) values are left out of the record."""
    nested: dict[str, Any] = {}
    for path, value in row.items():
        if value is None:
            continue
        *parents, leaf = path.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
