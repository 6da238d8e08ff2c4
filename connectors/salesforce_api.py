"""Calls to Salesforce with the behaviour a migration needs: backoff on limits and 5xx, re-login on an
expired session, a per-run call budget, API usage from `Sforce-Limit-Info`, and Bulk API 2.0 ingest jobs
driven directly (simple-salesforce's Bulk 2.0 helper orders CSV columns arbitrarily, waits 5 s per job and
crashes on the 204 of a job deletion)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceError,
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceRefusedRequest,
)

from crmbridge.errors import TargetError

log = logging.getLogger("crmbridge.salesforce")
RETRIABLE_ROW_ERRORS = frozenset({"UNABLE_TO_LOCK_ROW"})
MAX_JOB_BYTES = 100 * 1024 * 1024  # Bulk API 2.0 refuses uploads over 150 MB (base64); stay well below


class ApiLimitReached(TargetError):
    """The run's call budget or the org's daily API quota is used up: the run stops at a batch boundary."""


@dataclass
class RowResult:
    ok: bool
    record_id: str | None = None
    created: bool = False
    code: str = ""  # Salesforce error code, e.g. REQUIRED_FIELD_MISSING
    fields: str = ""  # the fields the error names (never their values)


def error_code(error: SalesforceError) -> str:
    """The error code in a refused request's body (simple-salesforce classifies by HTTP status only)."""
    content = getattr(error, "content", None)
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", ""))
    if isinstance(content, dict):
        return str(content.get("errorCode", ""))
    return ""


class Api:
    """One logged-in client plus the call accounting of one run."""

    def __init__(self, connect: Callable[[], Salesforce], name: str, budget: int | None = None,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0):
        self._connect = connect
        self.name = name
        self.budget = budget
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.calls = 0
        self.retries = 0
        self.reauths = 0
        self.org_used: int | None = None
        self.org_total: int | None = None
        self._sf: Salesforce | None = None

    @property
    def sf(self) -> Salesforce:
        if self._sf is None:
            self._sf = self._connect()
        return self._sf

    def usage(self) -> dict[str, Any]:
        return {"calls": self.calls, "retries": self.retries, "reauthentications": self.reauths,
                "org_api_used": self.org_used, "org_api_limit": self.org_total, "budget": self.budget}

    # --- budget --------------------------------------------------------------------------------------------
    def ensure_budget(self, needed: int, what: str) -> None:
        """Stop before starting work that the run's budget or the org's quota cannot finish."""
        if self.budget is not None and self.calls + needed > self.budget:
            raise ApiLimitReached(
                f"Salesforce `{self.name}`: the run's API budget of {self.budget} calls would be exceeded by "
                f"{what} (~{needed} calls; {self.calls} used). The run stopped cleanly after its last complete "
                "batch: every row written so far is in the ledger. Run the mapping again (or raise "
                "`api_budget`) to carry on; rows already in Salesforce are found by external id and not "
                "created twice.")
        if self.org_total is not None and self.org_used is not None and self.org_used + needed > self.org_total:
            raise ApiLimitReached(
                f"Salesforce `{self.name}`: the org's daily API quota is nearly used up ({self.org_used} of "
                f"{self.org_total}); {what} needs ~{needed} calls. The run stopped cleanly after its last "
                "complete batch; run the mapping again once the quota has reset.")

    def _record_usage(self) -> None:
        usage = getattr(self._sf, "api_usage", {}).get("api-usage") if self._sf else None
        if usage is not None:
            self.org_used, self.org_total = usage.used, usage.total

    # --- calls ----------------------------------------------------------------------------------------------
    def call(self, action: Callable[[Salesforce], Any], what: str, retry: bool = True) -> Any:
        """Run one API request; retry on limits, 5xx and network errors, log in again on an expired session."""
        attempt = 0
        while True:
            self.ensure_budget(1, what)
            self.calls += 1
            try:
                result = action(self.sf)
                self._record_usage()
                return result
            except SalesforceExpiredSession:
                self._record_usage()
                if attempt >= self.max_retries:
                    raise TargetError(f"Salesforce `{self.name}`: the session expired and logging in again "
                                      f"did not help ({what})") from None
                log.warning("Salesforce %s: session expired during %s; logging in again", self.name, what)
                self._sf = None  # the next call logs in again (a refreshed session id, a new token)
                self.reauths += 1
            except SalesforceRefusedRequest as error:
                self._record_usage()
                code = error_code(error)
                if code != "REQUEST_LIMIT_EXCEEDED" or not retry or attempt >= self.max_retries:
                    raise _target_error(self.name, what, error) from None
                if self.org_total is not None and self.org_used is not None and self.org_used >= self.org_total:
                    raise ApiLimitReached(
                        f"Salesforce `{self.name}`: the org's daily API quota is used up ({self.org_used} of "
                        f"{self.org_total}). The run stopped cleanly after its last complete batch; run the "
                        "mapping again once the quota has reset.") from None
                log.warning("Salesforce %s: REQUEST_LIMIT_EXCEEDED during %s; backing off", self.name, what)
            except SalesforceGeneralError as error:
                self._record_usage()
                if error.status < 500 or not retry or attempt >= self.max_retries:
                    raise _target_error(self.name, what, error) from None
                log.warning("Salesforce %s: HTTP %s during %s; retrying", self.name, error.status, what)
            except requests.RequestException as error:
                if not retry or attempt >= self.max_retries:
                    raise TargetError(f"Salesforce `{self.name}`: {what} failed ({type(error).__name__})") from None
            except SalesforceError as error:
                self._record_usage()
                raise _target_error(self.name, what, error) from None
            attempt += 1
            self.retries += 1
            time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    def rest(self, path: str, method: str = "GET", what: str = "", retry: bool = True, **kwargs: Any) -> Any:
        return self.call(lambda sf: sf.restful(path, method=method, **kwargs), what or f"{method} {path}", retry)

    def raw(self, method: str, path: str, what: str, retry: bool = True, **kwargs: Any) -> requests.Response:
        """A request whose answer is not JSON (CSV results, 204s), through simple-salesforce's session."""
        return self.call(lambda sf: sf._call_salesforce(method, sf.base_url + path, name=path, **kwargs),
                         what, retry)

    # --- queries --------------------------------------------------------------------------------------------
    def first_page(self, soql: str, include_deleted: bool = False) -> dict:
        """The first REST page of a query; its `totalSize` tells how large the whole result is."""
        return self.call(lambda sf: sf.query(soql, include_deleted=include_deleted), "a query")

    def query_pages(self, soql: str, include_deleted: bool = False, first: dict | None = None) -> Iterator[list[dict]]:
        """REST query, one page (up to 2,000 records) at a time, following nextRecordsUrl."""
        page = first if first is not None else self.first_page(soql, include_deleted)
        while True:
            yield page["records"]
            if page.get("done", True) or not page.get("nextRecordsUrl"):
                return
            next_url = page["nextRecordsUrl"]
            page = self.call(lambda sf, u=next_url: sf.query_more(u, identifier_is_url=True,
                                                                  include_deleted=include_deleted), "a query page")

    def bulk_query_pages(self, soql: str, include_deleted: bool = False,
                         page_size: int = 50_000) -> Iterator[list[dict[str, str]]]:
        """Bulk API 2.0 query: CSV result pages streamed by locator, never the whole result at once."""
        operation = "queryAll" if include_deleted else "query"
        job = self.rest("jobs/query", "POST", "creating a bulk query job", json={"operation": operation,
                                                                                  "query": soql})
        self._wait(f"jobs/query/{job['id']}", "a bulk query job")
        locator = ""
        while True:
            params = {"maxRecords": page_size, **({"locator": locator} if locator else {})}
            response = self.raw("GET", f"jobs/query/{job['id']}/results", "reading bulk query results",
                                params=params, headers={"Accept": "text/csv"})
            # Bulk results are UTF-8 whatever the Content-Type says (requests would guess ISO-8859-1)
            yield list(csv.DictReader(io.StringIO(response.content.decode("utf-8"))))
            locator = response.headers.get("Sforce-Locator", "null")
            if not locator or locator == "null":
                break
        self.raw("DELETE", f"jobs/query/{job['id']}", "deleting a bulk query job")

    def _wait(self, path: str, what: str) -> dict:
        delay = 0.02
        while True:
            info = self.rest(path, what=f"polling {what}")
            if info["state"] in ("JobComplete", "Failed", "Aborted"):
                return info
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # --- writes -----------------------------------------------------------------------------------------------
    def collection_upsert(self, sobject: str, ext_field: str, records: list[dict]) -> list[RowResult]:
        """sObject Collections upsert (up to 200 records a call); idempotent, so retried on 5xx."""
        answer = self.rest(f"composite/sobjects/{sobject}/{ext_field}", "PATCH",
                           f"upserting {len(records)} {sobject} records",
                           json={"allOrNone": False, "records": records})
        return [_collection_result(item) for item in answer]

    def bulk_upsert(self, sobject: str, ext_field: str, header: list[str], rows: list[list[str]]) -> list[RowResult]:
        """One Bulk API 2.0 upsert job per call (results in input order). A job that fails as a whole is
        aborted and run again: every row is an upsert by external id, so nothing is created twice."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._bulk_job(sobject, ext_field, header, rows)
            except _JobBroken as broken:
                if attempt >= self.max_retries:
                    raise TargetError(f"Salesforce `{self.name}`: a Bulk API 2.0 job for {sobject} kept "
                                      f"failing ({broken})") from None
                self.retries += 1
                log.warning("Salesforce %s: bulk job for %s failed (%s); running it again", self.name, sobject,
                            broken)
                time.sleep(min(self.max_backoff, self.backoff * 2 ** attempt))
        raise AssertionError("unreachable")

    def _bulk_job(self, sobject: str, ext_field: str, header: list[str], rows: list[list[str]]) -> list[RowResult]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        data = out.getvalue().encode("utf-8")
        if len(data) > MAX_JOB_BYTES and len(rows) > 1:  # one upload per job, capped by the API: split
            middle = len(rows) // 2
            return (self._bulk_job(sobject, ext_field, header, rows[:middle])
                    + self._bulk_job(sobject, ext_field, header, rows[middle:]))
        job = self.rest("jobs/ingest", "POST", f"creating a bulk upsert job for {sobject}",
                        json={"object": sobject, "operation": "upsert", "externalIdFieldName": ext_field,
                              "contentType": "CSV", "lineEnding": "LF"})
        path = f"jobs/ingest/{job['id']}"
        try:
            self.raw("PUT", f"{path}/batches", f"uploading {len(rows)} {sobject} rows", retry=False,
                     data=data, headers={"Content-Type": "text/csv"})
            self.rest(path, "PATCH", "closing a bulk job", retry=False, json={"state": "UploadComplete"})
        except TargetError as error:
            self._abort(path)
            raise _JobBroken(str(error)) from None
        info = self._wait(path, "a bulk upsert job")
        if info["state"] != "JobComplete":
            raise _JobBroken(f"job {info['state']}: {str(info.get('errorMessage', ''))[:200]}")
        ext_at = header.index(ext_field)
        results: dict[str, RowResult] = {}
        for kind in ("successfulResults", "failedResults", "unprocessedrecords"):
            text = self.raw("GET", f"{path}/{kind}", "reading bulk job results",
                            headers={"Accept": "text/csv"}).content.decode("utf-8")
            reader = csv.reader(io.StringIO(text))
            next(reader, None)
            for row in reader:
                if kind == "successfulResults":
                    results[row[2 + ext_at]] = RowResult(True, row[0], row[1].lower() == "true")
                elif kind == "failedResults":
                    code, _, rest = row[1].partition(":")
                    fields = rest.rsplit(":", 1)[-1].replace("--", "").strip() if ":" in rest else ""
                    results[row[2 + ext_at]] = RowResult(False, code=code, fields=fields)
                else:  # never processed (the job stopped early): retriable
                    results[row[ext_at]] = RowResult(False, code="UNPROCESSED")
        self._delete_job(path)
        return [results.get(row[ext_at], RowResult(False, code="UNPROCESSED")) for row in rows]

    def _abort(self, path: str) -> None:
        with contextlib.suppress(TargetError):  # already closed or gone: nothing to clean up
            self.rest(path, "PATCH", "aborting a bulk job", retry=False, json={"state": "Aborted"})

    def _delete_job(self, path: str) -> None:
        with contextlib.suppress(TargetError):  # housekeeping only; Salesforce drops finished jobs after 7 days
            self.raw("DELETE", path, "deleting a finished bulk job", retry=False)


class _JobBroken(Exception):
    pass


def _collection_result(item: dict) -> RowResult:
    if item.get("success"):
        return RowResult(True, item.get("id"), bool(item.get("created")))
    errors = item.get("errors") or [{}]
    first = errors[0]
    return RowResult(False, item.get("id"), code=str(first.get("statusCode", "UNKNOWN")),
                     fields=",".join(first.get("fields") or []))


def _target_error(name: str, what: str, error: SalesforceError) -> TargetError:
    # The code and status only: Salesforce messages can quote the record's values.
    code = error_code(error) or type(error).__name__
    return TargetError(f"Salesforce `{name}`: {what} failed (HTTP {getattr(error, 'status', '?')}, {code})")
