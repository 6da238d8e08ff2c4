"""SOAP web services (typically an ERP's customer master) through zeep: read pages of records or the
records changed since a timestamp, upsert and delete records.

Nested response types become flat columns named by their path (`Address.City`). The operations' request
parameters are found in the WSDL by conventional names (see `soap_wsdl.py`), so a mapping only names the
operations. XML is parsed with DTDs, entities and external references forbidden; transport failures (no
connection, time-outs, HTTP 429/502/503/504) are retried with backoff, SOAP Faults never are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import pandas as pd
from zeep import Client, Settings
from zeep.exceptions import DTDForbidden, EntitiesForbidden, Error, ExternalReferenceForbidden, Fault, XMLSyntaxError
from zeep.helpers import serialize_object
from zeep.wsse.username import UsernameToken

from crmbridge.connectors import soap_wsdl
from crmbridge.connectors.base import ColumnInfo, Connector, ExistingRow, RestoreRow, SourceBatch, WriteFailure
from crmbridge.connectors.soap_transport import RetryingTransport, install_log_redaction
from crmbridge.errors import CrmbridgeError, SourceError, TargetError
from crmbridge.mappings.envvars import Redactor, redact_url_password
from crmbridge.mappings.model import Entity

log = logging.getLogger("crmbridge.soap")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_PAGE_SIZE = 500


class SoapFaultSourceError(SourceError):
    """The service answered a read with a SOAP Fault (never retried)."""


class SoapFaultTargetError(TargetError):
    """The service refused a write with a SOAP Fault: the records of that call are refused, not the run."""


class SoapConnector(Connector):
    kind = "soap"
    can_read = True
    can_write = True

    @property
    def options(self) -> dict[str, Any]:
        return self.connection.options

    def describe(self) -> str:
        return f"soap {redact_url_password(str(self.options.get('wsdl', '')))}"

    @cached_property
    def secrets(self) -> set[str]:
        secrets = set(self.mapping.secrets)
        if self.options.get("password"):
            secrets.add(str(self.options["password"]))
        return secrets

    @cached_property
    def redact(self) -> Redactor:
        return Redactor(self.secrets)

    @cached_property
    def client(self) -> Client:
        install_log_redaction(self.secrets)
        wsdl = str(self.options["wsdl"])
        if "://" not in wsdl:
            wsdl = str((self.base_dir / wsdl).resolve())
        settings = Settings(strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True,
                            xml_huge_tree=False)
        timeout = float(self.options.get("timeout", 60))
        transport = RetryingTransport(retries=int(self.options.get("retries", 3)), timeout=timeout,
                                      operation_timeout=timeout)
        wsse = None
        if self.options.get("username"):
            wsse = UsernameToken(str(self.options["username"]), str(self.options.get("password", "")))
        try:
            return Client(wsdl, settings=settings, transport=transport, wsse=wsse,
                          service_name=self.options.get("service"), port_name=self.options.get("port"))
        except Exception as error:  # unreachable, not a WSDL, unknown service/port
            raise self._error("source", f"cannot load the WSDL ({_reason(error, self.redact)})") from None

    def _error(self, role: str, message: str, fault: bool = False) -> CrmbridgeError:
        if fault:
            kind: type[CrmbridgeError] = SoapFaultSourceError if role == "source" else SoapFaultTargetError
        else:
            kind = SourceError if role == "source" else TargetError
        return kind(f"{self.connection.name} ({self.describe()}): {message}")

    def operation(self, option: str, role: str) -> soap_wsdl.Operation:
        name = self.options.get(option)
        if not name:
            raise self._error(role, f"`{option}` is not set; the mapping must name the operation to call")
        try:
            return soap_wsdl.describe_operation(self.client, name)
        except KeyError:
            known = ", ".join(soap_wsdl.operation_names(self.client))
            raise self._error(role, f"`{option}`: the WSDL has no operation `{name}`; expected one of: "
                              f"{known}") from None

    def call(self, operation: str, role: str, **params: Any) -> Any:
        """Call one operation; SOAP Faults and refused XML become clear errors without record data."""
        method = getattr(self.client.service, operation)
        try:
            return method(**params)
        except Fault as fault:
            # The fault text can echo record values (personal data), so only its code is shown.
            raise self._error(role, f"operation `{operation}` returned SOAP Fault `{_fault_code(fault)}`",
                              fault=True) from None
        except (DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden) as error:
            raise self._error(role, f"operation `{operation}`: refused a response with "
                              f"{type(error).__name__.removesuffix('Forbidden')} declarations "
                              "(DTDs, entities and external references are not accepted)") from None
        except XMLSyntaxError:
            raise self._error(role, f"operation `{operation}`: the response is not well-formed XML") from None
        except (Error, OSError) as error:  # transport failures left after the retries
            raise self._error(role, f"operation `{operation}` failed: {_reason(error, self.redact)}") from None

    def open_source(self, entity: Entity) -> SoapSource:
        return SoapSource(self, entity, self.operation("list_operation", "source"), since=None)

    def open_changes(self, entity: Entity, since: datetime | None) -> SoapSource:
        """Records changed at or after `since` (every record, deleted ones included, when None)."""
        operation = self.operation("changes_operation", "source")
        if operation.since is None:
            raise self._error("source", f"operation `{operation.name}` takes no dateTime parameter for the "
                              "change timestamp (expected one named like Since or ModifiedSince)")
        return SoapSource(self, entity, operation, since=since or EPOCH)

    def open_target(self) -> SoapTarget:
        return SoapTarget(self)


class SoapSource:
    def __init__(self, connector: SoapConnector, entity: Entity, operation: soap_wsdl.Operation,
                 since: datetime | None):
        self.connector, self.entity, self.operation, self.since = connector, entity, operation, since

    def columns(self) -> list[ColumnInfo]:
        return self.operation.record_columns

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record the operation returns, page after page, flattened to dotted paths."""
        op = self.operation
        size = int(self.connector.options.get("page_size", DEFAULT_PAGE_SIZE))
        style = self.connector.options.get("paging", "token")
        params: dict[str, Any] = {}
        if self.since is not None and op.since:
            params[op.since] = self.since
        if op.page_size:
            params[op.page_size] = size
        page, offset, token = 1, 0, None
        while True:
            call = dict(params)
            if style == "page":
                call[_need(op.page, op, "page")] = page
            elif style == "offset":
                call[_need(op.offset, op, "offset")] = offset
            elif token is not None:
                call[_need(op.token, op, "token")] = token
            response = serialize_object(self.connector.call(op.name, "source", **call), dict)
            rows = soap_wsdl.records_in(response, op.records)
            for row in rows:
                yield soap_wsdl.flatten(row)
            if style == "token":
                token = response.get(op.next_token) if op.next_token and isinstance(response, dict) else None
                if not token:
                    return
            # The last page: an empty one, or the reported total reached. A short page is not enough: a
            # server may cap the page size below what was asked for.
            total = response.get(op.total) if op.total and isinstance(response, dict) else None
            if not rows or (total is not None and offset + len(rows) >= int(total)):
                return
            page, offset = page + 1, offset + len(rows)

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        wanted = list(columns)
        pending: list[dict[str, Any]] = []
        first_row = 1
        for record in self.records():
            pending.append(record)
            if len(pending) >= batch_size:
                yield _batch(pending, wanted, first_row)
                first_row += len(pending)
                pending = []
        if pending or first_row == 1:
            yield _batch(pending, wanted, first_row)

    def close(self) -> None:
        pass


def _batch(records: list[dict[str, Any]], columns: list[str], first_row: int) -> SourceBatch:
    import numpy as np

    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in columns})
    return SourceBatch(frame, np.arange(first_row, first_row + len(records), dtype=np.int64))


def _need(parameter: str | None, op: soap_wsdl.Operation, style: str) -> str:
    if parameter is None:
        raise SourceError(f"operation `{op.name}` has no {style} parameter for `paging: {style}` (expected "
                          f"one named like {soap_wsdl.PARAMETER_NAMES[style][0]})")
    return parameter


class SoapTarget:
    """Upserts records through `upsert_operation`; the entity's external id column is the record's key."""

    def __init__(self, connector: SoapConnector):
        self.connector = connector

    def prepare(self, entity: Entity, dry_run: bool) -> None:
        del dry_run
        operation = self.connector.operation("upsert_operation", "target")
        self.connector.operation("get_operation", "target")
        known = {c.name for c in operation.record_columns}
        missing = [c for c in (entity.external_id_column, *entity.fields) if c not in known]
        if missing:
            raise TargetError(f"entity `{entity.name}`: operation `{operation.name}` takes no field(s) "
                              f"{', '.join(f'`{c}`' for c in missing)}; it takes: {', '.join(sorted(known))}")

    def fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]:
        op = self.connector.operation("get_operation", "target")
        found: dict[str, ExistingRow] = {}
        size = int(self.connector.options.get("page_size", DEFAULT_PAGE_SIZE))
        ids = list(external_ids)
        for start in range(0, len(ids), size):
            response = serialize_object(
                self.connector.call(op.name, "target", **{op.ids or "Id": ids[start:start + size]}), dict)
            for record in soap_wsdl.records_in(response, op.records):
                flat = soap_wsdl.flatten(record)
                key = flat.get(entity.external_id_column)
                found[key] = ExistingRow(key, {f: flat.get(f) for f in entity.fields})
        return found

    def target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]:
        del entity
        return {ext: ext for ext in external_ids}

    def write(self, entity: Entity, rows: list[dict[str, Any]]) -> list[WriteFailure]:
        if not len(rows):
            return []
        op = self.connector.operation("upsert_operation", "target")
        records = [soap_wsdl.unflatten(dict(row)) for row in _rows(rows)]
        failures: list[WriteFailure] = []
        self._write(entity, op, records, failures)
        return failures

    def _write(self, entity: Entity, op: soap_wsdl.Operation, records: list[dict[str, Any]],
               failures: list[WriteFailure]) -> None:
        try:
            self.connector.call(op.name, "target", **{op.records: records})
        except SoapFaultTargetError as error:
            if len(records) == 1:  # the ERP refused this record: find which by halving the batch
                failures.append(WriteFailure(str(records[0].get(entity.external_id_column)), "target_rejected",
                                             str(error).split(": ", 1)[-1]))
                return
            middle = len(records) // 2
            self._write(entity, op, records[:middle], failures)
            self._write(entity, op, records[middle:], failures)

    def delete(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Delete records by external id (`connectors.base.ReversibleTarget.delete`); gone ones are no failure."""
        op = self.connector.operation("delete_operation", "target")
        size = int(self.connector.options.get("page_size", DEFAULT_PAGE_SIZE))
        ids = [row.external_id for row in rows]
        failures: list[WriteFailure] = []
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            try:
                self.connector.call(op.name, "target", **{op.ids or "Id": chunk})
            except SoapFaultTargetError as error:
                failures += [WriteFailure(ext, "target_rejected", str(error).split(": ", 1)[-1])
                             for ext in chunk]
        del entity
        return failures

    def close(self) -> None:
        pass


def _rows(rows: Any) -> list[dict[str, Any]]:
    """Rows as dicts, whether they came as a list of dicts or a column batch (`values.RowBatch`)."""
    columns = getattr(rows, "columns", None)
    if isinstance(columns, dict):
        names = list(columns)
        return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return list(rows)


def _fault_code(fault: Fault) -> str:
    code = fault.code
    return str(code.text if hasattr(code, "text") else code or "unknown")


def _reason(error: BaseException, redact: Redactor) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return redact(f"{type(error).__name__}: {text}"[:300]) if text else type(error).__name__
