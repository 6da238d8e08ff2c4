"""zeep's HTTP transport with retries on transport failures only, and log redaction for its envelopes."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from zeep.transports import Transport

from crmbridge.mappings.envvars import Redactor

log = logging.getLogger("crmbridge.soap")

RETRY_STATUS = {429, 502, 503, 504}  # a proxy or a busy server: worth another try; a Fault is not


class RetryingTransport(Transport):
    """Retries a POST on connection errors, time-outs and HTTP 429/502/503/504, with exponential backoff."""

    def __init__(self, retries: int = 3, backoff: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.retries, self.backoff = retries, backoff

    def post(self, address: str, message: Any, headers: dict[str, str]) -> requests.Response:
        attempt = 0
        while True:
            try:
                response = super().post(address, message, headers)
            except (requests.ConnectionError, requests.Timeout) as error:
                if attempt >= self.retries:
                    raise
                reason = type(error).__name__
            else:
                if response.status_code not in RETRY_STATUS or attempt >= self.retries:
                    if response.status_code in RETRY_STATUS:
                        raise requests.HTTPError(f"HTTP {response.status_code} after {attempt + 1} attempts",
                                                 response=response)
                    return response
                reason = f"HTTP {response.status_code}"
            delay = self.backoff * 2 ** attempt
            attempt += 1
            log.warning("SOAP call to %s failed (%s); retry %d of %d in %.1f s", address.split("?")[0], reason,
                        attempt, self.retries, delay)
            time.sleep(delay)


class _RedactingFilter(logging.Filter):
    """zeep logs whole envelopes at DEBUG, WS-Security header included: replace secret values first."""

    def __init__(self) -> None:
        super().__init__()
        self.redactors: dict[tuple[str, ...], Redactor] = {}  # by their secrets: one per distinct set

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactors:
            text = record.getMessage()
            for redact in self.redactors.values():
                text = redact(text)
            record.msg, record.args = text, ()
        return True


_FILTER = _RedactingFilter()


def install_log_redaction(secrets: set[str]) -> None:
    """Redact these secrets in every zeep log record (the filter is installed once per logger)."""
    key = tuple(sorted(secrets))
    if key not in _FILTER.redactors:
        _FILTER.redactors[key] = Redactor(secrets)
    for name in ("zeep", "zeep.transports", "zeep.wsdl.bindings.soap", "zeep.xsd.schema", "zeep.wsse"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
