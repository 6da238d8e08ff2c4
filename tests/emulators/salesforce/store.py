"""The emulator's state: records per sObject, external-id indexes, type and required-field rules, faults."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from .schema import OBJECTS, FieldDef, fields_of
from .soql import Query, SoqlError, parse

NULL_CSV = "#N/A"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)(Z|[+-]\d{2}:?\d{2})")


class RecordError(Exception):
    """One record refused, as Salesforce reports it: an error code, a message and the fields."""

    def __init__(self, code: str, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.code, self.message, self.fields = code, message, list(fields)

    def as_json(self) -> dict:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}

    def as_bulk(self) -> str:
        return f"{self.code}:{self.message}:{','.join(self.fields)} --"


class RequestError(Exception):
    """A whole request refused (HTTP status + error code), e.g. an unknown field in the payload."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _datetime_text(value: dt.datetime) -> str:
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def coerce(fdef: FieldDef, raw: Any) -> Any:
    """A JSON or CSV value as the field stores it; RecordError the way the real API words it (no value)."""
    if raw is None:
        return None
    kind, name = fdef.type, fdef.name
    bad = RecordError("INVALID_TYPE_ON_FIELD_IN_RECORD", f"{name}: value not of required type", (name,))
    if kind in ("string", "phone", "textarea", "picklist", "email", "id", "reference"):
        if isinstance(raw, (dict, list, bool)):
            raise bad
        text = str(raw)
        if fdef.length and len(text) > fdef.length:
            raise RecordError("STRING_TOO_LONG", f"{name}: data value too large (max length={fdef.length})",
                              (name,))
        if kind == "email" and text and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", text):
            raise RecordError("INVALID_EMAIL_ADDRESS", f"{name}: invalid email address", (name,))
        if kind == "picklist" and fdef.restricted and text not in fdef.picklist:
            raise RecordError("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                              f"{name}: bad value for restricted picklist field", (name,))
        return text
    if kind in ("double", "currency", "int"):
        if isinstance(raw, bool):
            raise bad
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise bad from None
        if kind == "int":
            if number != int(number):
                raise bad
            return int(number)
        return round(number, fdef.scale) if fdef.scale else number
    if kind == "boolean":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        raise bad
    if kind == "date":
        if not isinstance(raw, str) or not _DATE.fullmatch(raw):
            raise bad  # a datetime is not a date: the real API refuses it rather than truncate
        try:
            dt.date.fromisoformat(raw)
        except ValueError:
            raise bad from None
        return raw
    if kind == "datetime":
        match = _DATETIME.fullmatch(raw) if isinstance(raw, str) else None
        if not match:
            raise bad
        try:
            stamp = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise bad from None
        return _datetime_text(stamp)
    raise bad


@dataclass
class Fault:
    kind: str  # rate_limit expired_session server_error lost_response lock reject daily_limit
    times: int = 1
    on: str = ""  # only requests whose path contains this text
    rows: int = 1  # lock / reject: how many records of the request fail
    code: str = "UNABLE_TO_LOCK_ROW"


@dataclass
class Store:
    session_id: str = "00Demulator!session"
    api_limit: int = 1_000_000  # the org's daily request limit (Sforce-Limit-Info)
    page_size: int = 2000
    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {o: {} for o in OBJECTS})
    ext_index: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    api_used: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every API request
    cursors: dict[str, tuple[list[dict], int, Query]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _clock: dt.datetime = field(default_factory=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    # --- faults ----------------------------------------------------------------------------------------
    def inject(self, kind: str, times: int = 1, on: str = "", rows: int = 1, code: str = "UNABLE_TO_LOCK_ROW") -> None:
        with self.lock:
            self.faults.append(Fault(kind, times, on, rows, code))

    def take_fault(self, path: str, kinds: tuple[str, ...]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.kind in kinds and fault.on in path and fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    # --- records -----------------------------------------------------------------------------------------
    def sobject(self, name: str) -> dict[str, FieldDef]:
        if name not in OBJECTS:
            raise RequestError(404, "NOT_FOUND", f"The requested resource does not exist: {name}")
        return fields_of(name)

    def new_id(self, sobject: str) -> str:
        return f"{OBJECTS[sobject][0]}{next(self._ids):015d}"

    def _tick(self) -> str:
        # every write gets a fresh SystemModstamp; many records share one per call, as in a real org
        return _datetime_text(self._clock + dt.timedelta(seconds=self.api_used))

    def index(self, sobject: str, fname: str) -> dict[str, str]:
        return self.ext_index.setdefault((sobject, fname), {})

    def check_fields(self, sobject: str, names: list[str]) -> None:
        """An unknown field refuses the whole request (INVALID_FIELD), as the real API does."""
        fields = self.sobject(sobject)
        for name in names:
            if name == "attributes":
                continue
            base = name.split(".", 1)[0]
            if base in fields and "." not in name:
                if not fields[base].createable and base != "Id":
                    raise RequestError(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                       f"Unable to create/update fields: {base}")
                continue
            if any(f.relationship_name == base for f in fields.values()):
                continue
            raise RequestError(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}")

    def _resolve_relationship(self, sobject: str, name: str, value: Any) -> tuple[str, Any]:
        """`Account: {Legacy_Id__c: X}` (JSON) or `Account.Legacy_Id__c` = X (CSV) -> (AccountId, Id)."""
        fields = self.sobject(sobject)
        fdef = next(f for f in fields.values() if f.relationship_name == name.split(".", 1)[0])
        if isinstance(value, dict):
            pairs = [(k, v) for k, v in value.items() if k != "attributes"]
            if len(pairs) != 1:
                raise RecordError("INVALID_FIELD", f"{fdef.relationship_name}: expected one external id", ())
            ext_field, ext_value = pairs[0]
        else:
            ext_field, ext_value = name.split(".", 1)[1], value
        parent = fields_of(fdef.reference_to or "")
        if ext_field not in parent or not parent[ext_field].external_id:
            raise RecordError("INVALID_FIELD", f"{ext_field} is not an external id field of "
                              f"{fdef.reference_to}", (fdef.name,))
        if ext_value is None:
            return fdef.name, None
        found = self.index(fdef.reference_to or "", ext_field).get(str(ext_value))
        if found is None:
            raise RecordError("INVALID_FIELD", f"Foreign key external ID not found for field {ext_field} in "
                              f"entity {fdef.reference_to}", (fdef.name,))
        return fdef.name, found

    def _values(self, sobject: str, data: dict[str, Any], csv_mode: bool) -> dict[str, Any]:
        fields = self.sobject(sobject)
        values: dict[str, Any] = {}
        for name, raw in data.items():
            if name in ("attributes", "Id"):
                continue
            if csv_mode:
                if raw == "":
                    continue  # an empty CSV cell leaves the field as it is
                raw = None if raw == NULL_CSV else raw
            if name in fields:
                fdef = fields[name]
                value = coerce(fdef, raw)
                if fdef.type == "reference" and value is not None:
                    prefix = OBJECTS[fdef.reference_to or ""][0]
                    if not value.startswith(prefix) or value not in self.records[fdef.reference_to or ""]:
                        raise RecordError("INVALID_CROSS_REFERENCE_KEY", f"{name}: id value of incorrect type",
                                          (name,))
                values[name] = value
            else:
                key, value = self._resolve_relationship(sobject, name, raw)
                values[key] = value
        return values

    def _required(self, sobject: str, record: dict[str, Any]) -> None:
        missing = [f.name for f in self.sobject(sobject).values()
                   if f.required and record.get(f.name) in (None, "")]
        if missing:
            raise RecordError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]",
                              tuple(missing))

    def _unique(self, sobject: str, record: dict[str, Any], record_id: str | None) -> None:
        for fdef in self.sobject(sobject).values():
            if fdef.unique and record.get(fdef.name) is not None:
                other = self.index(sobject, fdef.name).get(record[fdef.name])
                if other is not None and other != record_id:
                    raise RecordError("DUPLICATE_VALUE", f"duplicate value found: {fdef.name} duplicates value "
                                      "on another record", (fdef.name,))

    def _save(self, sobject: str, record: dict[str, Any]) -> None:
        old = self.records[sobject].get(record["Id"])
        for fdef in self.sobject(sobject).values():
            if fdef.unique:
                index = self.index(sobject, fdef.name)
                if old is not None and old.get(fdef.name) is not None:
                    index.pop(old[fdef.name], None)
                if record.get(fdef.name) is not None:
                    index[record[fdef.name]] = record["Id"]
        record["SystemModstamp"] = self._tick()
        self.records[sobject][record["Id"]] = record

    def insert(self, sobject: str, data: dict[str, Any], csv_mode: bool = False) -> str:
        values = self._values(sobject, data, csv_mode)
        record = {f: None for f in self.sobject(sobject)} | values
        record.update(Id=self.new_id(sobject), IsDeleted=False, CreatedDate=self._tick())
        self._required(sobject, record)
        self._unique(sobject, record, None)
        self._save(sobject, record)
        return record["Id"]

    def update(self, sobject: str, record_id: str, data: dict[str, Any], csv_mode: bool = False) -> str:
        current = self.records[sobject].get(record_id or "")
        if current is None or current["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED" if current else "INVALID_CROSS_REFERENCE_KEY",
                              "invalid cross reference id", ())
        record = current | self._values(sobject, data, csv_mode)
        self._required(sobject, record)
        self._unique(sobject, record, record_id)
        self._save(sobject, record)
        return record_id

    def upsert(self, sobject: str, ext_field: str, data: dict[str, Any], csv_mode: bool = False) -> tuple[str, bool]:
        fields = self.sobject(sobject)
        if ext_field not in fields or not fields[ext_field].external_id:
            raise RequestError(400, "INVALID_FIELD", f"Field {ext_field} is not an external id field")
        ext_value = data.get(ext_field)
        if ext_value in (None, "", NULL_CSV):
            raise RecordError("MISSING_ARGUMENT", f"{ext_field} not specified", (ext_field,))
        existing = self.index(sobject, ext_field).get(str(ext_value))
        if existing is not None and not self.records[sobject][existing]["IsDeleted"]:
            return self.update(sobject, existing, data, csv_mode), False
        return self.insert(sobject, data, csv_mode), True

    def delete(self, sobject: str, record_id: str) -> None:
        record = self.records[sobject].get(record_id)
        if record is None or record["IsDeleted"]:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted", ())
        record["IsDeleted"] = True
        for fdef in self.sobject(sobject).values():
            if fdef.unique and record.get(fdef.name) is not None:
                self.index(sobject, fdef.name).pop(record[fdef.name], None)
        record["SystemModstamp"] = self._tick()

    def object_of_id(self, record_id: str) -> str | None:
        for name, (prefix, _) in OBJECTS.items():
            if record_id.startswith(prefix) and record_id in self.records[name]:
                return name
        return None

    # --- queries -------------------------------------------------------------------------------------------
    def _normalizer(self, sobject: str):
        fields = self.sobject(sobject)

        def normalize(name: str, value: Any) -> Any:
            fdef = fields.get(name)
            if fdef is not None and fdef.type == "datetime" and isinstance(value, str):
                return coerce(fdef, value if "T" in value else value + "T00:00:00Z")
            return value
        return normalize

    def run_query(self, text: str, include_deleted: bool) -> tuple[list[dict], Query]:
        head = re.search(r"\bFROM\s+(\w+)", text, re.I)
        if not head:
            raise SoqlError("MALFORMED_QUERY", "no FROM clause")
        query = parse(text, self._normalizer(head.group(1)))
        fields = self.sobject(query.sobject)
        for name in (*query.fields, *query.where_fields, *(o[0] for o in query.order)):
            base = name.split(".", 1)[0]
            if name not in fields and not any(f.relationship_name == base for f in fields.values()):
                raise SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{query.sobject}'")
        rows = [r for r in self.records[query.sobject].values() if include_deleted or not r["IsDeleted"]]

        def getter(record):
            return lambda name: self._get(query.sobject, record, name)
        if query.where is not None:
            rows = [r for r in rows if query.where(getter(r))]
        for name, descending in reversed(query.order):
            rows.sort(key=lambda r, n=name: (self._get(query.sobject, r, n) is None,
                                            self._get(query.sobject, r, n) or ""), reverse=descending)
        if query.limit is not None:
            rows = rows[:query.limit]
        return rows, query

    def _get(self, sobject: str, record: dict, name: str) -> Any:
        if "." not in name:
            return record.get(name)
        rel, field_name = name.split(".", 1)
        fdef = next(f for f in self.sobject(sobject).values() if f.relationship_name == rel)
        parent = self.records[fdef.reference_to or ""].get(record.get(fdef.name) or "")
        return None if parent is None else parent.get(field_name)

    def shape(self, query: Query, record: dict) -> dict:
        """A record as the REST query returns it: attributes, fields, parents as nested objects."""
        out: dict[str, Any] = {"attributes": {"type": query.sobject,
                                              "url": f"/services/data/v59.0/sobjects/{query.sobject}/{record['Id']}"}}
        fields = self.sobject(query.sobject)
        for name in query.fields:
            if "." not in name:
                out[name] = record.get(name)
                continue
            rel, field_name = name.split(".", 1)
            fdef = next(f for f in fields.values() if f.relationship_name == rel)
            parent = self.records[fdef.reference_to or ""].get(record.get(fdef.name) or "")
            if parent is None:
                out[rel] = None
            else:
                nested = out.get(rel) or {"attributes": {"type": fdef.reference_to}}
                nested[field_name] = parent.get(field_name)
                out[rel] = nested
        return out
