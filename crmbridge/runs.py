"""Run directories: each run keeps its staging store, manifest, reconciliation and log in one place."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crmbridge.errors import CrmbridgeError

MANIFEST = "manifest.json"
RECONCILIATION = "reconciliation.json"
STAGING = "staging.duckdb"
LOG = "run.log"


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class Manifest:
    run_id: str
    mapping_name: str
    mapping_path: str
    mapping_sha256: str
    dry_run: bool
    started_at: str
    status: str = "running"  # running | succeeded | failed
    finished_at: str | None = None
    error: str | None = None
    operator: str = field(default_factory=lambda: os.environ.get("USER") or os.environ.get("USERNAME") or "unknown")
    flow_run_id: str | None = None
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)  # when the run was resumed, oldest first
    staging_opened: bool = False  # the run's staging store exists (a resume needs it from then on)


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def staging_path(self) -> Path:
        return self.path / STAGING

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def write_manifest(self, manifest: Manifest) -> None:
        _write_json(self.path / MANIFEST, asdict(manifest))

    def manifest(self) -> Manifest:
        return Manifest(**json.loads((self.path / MANIFEST).read_text(encoding="utf-8")))

    def write_reconciliation(self, data: dict[str, Any]) -> None:
        _write_json(self.path / RECONCILIATION, data)

    def reconciliation(self) -> dict[str, Any] | None:
        path = self.path / RECONCILIATION
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    temporary.replace(path)  # atomic: a crash never leaves half a manifest


def runs_root(state_dir: Path) -> Path:
    return state_dir / "runs"


def create_run(state_dir: Path, run_id: str | None = None) -> RunDir:
    path = runs_root(state_dir) / (run_id or new_run_id())
    path.mkdir(parents=True, exist_ok=False)
    return RunDir(path)


def list_runs(state_dir: Path) -> list[RunDir]:
    root = runs_root(state_dir)
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if (p / MANIFEST).is_file()), key=lambda r: r.run_id)


def find_run(state_dir: Path, run_id: str) -> RunDir:
    matches = [r for r in list_runs(state_dir) if r.run_id == run_id or r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CrmbridgeError(f"no run `{run_id}` under {runs_root(state_dir)} (see `crmbridge runs`)")
    raise CrmbridgeError(f"`{run_id}` matches several runs: {', '.join(r.run_id for r in matches)}")
