"""`crmbridge sandbox salesforce`: the local Salesforce EMULATOR from the source checkout, for trying the demo.

It is not Salesforce: records live in memory in this process and vanish when it stops. It speaks the REST +
Bulk API 2.0 subset crmbridge uses, over HTTPS with a throw-away certificate authority (tests/emulators).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from crmbridge.cli.render import console, errors

sandbox_app = typer.Typer(help="Local stand-ins for external systems (emulators for trying things, not the real "
                               "services).", no_args_is_help=True)
_EMULATORS = Path(__file__).resolve().parents[1] / "tests"


def _load_emulator():
    if not (_EMULATORS / "emulators" / "salesforce" / "__init__.py").is_file():
        errors.print("[red]error:[/] the Salesforce emulator ships with the source checkout "
                     "(tests/emulators/salesforce), which this installation does not have")
        raise typer.Exit(2)
    sys.path.insert(0, str(_EMULATORS))
    from emulators.salesforce import start_emulator

    return start_emulator


@sandbox_app.command("salesforce")
def salesforce(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).", min=0, max=65535)] = 8443,
    directory: Annotated[Path, typer.Option(help="Where the CA certificate and the .env lines are written.")] = Path(
        ".crmbridge/sandbox/salesforce"),
    seconds: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).",
                                                   min=0)] = None,
) -> None:
    """Run a local Salesforce EMULATOR (in memory, HTTPS, REST + Bulk API 2.0 subset) to try mappings."""
    start_emulator = _load_emulator()
    directory.mkdir(parents=True, exist_ok=True)
    emulator = start_emulator(directory, port=port)
    env_lines = (f"SF_INSTANCE_URL={emulator.instance_url}\nSF_SESSION_ID={emulator.session_id}\n"
                 f"SF_CA_BUNDLE={Path(emulator.ca_path).resolve()}\n")
    (directory / "sandbox.env").write_text(env_lines, encoding="utf-8")
    console.print("[bold yellow]EMULATOR[/] - a local stand-in for Salesforce, not Salesforce: records are kept in "
                  "memory and lost when it stops.")
    console.print(f"objects: Account, Contact (external id field Legacy_Id__c)\n{env_lines}"
                  f"(also written to {directory / 'sandbox.env'}); a target for it:\n"
                  "  type: salesforce\n  instance_url: ${SF_INSTANCE_URL}\n  session_id: ${SF_SESSION_ID}\n"
                  "  ca_bundle: ${SF_CA_BUNDLE}\n"
                  f"the demo into it: {_EMULATORS / 'emulators' / 'salesforce' / 'demo_mapping.yaml'} (copy it next "
                  "to the demo's data/)", highlight=False)
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
        store = emulator.store
        console.print(f"emulator stopped: {len(store.records['Account'])} accounts, "
                      f"{len(store.records['Contact'])} contacts, {store.api_used} API calls served")
