"""Prefect settings crmbridge needs before prefect is imported (no network here, quiet console)."""

from __future__ import annotations

import os


def configure_prefect(verbose: bool = False) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    os.environ.setdefault("PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS", "false")
    if not verbose:
        # Rich progress bars are the CLI's console output; Prefect's own lines still reach its API/UI.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
