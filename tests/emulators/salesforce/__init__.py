"""A local Salesforce emulator (REST + Bulk API 2.0 subset over HTTPS) for tests, benchmarks and the sandbox.

    emulator = start_emulator()            # or the (instance_url, session_id, ca_path, stop) tuple:
    url, sid, ca, stop = emulator          #   it unpacks like one
    emulator.store.inject("rate_limit")    # faults on demand
    stop()

It is an emulator, not Salesforce: it keeps records in memory and enforces the rules crmbridge relies on
(field types, lengths, required fields, restricted picklists, unique external ids, parent look-ups by
external id), and answers with the real API's status codes, error codes and CSV result formats.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trustme

from .schema import OBJECTS, FieldDef, fields_of
from .server import EmulatorServer, serve_in_thread, wrap_tls
from .store import Fault, Store

__all__ = ["OBJECTS", "Emulator", "Fault", "FieldDef", "Store", "fields_of", "start_emulator"]


@dataclass
class Emulator:
    instance_url: str
    session_id: str
    ca_path: str
    stop: Callable[[], None]
    store: Store

    def __iter__(self):
        return iter((self.instance_url, self.session_id, self.ca_path, self.stop))


def start_emulator(cert_dir: str | Path | None = None, port: int = 0, **store_options) -> Emulator:
    """Start the emulator on 127.0.0.1 with a fresh trustme CA; `ca_path` is the CA to verify it with."""
    directory = Path(cert_dir or tempfile.mkdtemp(prefix="sf-emulator-"))
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    store = Store(**store_options)
    server = EmulatorServer(store, ("127.0.0.1", port))
    wrap_tls(server, str(cert_path), str(key_path))
    thread = serve_in_thread(server)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    host, bound = server.server_address[:2]
    return Emulator(f"https://{host}:{bound}", store.session_id, str(ca_path), stop, store)
