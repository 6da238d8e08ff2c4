"""An ERP customer master on 127.0.0.1: a small WSGI app that serves `customers.wsdl` and answers its
operations with SOAP 1.1 envelopes built and parsed with lxml, so the real zeep client talks to it.

What tests can do to it: change records between sync cycles (`upsert`, `delete`), skew or freeze its clock
(`clock_offset`, `frozen_at`; timestamps have whole-second resolution, so many changes share a second),
inject SOAP Faults (`fail`), transport failures (`fail_transport`), slow responses (`delay`), a response
carrying a DTD with an entity (`evil_response`), and require a WS-Security UsernameToken (`credentials`).
"""

from __future__ import annotations

import base64
import bisect
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from lxml import etree

WSDL = Path(__file__).with_name("customers.wsdl")
TNS = "urn:example:erp:customers"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
FIELDS = ("Id", "Name", "Email", "CreditLimit", "Address", "ModifiedAt", "Deleted")
ADDRESS = ("Street", "City", "Country")
# Requests never need a DTD or entities; refusing them keeps the emulator honest about secure parsing too.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


@dataclass
class _Fault:
    operation: str | None
    code: str
    message: str
    times: int
    after: int = 0  # calls of the operation answered normally first


@dataclass
class ErpServer:
    """Start with `start()` (or as a context manager); `wsdl_url` is what a mapping's `wsdl` points at."""

    credentials: tuple[str, str] | None = None
    clock_offset: timedelta = timedelta(0)
    frozen_at: datetime | None = None
    delay: float = 0.0
    evil_response: bool = False
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # operation names in the order they were answered
    last_request: bytes = b""
    on_call: Any = None  # called with (operation, calls so far) after each answer: changes between pages
    _faults: list[_Fault] = field(default_factory=list)
    _transport_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: WSGIServer | None = None
    _ordered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sorted views, until a change
    _thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> ErpServer:
        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self._server = make_server("127.0.0.1", 0, self._app, handler_class=Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="erp-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ErpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def wsdl_url(self) -> str:
        return f"{self.url}/soap?wsdl"

    # --- the data, as tests change it -------------------------------------------------------------

    def now(self) -> datetime:
        base = self.frozen_at or (datetime.now(UTC) + self.clock_offset)
        return base.replace(microsecond=0)  # whole seconds, as many ERPs store them

    def upsert(self, *records: dict[str, Any]) -> None:
        with self._lock:
            for record in records:
                self._upsert(record)

    def _upsert(self, record: dict[str, Any]) -> None:
        self._ordered.clear()
        current = self.records.setdefault(str(record["Id"]), {"Id": str(record["Id"])})
        current.update({k: v for k, v in record.items() if k not in ("ModifiedAt", "Deleted")})
        current["Deleted"] = False
        current["ModifiedAt"] = self.now()

    def delete(self, *ids: str) -> None:
        """A soft delete: the record stays as a tombstone so change queries report it."""
        with self._lock:
            self._ordered.clear()
            for record_id in ids:
                self.records[record_id].update(Deleted=True, ModifiedAt=self.now())

    def live(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self.records.items() if not v.get("Deleted")}

    def fail(self, operation: str | None = None, code: str = "soap:Server", message: str = "Internal error",
             times: int = 1, after: int = 0) -> None:
        """After `after` good calls, the next `times` calls of `operation` (any if None) answer with a Fault."""
        self._faults.append(_Fault(operation, code, message, times, after))

    def fail_transport(self, times: int = 1) -> None:
        """The next `times` requests get HTTP 503 with an HTML body, as a proxy in front of an ERP would."""
        self._transport_failures += times

    # --- WSGI ---------------------------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if self.delay:
            time.sleep(self.delay)
        if environ["REQUEST_METHOD"] == "GET":
            text = WSDL.read_text(encoding="utf-8").replace("http://127.0.0.1:0/soap", f"{self.url}/soap")
            start_response("200 OK", [("Content-Type", "text/xml; charset=utf-8")])
            return [text.encode()]
        if self._transport_failures:
            self._transport_failures -= 1
            start_response("503 Service Unavailable", [("Content-Type", "text/html")])
            return [b"<html><body>upstream busy</body></html>"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        self.last_request = body
        status, payload = self._handle(body)
        start_response(status, [("Content-Type", "text/xml; charset=utf-8")])
        return [payload]

    def _handle(self, body: bytes) -> tuple[str, bytes]:
        try:
            envelope = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError:
            return _fault("soap:Client", "malformed XML")
        request = envelope.find(f"{{{SOAP_ENV}}}Body")
        if request is None or not len(request):
            return _fault("soap:Client", "no SOAP Body")
        call = request[0]
        operation = etree.QName(call).localname
        if self.credentials and not self._authenticated(envelope):
            return _fault("wsse:FailedAuthentication", "The security token could not be authenticated")
        for fault in self._faults:
            if fault.times and fault.operation in (None, operation):
                if fault.after:
                    fault.after -= 1
                    continue
                fault.times -= 1
                return _fault(fault.code, fault.message)
        handler = getattr(self, f"_op_{operation}", None)
        if handler is None:
            return _fault("soap:Client", f"unknown operation {operation}")
        with self._lock:
            response = handler(call)
        self.calls.append(operation)
        if self.on_call is not None:
            self.on_call(operation, len(self.calls))
        if self.evil_response:
            return "200 OK", _with_entity(response)
        return "200 OK", _envelope(response)

    def _authenticated(self, envelope: etree._Element) -> bool:
        token = envelope.find(f"{{{SOAP_ENV}}}Header/{{{WSSE}}}Security/{{{WSSE}}}UsernameToken")
        if token is None:
            return False
        user = token.findtext(f"{{{WSSE}}}Username")
        password = token.findtext(f"{{{WSSE}}}Password")
        return (user, password) == self.credentials

    # --- operations ---------------------------------------------------------------------------------

    def _op_ListCustomers(self, call: etree._Element) -> etree._Element:
        if "list" not in self._ordered:  # paging 500k records must not sort them for every page
            rows = sorted(self.records.values(), key=lambda r: r["Id"])
            self._ordered["list"] = [r for r in rows if not r.get("Deleted")]
        return self._page("ListCustomersResponse", self._ordered["list"], call)

    def _op_GetChangedCustomers(self, call: etree._Element) -> etree._Element:
        since = _parse_datetime(_text(call, "Since"))
        if "changes" not in self._ordered:
            self._ordered["changes"] = sorted(self.records.values(), key=lambda r: (r["ModifiedAt"], r["Id"]))
        ordered = self._ordered["changes"]
        first = bisect.bisect_left(ordered, since, key=lambda r: r["ModifiedAt"])
        return self._page("GetChangedCustomersResponse", ordered[first:], call,
                          key=lambda r: (r["ModifiedAt"], r["Id"]))

    def _op_GetCustomers(self, call: etree._Element) -> etree._Element:
        wanted = [e.text for e in call.findall(f"{{{TNS}}}Id")]
        response = etree.Element(f"{{{TNS}}}GetCustomersResponse")
        for record_id in wanted:
            record = self.records.get(record_id)
            if record and not record.get("Deleted"):
                response.append(_customer(record))
        return response

    def _op_UpsertCustomers(self, call: etree._Element) -> etree._Element:
        created = updated = 0
        for element in call.findall(f"{{{TNS}}}Customer"):
            record = _record(element)
            exists = record["Id"] in self.records and not self.records[record["Id"]].get("Deleted")
            self._upsert(record)
            created, updated = created + (not exists), updated + exists
        response = etree.Element(f"{{{TNS}}}UpsertCustomersResponse")
        etree.SubElement(response, f"{{{TNS}}}Created").text = str(created)
        etree.SubElement(response, f"{{{TNS}}}Updated").text = str(updated)
        return response

    def _op_DeleteCustomers(self, call: etree._Element) -> etree._Element:
        count = 0
        for element in call.findall(f"{{{TNS}}}Id"):
            record = self.records.get(element.text or "")
            if record and not record.get("Deleted"):
                self._ordered.clear()
                record.update(Deleted=True, ModifiedAt=self.now())
                count += 1
        response = etree.Element(f"{{{TNS}}}DeleteCustomersResponse")
        etree.SubElement(response, f"{{{TNS}}}Deleted").text = str(count)
        return response

    def _page(self, name: str, rows: list[dict[str, Any]], call: etree._Element,
              key: Any = lambda r: (r["Id"],)) -> etree._Element:
        """One page of `rows` (sorted by `key`). A continuation token is a keyset (the last key returned), so
        records that change while a client pages never shift others past it, as offsets and pages can."""
        size = int(_text(call, "PageSize") or 100)
        token, page, offset = _text(call, "Token"), _text(call, "Page"), _text(call, "Offset")
        if token:
            after = tuple(json.loads(base64.urlsafe_b64decode(token.encode())))
            start = bisect.bisect_right(rows, after, key=lambda r: _key_text(key(r)))
        elif page:
            start = (int(page) - 1) * size
        else:
            start = int(offset or 0)
        response = etree.Element(f"{{{TNS}}}{name}")
        chunk = rows[start:start + size]
        for record in chunk:
            response.append(_customer(record))
        if start + size < len(rows):
            etree.SubElement(response, f"{{{TNS}}}NextToken").text = base64.urlsafe_b64encode(
                json.dumps(_key_text(key(chunk[-1]))).encode()).decode()
        etree.SubElement(response, f"{{{TNS}}}Total").text = str(len(rows))
        return response


# --- XML helpers ----------------------------------------------------------------------------------------


def _text(element: etree._Element, name: str) -> str | None:
    return element.findtext(f"{{{TNS}}}{name}")


def _key_text(key: tuple) -> tuple:
    return tuple(v.isoformat() if isinstance(v, datetime) else v for v in key)


def _parse_datetime(text: str | None) -> datetime:
    value = datetime.fromisoformat((text or "1970-01-01T00:00:00Z").replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _customer(record: dict[str, Any]) -> etree._Element:
    element = etree.Element(f"{{{TNS}}}Customer")
    for name in FIELDS:
        if name == "Address":
            if any(record.get(part) is not None for part in ADDRESS):
                address = etree.SubElement(element, f"{{{TNS}}}Address")
                for part in ADDRESS:
                    if record.get(part) is not None:
                        etree.SubElement(address, f"{{{TNS}}}{part}").text = str(record[part])
            continue
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            text = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        etree.SubElement(element, f"{{{TNS}}}{name}").text = text
    return element


def _record(element: etree._Element) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for child in element:
        name = etree.QName(child).localname
        if name == "Address":
            for part in child:
                record[etree.QName(part).localname] = part.text
        elif name == "CreditLimit":
            record[name] = Decimal(child.text) if child.text else None
        elif name not in ("ModifiedAt", "Deleted"):
            record[name] = child.text
    return record


def _envelope(payload: etree._Element) -> bytes:
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soap": SOAP_ENV, "tns": TNS})
    etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body").append(payload)
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def _fault(code: str, message: str) -> tuple[str, bytes]:
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soap": SOAP_ENV, "wsse": WSSE})
    fault = etree.SubElement(etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body"), f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = code
    etree.SubElement(fault, "faultstring").text = message
    return "500 Internal Server Error", etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def _with_entity(payload: etree._Element) -> bytes:
    """The response with an internal DTD and an entity reference: a secure client must refuse it."""
    body = _envelope(payload).decode().split("?>", 1)[1]
    body = body.replace("<tns:Total>", "<tns:Total>&boom;", 1)
    return ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE soap:Envelope [<!ENTITY boom "1">]>\n'
            + body).encode()
