"""Salesforce through simple-salesforce: SOQL extract, and upserts by external id through sObject
Collections (small batches) or Bulk API 2.0 (large ones), with parents linked by their external id."""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.connectors.base import ColumnInfo, Connector, ExistingRow, RestoreRow, SourceBatch, WriteFailure
from crmbridge.connectors.salesforce_api import RETRIABLE_ROW_ERRORS, Api, RowResult
from crmbridge.connectors.salesforce_auth import auth_method, login
from crmbridge.connectors.salesforce_check import check_entity
from crmbridge.errors import SourceError, TargetError
from crmbridge.mappings.model import Entity
from crmbridge.values import column_from_values

log = logging.getLogger("crmbridge.run")

COLLECTION_SIZE = 200  # records per sObject Collections call (the API's limit)
DEFAULT_BULK_THRESHOLD = 2000  # from this many rows a write goes through Bulk API 2.0
BULK_EXTRACT_THRESHOLD = 50_000  # `extract: auto` reads results this large through a Bulk API 2.0 query
BULK_JOB_CALLS = 8  # create, upload, close, poll, three result downloads, delete
LOOKUP_CHUNK = 300  # external ids per `IN (...)` look-up: keeps the query URL well under 16 KB
BACKOFF_SECONDS = 0.5  # first retry delay; doubles per attempt (tests shorten it)
NULL_CSV = "#N/A"  # how Bulk API CSV says "set this field to null" (an empty cell means "leave it")
_TYPES = {"id": "string", "string": "string", "email": "string", "phone": "string", "url": "string",
          "textarea": "string", "picklist": "string", "multipicklist": "string", "reference": "string",
          "int": "integer", "double": "float", "currency": "decimal", "percent": "decimal",
          "boolean": "boolean", "date": "date", "datetime": "timestamp"}


class SalesforceConnector(Connector):
    kind = "salesforce"
    can_write = True

    def __init__(self, connection, mapping):
        super().__init__(connection, mapping)
        self._api: Api | None = None

    @property
    def options(self) -> dict[str, Any]:
        return self.connection.options

    def describe(self) -> str:
        where = self.options.get("instance_url") or self.options.get("domain") or "login.salesforce.com"
        return f"salesforce {where} ({auth_method(self.options) or 'no credentials'})"

    @property
    def api(self) -> Api:
        if self._api is None:
            budget = self.options.get("api_budget")
            self._api = Api(lambda: login(self.options, self.base_dir, self.connection.name), self.connection.name,
                            budget=int(budget) if budget else None,
                            max_retries=int(self.options.get("retries", 5)), backoff=BACKOFF_SECONDS)
        return self._api

    def open_source(self, entity: Entity) -> SalesforceSource:
        return SalesforceSource(self, entity)

    def open_changes(self, entity: Entity, since: dt.datetime | None) -> SalesforceChanges:
        """Records changed at or after `since` (deleted ones included), for `crmbridge sync`."""
        return SalesforceChanges(self, entity, since)

    def open_target(self) -> SalesforceTarget:
        return SalesforceTarget(self)


# --- values on the wire ---------------------------------------------------------------------------------------


def _timestamp_text(value: Any) -> str:
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def to_json(value: Any, kind: str) -> Any:
    """A field value for a REST call. Dates stay dates (no zone, never shifted); timestamps go as UTC."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if kind == "date":
        return (value.date() if isinstance(value, dt.datetime) else value).isoformat()
    if kind == "timestamp":
        return _timestamp_text(value)
    if kind == "decimal":
        return float(value) if isinstance(value, Decimal) else value
    if kind == "integer":
        return int(value)
    if kind == "boolean":
        return bool(value)
    return value


def to_csv(value: Any, kind: str) -> str:
    wire = to_json(value, kind)
    if wire is None:
        return NULL_CSV
    if isinstance(wire, bool):
        return "true" if wire else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(wire)


def from_wire(value: Any, kind: str) -> Any:
    """A value as Salesforce returns it (JSON or CSV text), as the mapping's type."""
    if value is None or value == "":
        return None
    if kind == "timestamp":
        return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()
    if kind == "date":
        return dt.date.fromisoformat(str(value)[:10])
    if kind == "decimal":
        return Decimal(str(value))
    if kind == "integer":
        return int(float(value))
    if kind == "float":
        return float(value)
    if kind == "boolean":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return value if isinstance(value, str) else str(value)


# --- target -----------------------------------------------------------------------------------------------------


class SalesforceTarget:
    def __init__(self, connector: SalesforceConnector):
        self.connector = connector
        self.api = connector.api
        self._describe: dict[str, dict[str, dict]] = {}
        self._ids: dict[str, dict[str, str]] = {}  # entity -> external id -> Salesforce Id, from write results
        options = connector.options
        self.bulk_threshold = int(options.get("bulk_threshold", DEFAULT_BULK_THRESHOLD))

    def fields(self, sobject: str) -> dict[str, dict]:
        if sobject not in self._describe:
            answer = self.api.rest(f"sobjects/{sobject}/describe", what=f"describing {sobject}")
            self._describe[sobject] = {f["name"]: f for f in answer["fields"]}
        return self._describe[sobject]

    def by_relationship(self, entity: Entity, name: str) -> tuple[str, str] | None:
        """(relationship name, parent external id field) when a reference field carries the parent's
        external id (the parent's target key is its external id), so the child links without a look-up."""
        spec = entity.fields[name]
        if not spec.ref:
            return None
        parent = self.connector.mapping.entity(spec.ref)
        if parent.target_key_column != parent.external_id_column:
            return None  # the ledger holds the parent's Salesforce Id: send it as is
        relationship = self.fields(entity.target_table).get(name, {}).get("relationshipName")
        if not relationship:
            raise TargetError(f"entity `{entity.name}`: `{entity.target_table}.{name}` is not a lookup field, so "
                              f"it cannot link to `{spec.ref}`")
        return relationship, parent.external_id_column

    def prepare(self, entity: Entity, dry_run: bool) -> None:
        del dry_run  # nothing is created in Salesforce; the check is the same
        try:
            fields = self.fields(entity.target_table)
        except TargetError as error:
            raise TargetError(f"entity `{entity.name}`: cannot describe Salesforce object "
                              f"`{entity.target_table}` ({error})") from None
        problems = check_entity(self.connector.mapping, entity, fields)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise TargetError(f"entity `{entity.name}`: the mapping does not fit Salesforce object "
                              f"`{entity.target_table}`:\n{listing}")

    def _select(self, entity: Entity) -> list[tuple[str, str]]:
        """(mapping field, SOQL field) pairs to read back for comparison."""
        pairs = [(entity.external_id_column, entity.external_id_column)]
        if entity.target_key_column != entity.external_id_column:
            pairs.append((entity.target_key_column, entity.target_key_column))
        for name in entity.fields:
            link = self.by_relationship(entity, name)
            pairs.append((name, f"{link[0]}.{link[1]}" if link else name))
        return pairs

    def _lookup(self, entity: Entity, external_ids: Sequence[str], pairs: list[tuple[str, str]]) -> Iterator[dict]:
        ext = entity.external_id_column
        soql_fields = ", ".join(dict.fromkeys(s for _, s in pairs))
        for start in range(0, len(external_ids), LOOKUP_CHUNK):
            chunk = external_ids[start:start + LOOKUP_CHUNK]
            quoted = ", ".join(_soql_string(v) for v in chunk)
            soql = f"SELECT {soql_fields} FROM {entity.target_table} WHERE {ext} IN ({quoted})"
            for page in self.api.query_pages(soql):
                yield from page

    def fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]:
        pairs = self._select(entity)
        found: dict[str, ExistingRow] = {}
        for record in self._lookup(entity, list(external_ids), pairs):
            values = {name: from_wire(_get(record, soql), entity.fields[name].type)
                      for name, soql in pairs if name in entity.fields}
            ext = record[entity.external_id_column]
            found[ext] = ExistingRow(record.get(entity.target_key_column), values)
            if record.get("Id"):
                self._ids.setdefault(entity.name, {})[ext] = record["Id"]
        return found

    def target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]:
        if entity.target_key_column == entity.external_id_column:
            return {e: e for e in external_ids}
        known = self._ids.get(entity.name, {})
        keys = {e: known[e] for e in external_ids if e in known} if entity.target_key_column == "Id" else {}
        missing = [e for e in external_ids if e not in keys]
        if missing:
            pairs = [(entity.external_id_column, entity.external_id_column),
                     (entity.target_key_column, entity.target_key_column)]
            for record in self._lookup(entity, missing, pairs):
                keys[record[entity.external_id_column]] = record.get(entity.target_key_column)
        return keys

    def write(self, entity: Entity, rows) -> list[WriteFailure]:
        if not len(rows):
            return []
        columns = rows.columns if hasattr(rows, "columns") else {k: [r[k] for r in rows] for k in rows[0]}
        ext_field = entity.external_id_column
        exts = [str(v) for v in columns[ext_field]]
        bulk = len(exts) >= self.bulk_threshold
        calls = BULK_JOB_CALLS if bulk else math.ceil(len(exts) / COLLECTION_SIZE)
        self.api.ensure_budget(calls, f"writing {len(exts)} {entity.target_table} rows")  # stop between batches
        results = (self._write_bulk(entity, columns, list(range(len(exts)))) if bulk
                   else self._write_collections(entity, columns, list(range(len(exts)))))
        # Lock contention: retry the locked rows serially in small collections, backing off between rounds.
        for attempt in range(self.api.max_retries):
            retry = [i for i, r in results.items() if not r.ok and r.code in (*RETRIABLE_ROW_ERRORS, "UNPROCESSED")]
            if not retry:
                break
            log.warning("Salesforce: %d %s rows locked or unprocessed; retrying them serially", len(retry),
                        entity.target_table)
            self.api.retries += 1
            _sleep(self.api.backoff * 2 ** attempt)
            results.update(self._write_collections(entity, columns, retry, chunk=50))
        failures = []
        ids = self._ids.setdefault(entity.name, {})
        known = self.fields(entity.target_table)
        for i, result in sorted(results.items()):
            if result.ok:
                if result.record_id:
                    ids[exts[i]] = result.record_id
                continue
            # Only real field names: a Bulk error text is free-form and could carry a value where fields go.
            named = [f for f in result.fields.split(",") if f.strip() in known]
            where = f" on {','.join(f.strip() for f in named)}" if named else ""
            failures.append(WriteFailure(exts[i], "target_rejected", f"Salesforce {result.code}{where}"))
        return failures

    def _payload_fields(self, entity: Entity) -> list[tuple[str, str, str | None]]:
        """(column, kind, relationship) per written field; relationship is `Account.Legacy_Id__c` style."""
        out = [(entity.external_id_column, "string", None)]
        for name, spec in entity.fields.items():
            link = self.by_relationship(entity, name)
            out.append((name, "string" if link else spec.type, f"{link[0]}.{link[1]}" if link else None))
        return out

    def _write_collections(self, entity: Entity, columns: dict[str, list], indexes: list[int],
                           chunk: int = COLLECTION_SIZE) -> dict[int, RowResult]:
        fields = self._payload_fields(entity)
        results: dict[int, RowResult] = {}
        for start in range(0, len(indexes), chunk):
            part = indexes[start:start + chunk]
            records = []
            for i in part:
                record: dict[str, Any] = {"attributes": {"type": entity.target_table}}
                for name, kind, link in fields:
                    value = to_json(columns[name][i], kind)
                    if link is None:
                        record[name] = value
                    elif value is None:
                        record[name] = None  # clears the lookup
                    else:
                        relationship, parent_ext = link.split(".", 1)
                        record[relationship] = {parent_ext: value}
                records.append(record)
            answer = self.api.collection_upsert(entity.target_table, entity.external_id_column, records)
            results.update(zip(part, answer, strict=True))
        return results

    def _write_bulk(self, entity: Entity, columns: dict[str, list], indexes: list[int]) -> dict[int, RowResult]:
        fields = self._payload_fields(entity)
        header: list[str] = []
        for name, _, link in fields:
            header.append(name)  # a lookup column carries #N/A to clear a parent, empty to use the link column
            if link:
                header.append(link)
        rows = []
        for i in indexes:
            row = []
            for name, kind, link in fields:
                text = to_csv(columns[name][i], kind)
                if link is None:
                    row.append(text)
                else:
                    row.extend([NULL_CSV, ""] if text == NULL_CSV else ["", text])
            rows.append(row)
        answer = self.api.bulk_upsert(entity.target_table, entity.external_id_column, header, rows)
        return dict(zip(indexes, answer, strict=True))

    # --- rollback and sync deletes (connectors.base.ReversibleTarget) ---------------------------------------

    def delete(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Delete records by external id (to the recycle bin, as Salesforce does); one already gone is fine."""
        exts = [r.external_id for r in rows]
        if not exts:
            return []
        known = self._ids.get(entity.name, {})
        missing = [e for e in exts if e not in known]
        if missing:
            pairs = [(entity.external_id_column, entity.external_id_column), ("Id", "Id")]
            for record in self._lookup(entity, missing, pairs):
                known[record[entity.external_id_column]] = record["Id"]
        by_id = {known[e]: e for e in exts if e in known}  # not found: already deleted
        ids = list(by_id)
        self.api.ensure_budget(math.ceil(len(ids) / COLLECTION_SIZE), f"deleting {len(ids)} records")
        failures = []
        for start in range(0, len(ids), COLLECTION_SIZE):
            part = ids[start:start + COLLECTION_SIZE]
            answer = self.api.rest(f"composite/sobjects?ids={','.join(part)}&allOrNone=false", "DELETE",
                                   f"deleting {len(part)} {entity.target_table} records")
            for record_id, item in zip(part, answer or [], strict=False):
                codes = [e.get("statusCode") for e in item.get("errors") or []]
                if not item.get("success") and not {"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"} & set(codes):
                    failures.append(WriteFailure(by_id[record_id], "target_rejected",
                                                 f"Salesforce {codes[0] if codes else 'UNKNOWN'}"))
                else:
                    known.pop(by_id[record_id], None)
        return failures

    def restore(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Set exactly the given fields back (one upsert per set of fields, so other fields stay as they are)."""
        groups: dict[tuple[str, ...], list[RestoreRow]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(row.values)), []).append(row)
        failures: list[WriteFailure] = []
        for fields, group in groups.items():
            partial = _only_fields(entity, fields)
            columns = {entity.external_id_column: [r.external_id for r in group],
                       **{f: [r.values[f] for r in group] for f in fields}}
            failures += self.write(partial, _Columns(columns))
        return failures

    def recreate(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Bring deleted records back by upserting them: Salesforce assigns a new Id (children linked by
        external id link again on their next load; it cannot undelete from the recycle bin over REST)."""
        if not rows:
            return []
        fields = [f for f in entity.fields if any(f in r.values for r in rows)]
        columns = {entity.external_id_column: [r.external_id for r in rows],
                   **{f: [r.values.get(f) for r in rows] for f in fields}}
        return self.write(_only_fields(entity, tuple(fields)), _Columns(columns))

    def usage(self) -> dict[str, Any]:
        """Calls this run made, retries, re-logins, and the org's daily usage (from Sforce-Limit-Info)."""
        return self.api.usage()

    def close(self) -> None:
        usage = self.api.usage()
        log.info("Salesforce %s API usage: %s", self.connector.connection.name, usage)


class _Columns(list):
    """Rows held as columns, as the flow's RowBatch hands them to `write`."""

    def __init__(self, columns: dict[str, list]):
        super().__init__(range(len(next(iter(columns.values())))))
        self.columns = columns


def _only_fields(entity: Entity, fields: Sequence[str]) -> Entity:
    from dataclasses import replace

    return replace(entity, fields={f: entity.fields[f] for f in fields})


def _sleep(seconds: float) -> None:
    import time

    time.sleep(min(seconds, 30.0))


def _soql_string(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _get(record: dict, soql_field: str) -> Any:
    value: Any = record
    for part in soql_field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# --- source -----------------------------------------------------------------------------------------------------


class SalesforceSource:
    """SOQL extract of `table` (an sObject) or `query`, streamed page by page (REST), or by Bulk API 2.0."""

    def __init__(self, connector: SalesforceConnector, entity: Entity):
        self.connector, self.entity = connector, entity
        self.api = connector.api
        self.sobject = entity.table

    def columns(self) -> list[ColumnInfo] | None:
        if not self.sobject:
            return None
        answer = self.api.rest(f"sobjects/{self.sobject}/describe", what=f"describing {self.sobject}")
        infos = [ColumnInfo(f["name"], _TYPES.get(f["type"], "unknown"), f["type"],
                            True if f["type"] == "datetime" else None) for f in answer["fields"]]
        # relationship columns (`Account.Name`) are checked by the query itself
        return infos + [ColumnInfo(c, "unknown") for c in self.entity.source_columns if "." in c]

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        options = self.connector.options
        include_deleted = bool(options.get("include_deleted", False))
        if self.entity.query:
            soql = self.entity.query
        else:
            order = ", ".join(self.entity.key)
            soql = f"SELECT {', '.join(columns)} FROM {self.sobject} ORDER BY {order}"
        buffered: list[dict] = []
        position = 0
        try:
            mode = options.get("extract", "auto")
            first = None
            if mode == "auto":  # the REST answer's totalSize decides: large results go through Bulk API 2.0
                first = self.api.first_page(soql, include_deleted)
                mode = "bulk" if first.get("totalSize", 0) >= BULK_EXTRACT_THRESHOLD else "rest"
            pages = (self.api.bulk_query_pages(soql, include_deleted, batch_size) if mode == "bulk"
                     else self.api.query_pages(soql, include_deleted, first))
            for page in pages:
                buffered.extend(page)
                while len(buffered) >= batch_size:
                    batch, buffered = buffered[:batch_size], buffered[batch_size:]
                    yield self._batch(batch, columns, position)
                    position += len(batch)
            if buffered:
                yield self._batch(buffered, columns, position)
        except TargetError as error:
            raise SourceError(str(error)) from None

    def _batch(self, records: list[dict], columns: Sequence[str], position: int) -> SourceBatch:
        # REST records nest parents ({"Account": {"Name": ...}}); Bulk CSV rows have flat `Account.Name` keys
        # and empty cells for nulls.
        def value(record: dict, column: str) -> Any:
            found = record[column] if column in record else _get(record, column)
            return None if found == "" else found
        frame = pd.DataFrame({c: column_from_values([value(r, c) for r in records], c) for c in columns})
        return SourceBatch(frame, np.arange(position + 1, position + len(records) + 1))

    def close(self) -> None:
        pass


class SalesforceChanges(SalesforceSource):
    """Changed records for an incremental sync, deleted ones included (`queryAll`), in (SystemModstamp, Id)
    order and read by keyset pages on that compound cursor: records sharing a timestamp are never skipped
    (the stored watermark is inclusive, so ties at it are read again rather than lost), and no query
    locator has to outlive a long sync."""

    CURSOR_FIELD = "SystemModstamp"

    def __init__(self, connector: SalesforceConnector, entity: Entity, since: dt.datetime | None):
        super().__init__(connector, entity)
        self.since = since

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        stamp, wanted = self.CURSOR_FIELD, list(dict.fromkeys([*columns, self.CURSOR_FIELD, "Id"]))
        where = f"{stamp} >= {_soql_datetime(self.since)}" if self.since else ""
        position = 0
        while True:
            condition = f" WHERE {where}" if where else ""
            soql = (f"SELECT {', '.join(wanted)} FROM {self.sobject}{condition} ORDER BY {stamp}, Id "
                    f"LIMIT {batch_size}")
            try:
                records = [r for page in self.api.query_pages(soql, include_deleted=True) for r in page]
            except TargetError as error:
                raise SourceError(str(error)) from None
            if not records:
                return
            yield self._batch(records, columns, position)
            position += len(records)
            if len(records) < batch_size:
                return
            last = records[-1]
            at = _soql_datetime(pd.Timestamp(last[stamp]).to_pydatetime())
            where = f"{stamp} > {at} OR ({stamp} = {at} AND Id > {_soql_string(last['Id'])})"


def _soql_datetime(value: dt.datetime) -> str:
    """A SOQL datetime literal (unquoted, UTC)."""
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
