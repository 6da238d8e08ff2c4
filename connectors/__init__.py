"""Connectors: one module per system kind, found through a registry (built-ins and entry points)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from crmbridge.connectors.base import ColumnInfo, Connector, Rejected, Source, SourceBatch, Target
from crmbridge.mappings.model import Connection, Mapping

__all__ = [
    "ColumnInfo", "Connector", "Rejected", "Source", "SourceBatch", "Target", "connector_for", "connector_kinds",
]


@cache
def _registry() -> dict[str, type[Connector]]:
    from crmbridge.connectors import files, salesforce, soap, sql

    found: dict[str, type[Connector]] = {
        "sql": sql.SqlConnector,
        "csv": files.CsvConnector,
        "excel": files.ExcelConnector,
        "jsonl": files.JsonLinesConnector,
        "parquet": files.ParquetConnector,
        "soap": soap.SoapConnector,
        "salesforce": salesforce.SalesforceConnector,
    }
    for entry in entry_points(group="crmbridge.connectors"):
        if entry.name not in found:  # built-ins win; plug-ins add kinds
            found[entry.name] = entry.load()
    return found


def connector_kinds() -> set[str]:
    return set(_registry())


def connector_for(connection: Connection, mapping: Mapping) -> Connector:
    return _registry()[connection.type](connection, mapping)
