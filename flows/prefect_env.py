"""Prefect settings crmbridge needs before prefect is imported, and the optional persistent local server.

Without a configured API, Prefect starts a temporary server in every process (5-12 s before the first
row moves). `crmbridge server start` keeps one running on 127.0.0.1; runs then start in well under a
second. PREFECT_API_URL, when set, always wins (a team's shared server).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 4280


def configure_prefect(verbose: bool = False) -> str:
    """Set Prefect's environment; returns how runs will reach Prefect (for the CLI to show)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS", "false")
    if not verbose:
        # Rich progress bars and crmbridge's own error messages are the console output; Prefect's log
        # lines (and tracebacks) still reach its API and UI, just not the terminal.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect API {os.environ['PREFECT_API_URL']}"
    server = running_server()
    if server:
        os.environ["PREFECT_API_URL"] = server.api_url
        return f"persistent local Prefect server {server.api_url}"
    return "temporary local Prefect server (`crmbridge server start` makes runs start faster)"


def crmbridge_home() -> Path:
    return Path(os.environ.get("CRMBRIDGE_HOME", Path.home() / ".crmbridge"))


@dataclass
class ServerInfo:
    pid: int
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def _state_file() -> Path:
    return crmbridge_home() / "prefect-server.json"


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def running_server() -> ServerInfo | None:
    path = _state_file()
    if not path.is_file():
        return None
    try:
        info = ServerInfo(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None
    return info if healthy(info.api_url) else None


def start_server(port: int = DEFAULT_PORT, wait: float = 90.0) -> ServerInfo:
    existing = running_server()
    if existing:
        return existing
    home = crmbridge_home()
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "prefect-server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    info = ServerInfo(process.pid, port)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited at start (see {home / 'prefect-server.log'})")
        if healthy(info.api_url):
            _state_file().write_text(json.dumps(info.__dict__), encoding="utf-8")
            return info
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the Prefect server did not answer within {wait:.0f} s (see {home / 'prefect-server.log'})")


def stop_server() -> bool:
    path = _state_file()
    if not path.is_file():
        return False
    info = ServerInfo(**json.loads(path.read_text(encoding="utf-8")))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info.pid, signal.SIGTERM)
    path.unlink(missing_ok=True)
    return True
