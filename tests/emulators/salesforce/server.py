"""The HTTPS server: the REST API and Bulk API 2.0 subset crmbridge uses, over the emulator's store."""

from __future__ import annotations

import csv
import io
import json
import re
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .soql import SoqlError
from .store import NULL_CSV, RecordError, RequestError, Store

API = r"/services/data/v\d+\.\d+/"
COLLECTION_LIMIT = 200


class _Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet: tests read the store's request list instead
        pass

    # --- plumbing ------------------------------------------------------------------------------------------
    def _send(self, status: int, body: Any = None, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        store = self.server.store
        payload = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Sforce-Limit-Info", f"api-usage={store.api_used}/{store.api_limit}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, [{"message": message, "errorCode": code}])

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        store = self.server.store
        url = urlsplit(self.path)
        path, params = url.path, parse_qs(url.query)
        body = self._body()
        if not re.match(API, path):
            self._error(404, "NOT_FOUND", "The requested resource does not exist")
            return
        if self.headers.get("Authorization") != f"Bearer {store.session_id}":
            self._error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            return
        with store.lock:
            store.api_used += 1
            store.requests.append((method, path))
            over_limit = store.api_used > store.api_limit
        if over_limit or store.take_fault(path, ("daily_limit",)):
            self._error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
            return
        fault = store.take_fault(path, ("rate_limit", "expired_session", "server_error"))
        if fault is not None:
            if fault.kind == "rate_limit":
                self._error(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.")
            elif fault.kind == "expired_session":
                self._error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            else:
                self._error(503, "SERVER_UNAVAILABLE", "Server temporarily unavailable")
            return
        rest = re.sub(API, "", path, count=1).rstrip("/")
        try:
            with store.lock:
                status, answer, content_type, headers = self._route(method, rest, params, body)
        except RequestError as error:
            self._error(error.status, error.code, error.message)
            return
        except SoqlError as error:
            self._error(400, error.code, str(error))
            return
        if store.take_fault(path, ("lost_response",)):  # the work is done, the answer never arrives
            self._error(500, "UNKNOWN_EXCEPTION", "An unexpected error occurred")
            return
        self._send(status, answer, content_type, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- routes ----------------------------------------------------------------------------------------------
    def _route(self, method: str, rest: str, params: dict, body: bytes):
        store = self.server.store
        json_ct = "application/json"
        if method == "GET" and (m := re.fullmatch(r"sobjects/(\w+)/describe", rest)):
            fields = store.sobject(m.group(1))
            return 200, {"name": m.group(1), "fields": [f.describe() for f in fields.values()],
                         "createable": True, "updateable": True}, json_ct, None
        if method == "GET" and (m := re.fullmatch(r"(query|queryAll)(?:/([\w-]+))?", rest)):
            return (200, self._query(m.group(1) == "queryAll", params.get("q", [""])[0], m.group(2)),
                    json_ct, None)
        if rest.startswith("composite/sobjects"):
            return 200, self._collections(method, rest, params, body), json_ct, None
        if rest.startswith("jobs/ingest"):
            return self._ingest(method, rest, body)
        if rest.startswith("jobs/query"):
            return self._bulk_query(method, rest, params, body)
        raise RequestError(404, "NOT_FOUND", "The requested resource does not exist")

    def _query(self, include_deleted: bool, text: str, locator: str | None) -> dict:
        store = self.server.store
        if locator is None:
            rows, query = store.run_query(text, include_deleted)
            locator, start = uuid.uuid4().hex, 0
            store.cursors[locator] = (rows, 0, query)
        if locator not in store.cursors:
            raise RequestError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        rows, start, query = store.cursors[locator]
        page = rows[start:start + store.page_size]
        done = start + len(page) >= len(rows)
        answer = {"totalSize": len(rows), "done": done, "records": [store.shape(query, r) for r in page]}
        if done:
            store.cursors.pop(locator, None)
        else:
            store.cursors[locator] = (rows, start + len(page), query)
            endpoint = "queryAll" if include_deleted else "query"
            answer["nextRecordsUrl"] = f"/services/data/v59.0/{endpoint}/{locator}"
        return answer

    def _record_faults(self, count: int) -> dict[int, RecordError]:
        """Injected per-record failures (lock contention, a refused record) for the next write request."""
        store = self.server.store
        fault = store.take_fault("write", ("lock", "reject"))
        if fault is None:
            return {}
        message = ("unable to obtain exclusive access to this record" if fault.code == "UNABLE_TO_LOCK_ROW"
                   else "refused by an injected fault")
        return {i: RecordError(fault.code, message) for i in range(min(fault.rows, count))}

    def _collections(self, method: str, rest: str, params: dict, body: bytes) -> list[dict]:
        store = self.server.store
        if method == "DELETE":
            ids = (params.get("ids", [""])[0]).split(",")
            return [self._one(lambda i=i: (store.delete(store.object_of_id(i) or "Account", i), i)[1], i)
                    for i in ids if i]
        payload = json.loads(body or b"{}")
        records = payload.get("records", [])
        if len(records) > COLLECTION_LIMIT:
            raise RequestError(400, "EXCEEDED_ID_LIMIT", f"record limit reached. cannot submit more than "
                               f"{COLLECTION_LIMIT} records into this call")
        if payload.get("allOrNone"):
            raise RequestError(400, "NOT_SUPPORTED", "the emulator implements allOrNone=false only")
        for record in records:
            store.check_fields(record.get("attributes", {}).get("type", ""), list(record))
        faults = self._record_faults(len(records))
        results = []
        upsert = re.fullmatch(r"composite/sobjects/(\w+)/(\w+)", rest)
        for i, record in enumerate(records):
            sobject = record["attributes"]["type"]
            if i in faults:
                results.append({"success": False, "errors": [faults[i].as_json()]})
            elif method == "POST":
                results.append(self._one(lambda r=record, s=sobject: store.insert(s, r)))
            elif upsert:
                results.append(self._one(lambda r=record: store.upsert(upsert.group(1), upsert.group(2), r)))
            else:
                results.append(self._one(lambda r=record, s=sobject: store.update(s, r.get("Id"), r),
                                         record.get("Id")))
        return results

    @staticmethod
    def _one(action, record_id: str | None = None) -> dict:
        try:
            result = action()
        except RecordError as error:
            return {"id": record_id, "success": False, "errors": [error.as_json()]}
        if isinstance(result, tuple):
            return {"id": result[0], "success": True, "errors": [], "created": result[1]}
        return {"id": result, "success": True, "errors": []}

    # --- Bulk API 2.0 ingest --------------------------------------------------------------------------------
    def _ingest(self, method: str, rest: str, body: bytes):
        jobs = self.server.jobs
        json_ct = "application/json"
        parts = rest.split("/")[2:]
        if method == "POST" and not parts:
            spec = json.loads(body)
            store = self.server.store
            store.sobject(spec.get("object", ""))
            if spec.get("operation") not in ("insert", "update", "upsert", "delete", "hardDelete"):
                raise RequestError(400, "INVALIDJOB", "invalid operation")
            if spec["operation"] == "upsert" and not spec.get("externalIdFieldName"):
                raise RequestError(400, "INVALIDJOB", "externalIdFieldName is required for upsert")
            job = {"id": "750" + uuid.uuid4().hex[:15], "operation": spec["operation"], "object": spec["object"],
                   "externalIdFieldName": spec.get("externalIdFieldName"), "state": "Open", "contentType": "CSV",
                   "lineEnding": spec.get("lineEnding", "LF"), "columnDelimiter": spec.get("columnDelimiter",
                                                                                          "COMMA"),
                   "numberRecordsProcessed": 0, "numberRecordsFailed": 0, "apiVersion": 59.0}
            jobs[job["id"]] = {"info": job, "data": [], "ok": [], "failed": [], "unprocessed": [], "header": []}
            return 200, job, json_ct, None
        job = jobs.get(parts[0] if parts else "")
        if job is None:
            raise RequestError(404, "NOT_FOUND", "job not found")
        info = job["info"]
        if method == "PUT" and parts[1:] == ["batches"]:
            if info["state"] != "Open" or job["data"]:  # Bulk 2.0 takes one upload per job
                raise RequestError(400, "INVALIDJOBSTATE", "data was already uploaded for this job")
            job["data"].append(body.decode("utf-8"))
            return 201, None, json_ct, None
        if method == "PATCH" and len(parts) == 1:
            state = json.loads(body).get("state")
            if info["state"] != "Open":
                raise RequestError(400, "INVALIDJOBSTATE", f"the job is already {info['state']}")
            if state == "UploadComplete":
                self._process(job)
            elif state == "Aborted":
                info["state"] = "Aborted"
            return 200, info, json_ct, None
        if method == "GET" and len(parts) == 1:
            return 200, info, json_ct, None
        if method == "GET" and len(parts) == 2 and parts[1] in ("successfulResults", "failedResults",
                                                               "unprocessedrecords"):
            key = {"successfulResults": "ok", "failedResults": "failed", "unprocessedrecords": "unprocessed"}
            extra = {"ok": ["sf__Id", "sf__Created"], "failed": ["sf__Id", "sf__Error"], "unprocessed": []}
            which = key[parts[1]]
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(extra[which] + job["header"])
            writer.writerows(job[which])
            return 200, out.getvalue(), "text/csv", None
        if method == "DELETE" and len(parts) == 1:
            jobs.pop(parts[0])
            return 204, None, json_ct, None
        raise RequestError(404, "NOT_FOUND", "The requested resource does not exist")

    def _process(self, job: dict) -> None:
        store, info = self.server.store, job["info"]
        rows: list[list[str]] = []
        header: list[str] = []
        for chunk in job["data"]:
            reader = csv.reader(io.StringIO(chunk))
            chunk_header = next(reader, [])
            if header and chunk_header != header:
                raise RequestError(400, "INVALIDBATCH", "every upload of a job needs the same header")
            header = chunk_header
            rows.extend(reader)
        job["header"] = header
        sobject, operation = info["object"], info["operation"]
        try:
            store.check_fields(sobject, [h for h in header if h != "Id"])
        except RequestError as error:
            info.update(state="Failed", errorMessage=f"InvalidBatch : {error.message}")
            job["unprocessed"] = rows
            return
        faults = self._record_faults(len(rows))
        for i, row in enumerate(rows):
            data = dict(zip(header, row, strict=False))
            try:
                if i in faults:
                    raise faults[i]
                if operation == "insert":
                    record_id, created = store.insert(sobject, data, csv_mode=True), True
                elif operation == "upsert":
                    record_id, created = store.upsert(sobject, info["externalIdFieldName"], data, csv_mode=True)
                elif operation == "update":
                    record_id, created = store.update(sobject, data.get("Id", ""), data, csv_mode=True), False
                else:
                    store.delete(sobject, data.get("Id", ""))
                    record_id, created = data.get("Id", ""), False
                job["ok"].append([record_id, "true" if created else "false", *row])
            except RecordError as error:
                job["failed"].append(["", error.as_bulk(), *row])
        info.update(state="JobComplete", numberRecordsProcessed=len(rows), numberRecordsFailed=len(job["failed"]))

    # --- Bulk API 2.0 query ---------------------------------------------------------------------------------
    def _bulk_query(self, method: str, rest: str, params: dict, body: bytes):
        store, jobs = self.server.store, self.server.jobs
        parts = rest.split("/")[2:]
        if method == "POST" and not parts:
            spec = json.loads(body)
            rows, query = store.run_query(spec.get("query", ""), spec.get("operation") == "queryAll")
            job_id = "750" + uuid.uuid4().hex[:15]
            info = {"id": job_id, "operation": spec.get("operation"), "object": query.sobject,
                    "state": "JobComplete", "numberRecordsProcessed": len(rows)}
            jobs[job_id] = {"info": info, "rows": rows, "query": query}
            return 200, info, "application/json", None
        job = jobs.get(parts[0] if parts else "")
        if job is None:
            raise RequestError(404, "NOT_FOUND", "job not found")
        if method == "GET" and len(parts) == 1:
            return 200, job["info"], "application/json", None
        if method == "GET" and parts[1:] == ["results"]:
            start = int(params.get("locator", ["0"])[0] or 0)
            size = int(params.get("maxRecords", [str(store.page_size)])[0])
            page = job["rows"][start:start + size]
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
            fields = job["query"].fields
            writer.writerow(fields)
            for record in page:
                values = [store._get(job["query"].sobject, record, f) for f in fields]
                writer.writerow(["" if v is None else ("true" if v is True else "false" if v is False else v)
                                 for v in values])
            end = start + len(page)
            locator = str(end) if end < len(job["rows"]) else "null"
            return 200, out.getvalue(), "text/csv", {"Sforce-Locator": locator,
                                                     "Sforce-NumberOfRecords": str(len(page))}
        if method == "DELETE" and len(parts) == 1:
            jobs.pop(parts[0])
            return 204, None, "application/json", None
        raise RequestError(404, "NOT_FOUND", "The requested resource does not exist")


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Store, address: tuple[str, int] = ("127.0.0.1", 0)):
        super().__init__(address, _Handler)
        self.store = store
        self.jobs: dict[str, dict] = {}


__all__ = ["NULL_CSV", "EmulatorServer"]


def wrap_tls(server: EmulatorServer, cert_pem: str, key_pem: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem, key_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)


def serve_in_thread(server: EmulatorServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="salesforce-emulator",
                              daemon=True)
    thread.start()
    return thread
