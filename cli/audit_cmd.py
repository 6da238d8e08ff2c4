"""`crmbridge audit verify|search|report|export|checkpoint|prove|public-key|purge|ropa`.

Every command takes the mapping file (its `settings.audit` names the store and keys); `verify --file` and
`checkpoint verify` need only an exported file and the public key, as a third party would.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crmbridge.cli.common import MappingArg
from crmbridge.cli.common import fail as _fail
from crmbridge.cli.render import console, errors
from crmbridge.errors import CrmbridgeError, MappingError
from crmbridge.mappings import load_mapping

audit_app = typer.Typer(help="The compliance audit trail: verify, search, report, export, retention.",
                        no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]




def _mapping(path: Path):
    try:
        return load_mapping(path)
    except MappingError as error:
        errors.print(f"[red]{error}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _note(loaded, action: str, **details) -> None:
    """Record the audit command itself in the trail (who verified, exported or purged, and the outcome)."""
    import getpass
    import os

    from crmbridge.audit.project import open_store
    from crmbridge.audit.trail import AuditTrail

    trail = AuditTrail(open_store(loaded), f"audit-{os.getpid()}", loaded.name, loaded.sha256,
                       loaded.audit.operator or getpass.getuser())
    try:
        trail.append(action, **details)
    finally:
        trail.close()


def _time(text: str | None) -> str | None:
    """A date or time from the command line as the store's UTC ISO text (naive means UTC)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"`{text}` is not an ISO date or time (expected e.g. 2026-11-01 or 2026-11-01T08:00)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _print_verification(result, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
        return
    if result.ok:
        console.print(f"[green]verified[/]: {result.events:,} events (seq {result.first_seq}..{result.last_seq}), "
                      f"{result.checkpoints} signed checkpoints; head {(result.head or '')[:16]}")
        return
    errors.print(f"[red]FAILED[/]: first bad event at seq {result.first_bad}", highlight=False)
    for finding in result.findings[:20]:
        errors.print(f"  seq {finding.seq}: {finding.kind}: {finding.message}", highlight=False, markup=False)


@audit_app.command()
def verify(
    mapping: Annotated[Path | None, typer.Argument(help="The mapping file (YAML).", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Verify an exported log instead of the store.")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="PEM public key to verify with "
                                                    "(required with --file; default: the project's key).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the hash chain and check every signed checkpoint; exit 1 at the first bad event."""
    from crmbridge.audit.verify import verify_export, verify_store

    try:
        if file is not None:
            if public_key is None:
                raise _fail("--file needs --public-key: a third party verifies with the key it holds")
            result = verify_export(file, public_key.read_text())
        else:
            if mapping is None:
                raise _fail("give the mapping file, or --file with --public-key")
            from crmbridge.audit.project import open_store, signer_for
            from crmbridge.audit.signing import load_public_key

            loaded = _mapping(mapping)
            key = load_public_key(public_key.read_text()) if public_key else signer_for(loaded, create=False).public
            store = open_store(loaded)
            try:
                result = verify_store(store, key)
            finally:
                store.close()
            _note(loaded, "audit_verified", outcome="succeeded" if result.ok else "failed",
                  checkpoint={"events": result.events, "last_seq": result.last_seq, "first_bad": result.first_bad})
    except (CrmbridgeError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    _print_verification(result, as_json)
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command()
def search(
    mapping: MappingArg,
    subject: Annotated[str | None, typer.Option(help="A data subject's identifying value (e.g. an e-mail); "
                                                "hashed with the project's reference key before lookup.")] = None,
    run: Annotated[str | None, typer.Option(help="Run id.")] = None,
    record: Annotated[str | None, typer.Option(help="A target id or source key.")] = None,
    action: Annotated[str | None, typer.Option(help="Event action, e.g. record_created.")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC date/time on.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this UTC date/time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many events.", min=1)] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Events by data subject, run, record, action and time, with the lineage of record events."""
    from crmbridge.audit.project import open_store, referencer_for
    from crmbridge.audit.search import Query, lineage
    from crmbridge.audit.search import search as run_search

    loaded = _mapping(mapping)
    store = open_store(loaded)
    try:
        query = Query(subject=subject, run=run, record=record, action=action, since=_time(since), until=_time(until),
                      limit=limit)
        found = run_search(store, referencer_for(loaded), [e.name for e in loaded.entities], query)
        runs = lineage(store, [e for e in found if e["action"].startswith("record_")]) if (record or subject) else {}
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    finally:
        store.close()
    if as_json:
        sys.stdout.write(json.dumps({"events": found, "lineage": runs}, indent=2, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{len(found)} event(s)")
    for column in ("seq", "time", "action", "run", "entity", "target id", "reason", "actor"):
        table.add_column(column)
    for e in found:
        table.add_row(str(e["seq"]), e["time"], e["action"], e.get("run_id") or "", e.get("entity") or "",
                      e.get("target_id") or "", e.get("reason") or "", e["actor"])
    console.print(table)
    for run_id, info in runs.items():
        console.print(f"run {run_id}: mapping {info['mapping']} (sha256 {(info['mapping_sha256'] or '')[:12]}), "
                      f"started {info['started']} by {info['actor']}", highlight=False)


@audit_app.command()
def report(
    mapping: MappingArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The report file.")],
    fmt: Annotated[str, typer.Option("--format", help="html, csv or json.")] = "html",
    run: Annotated[str | None, typer.Option(help="Only this run.")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC date/time on.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this UTC date/time.")] = None,
) -> None:
    """A report for a run or a period (verifies the log first and says so in the report)."""
    from crmbridge.audit import report as reports
    from crmbridge.audit.project import open_store, signer_for
    from crmbridge.audit.verify import verify_store

    if fmt not in ("html", "csv", "json"):
        raise _fail(f"--format `{fmt}`: expected html, csv or json")
    loaded = _mapping(mapping)
    store = open_store(loaded)
    try:
        result = verify_store(store, signer_for(loaded, create=False).public)
        data = reports.build(store, result, run=run, since=_time(since), until=_time(until))
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    finally:
        store.close()
    render = {"html": reports.to_html, "csv": reports.to_csv, "json": reports.to_json}[fmt]
    output.write_text(render(data), encoding="utf-8")
    _note(loaded, "report_generated", outcome="succeeded", details={"format": fmt, "run": run})
    console.print(f"wrote {output} ({len(data['runs'])} run(s); log {'verified' if result.ok else 'NOT verified'})")


@audit_app.command()
def export(
    mapping: MappingArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The JSON Lines file.")],
) -> None:
    """Export the log (events, checkpoints, the public key) for verification elsewhere."""
    from crmbridge.audit.project import open_store, signer_for
    from crmbridge.audit.signing import public_pem
    from crmbridge.audit.verify import export_lines

    loaded = _mapping(mapping)
    store = open_store(loaded)
    count = 0
    try:
        with output.open("w", encoding="utf-8") as handle:
            for line in export_lines(store, public_pem(signer_for(loaded).public)):
                handle.write(line + "\n")
                count += 1
    finally:
        store.close()
    _note(loaded, "export", outcome="succeeded", details={"lines": count - 1})
    console.print(f"wrote {output} ({count - 1} lines after the header)")


@audit_app.command("public-key")
def public_key_cmd(
    mapping: MappingArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File (default: standard output).")] = None,
) -> None:
    """The public key that verifies this project's checkpoints (give it to the auditor)."""
    from crmbridge.audit.project import signer_for
    from crmbridge.audit.signing import public_pem

    try:
        pem = public_pem(signer_for(_mapping(mapping), create=False).public)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    if output:
        output.write_text(pem)
    else:
        sys.stdout.write(pem)


checkpoint_app = typer.Typer(help="Signed checkpoints: list, export, verify.", no_args_is_help=True)
audit_app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("list")
def checkpoint_list(mapping: MappingArg) -> None:
    from crmbridge.audit.project import open_store

    store = open_store(_mapping(mapping))
    try:
        table = Table(title="checkpoints")
        for column in ("seq", "run", "events", "merkle root", "key", "time"):
            table.add_column(column)
        for cp in store.checkpoints():
            body = json.loads(cp["body"])
            table.add_row(str(body["seq"]), body["run_id"], str(body["run_events"]), body["merkle_root"][:16],
                          cp["key_id"], body["time"])
        console.print(table)
    finally:
        store.close()


@checkpoint_app.command("export")
def checkpoint_export(
    mapping: MappingArg,
    run: Annotated[str, typer.Option(help="Run id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The checkpoint file (JSON).")],
) -> None:
    """The run's latest signed checkpoint, to anchor elsewhere (e-mail, ticket, timestamping service)."""
    from crmbridge.audit.project import open_store, signer_for
    from crmbridge.audit.signing import public_pem

    loaded = _mapping(mapping)
    store = open_store(loaded)
    try:
        mine = [cp for cp in store.checkpoints() if cp["run_id"] == run]
    finally:
        store.close()
    if not mine:
        raise _fail(f"no checkpoint for run {run}")
    cp = mine[-1]
    output.write_text(json.dumps({"body": cp["body"], "signature": cp["signature"], "key_id": cp["key_id"],
                                  "public_key": public_pem(signer_for(loaded).public)}, indent=2))
    console.print(f"wrote {output}")


@checkpoint_app.command("verify")
def checkpoint_verify(
    checkpoint: Annotated[Path, typer.Argument(help="An exported checkpoint (JSON).")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The PEM public key you hold.")],
    log: Annotated[Path | None, typer.Option("--log", help="An exported log: check it against the checkpoint "
                                             "(rewritten or truncated).")] = None,
    proof: Annotated[Path | None, typer.Option("--proof", help="An inclusion proof (`audit prove`).")] = None,
) -> None:
    """Verify a checkpoint with only the public key; optionally a log against it, or one event's inclusion."""
    from crmbridge.audit.signing import load_public_key, verify_signature
    from crmbridge.audit.verify import read_export, verify_proof, verify_rows

    pem = public_key.read_text()
    cp = json.loads(checkpoint.read_text())
    if not verify_signature(load_public_key(pem), cp["body"], cp["signature"]):
        raise _fail("the checkpoint's signature does not verify with this public key")
    body = json.loads(cp["body"])
    console.print(f"[green]signature valid[/]: run {body['run_id']}, chain head at seq {body['seq']}, "
                  f"{body['run_events']} run events, Merkle root {body['merkle_root'][:16]}")
    if log is not None:
        header, rows, _ = read_export(log)
        result = verify_rows(rows, [cp], header.get("anchor"), load_public_key(pem))
        _print_verification(result, False)
        if not result.ok:
            raise typer.Exit(1)
    if proof is not None:
        problems = verify_proof({**json.loads(proof.read_text()), "checkpoint": cp}, pem)
        if problems:
            for problem in problems:
                errors.print(f"  {problem}", highlight=False, markup=False)
            raise typer.Exit(1)
        console.print("[green]the event is included[/] under the signed Merkle root")


@audit_app.command()
def prove(
    mapping: MappingArg,
    seq: Annotated[int, typer.Option(help="The event to prove.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The proof file (JSON).")],
) -> None:
    """An inclusion proof for one event under its run's latest checkpoint."""
    from crmbridge.audit.canonical import COLUMNS
    from crmbridge.audit.merkle import inclusion_proof
    from crmbridge.audit.project import open_store

    store = open_store(_mapping(mapping))
    try:
        rows = list(store.rows(first_seq=seq, last_seq=seq))
        if not rows:
            raise _fail(f"no event {seq} in the live store")
        event = dict(zip(COLUMNS, rows[0], strict=True))
        cps = [cp for cp in store.checkpoints() if cp["run_id"] == event["run_id"] and cp["seq"] >= seq]
        if not cps:
            raise _fail(f"event {seq}'s run has no checkpoint covering it yet")
        cp = cps[-1]
        hashes = [h for s, h in store.hashes_of_run(event["run_id"]) if s <= cp["seq"]]
        index = [s for s, _ in store.hashes_of_run(event["run_id"]) if s <= cp["seq"]].index(seq)
    finally:
        store.close()
    output.write_text(json.dumps({"event": event, "index": index, "path": inclusion_proof(hashes, index),
                                  "checkpoint": {k: cp[k] for k in ("body", "signature", "key_id")}}, indent=2))
    console.print(f"wrote {output}: event {seq} is leaf {index} of {len(hashes)}")


@audit_app.command()
def purge(
    mapping: MappingArg,
    before: Annotated[str, typer.Option(help="Archive and remove events older than this UTC date/time.")],
    archive: Annotated[Path, typer.Option(help="The signed archive file to write first.")],
) -> None:
    """Retention: refused before the retention period (floor: three years); archives, then removes."""
    from crmbridge.audit.project import open_store, signer_for
    from crmbridge.audit.retention import purge as run_purge

    loaded = _mapping(mapping)
    store = open_store(loaded)
    try:
        result = run_purge(store, signer_for(loaded), datetime.fromisoformat(_time(before) or ""), archive,
                           loaded.audit.retention_days)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    finally:
        store.close()
    _note(loaded, "audit_purged", outcome="succeeded", checkpoint={"upto_seq": result.upto_seq,
                                                                   "purged": result.purged})
    console.print(f"archived and purged {result.purged:,} events (through seq {result.upto_seq}) into {archive}")


@audit_app.command()
def ropa(
    mapping: MappingArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File (default: standard output).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
) -> None:
    """Record of processing (GDPR Art. 30) from the mapping and the trail."""
    from crmbridge.audit import ropa as records
    from crmbridge.audit.project import open_store

    if fmt not in ("json", "csv"):
        raise _fail(f"--format `{fmt}`: expected json or csv")
    loaded = _mapping(mapping)
    store = open_store(loaded)
    try:
        data = records.record_of_processing(loaded, store)
    finally:
        store.close()
    text = records.to_json(data) if fmt == "json" else records.to_csv(data)
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
