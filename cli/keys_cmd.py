"""`crmbridge keys init|list|rotate|retire|reencrypt` and `crmbridge erase --subject`.

Every command takes the mapping file: its `protection:` section names the keyring and the environment
variable with the master key (or passphrase). No command prints a protected value.
"""

from __future__ import annotations

import base64
import getpass
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from crmbridge.cli.common import fail as _fail
from crmbridge.cli.render import console, errors
from crmbridge.errors import CrmbridgeError, MappingError
from crmbridge.mappings import load_mapping

keys_app = typer.Typer(help="The keyring of protected fields: create, list, rotate, retire, re-encrypt.",
                       no_args_is_help=True)

MappingArg = Annotated[Path, typer.Argument(help="The mapping file (YAML) with a `protection:` section.",
                                            show_default=False)]




def _mapping(path: Path):
    try:
        mapping = load_mapping(path)
    except MappingError as error:
        errors.print(f"[red]{error}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if mapping.protection is None:
        raise _fail(f"{path}: the mapping has no `protection:` section; expected `protection: {{keyring: "
                    "keys/keyring.json}}`", 2)
    return mapping


def _protector(mapping):
    from crmbridge.protection.keyring import open_keyring
    from crmbridge.protection.policy import Protector
    from crmbridge.protection.subject_keys import SubjectKeys

    settings = mapping.protection
    ring = open_keyring(settings.keyring, settings.master_key_env)
    subjects = SubjectKeys(ring, settings.subjects) if settings.subjects else None
    return Protector(ring, subjects, settings.index_bytes)


def _audit(mapping, action: str, **details: Any) -> str:
    """Record a key event in the project's audit store; the note says where (or why not)."""
    try:
        from crmbridge.audit.trail import AuditTrail

        store = getattr(getattr(mapping, "audit", None), "url", None) or (mapping.state_dir / "audit.db")
        mapping.state_dir.mkdir(parents=True, exist_ok=True)
        trail = AuditTrail(store, f"keys-{os.getpid()}", mapping.name, mapping.sha256, getpass.getuser())
        trail.append(action, **details)
        return "recorded in the audit trail"
    except Exception as error:  # the erasure itself has happened; say that the record is missing
        return f"[yellow]not recorded in the audit trail ({type(error).__name__})[/]"


@keys_app.command("init")
def init(
    mapping_file: MappingArg,
    passphrase: Annotated[bool, typer.Option("--passphrase", help="The environment variable holds a passphrase "
                                             "(scrypt), not a base64 master key.")] = False,
    vault_url: Annotated[str | None, typer.Option(help="Seal with HashiCorp Vault transit at this address; the "
                                                  "environment variable then holds the Vault token.")] = None,
    vault_key: Annotated[str, typer.Option(help="Vault transit key name.")] = "crmbridge",
    vault_mount: Annotated[str, typer.Option(help="Vault transit mount point.")] = "transit",
) -> None:
    """Create the keyring: one data, one deterministic (SIV) and one key-encryption key, plus the index root."""
    from crmbridge.protection.keyring import Keyring, MasterKeySealer, PassphraseSealer

    mapping = _mapping(mapping_file)
    settings = mapping.protection
    secret = os.environ.get(settings.master_key_env)
    generated = None
    if not secret:
        if passphrase or vault_url:
            raise _fail(f"set the {'Vault token' if vault_url else 'passphrase'} in ${settings.master_key_env} "
                        "first", 2)
        generated = secret = base64.b64encode(os.urandom(32)).decode()
    try:
        if vault_url:
            from crmbridge.protection.vault import VaultTransitSealer

            sealer = VaultTransitSealer(vault_url, vault_key, secret, vault_mount)
        else:
            sealer = PassphraseSealer(secret) if passphrase else MasterKeySealer.from_text(secret)
        ring = Keyring.create(settings.keyring, sealer)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    console.print(f"created {ring.path} with keys " + ", ".join(f"{k.id} ({k.kind})" for k in ring.keys))
    if generated:
        # Printed once, on purpose: it is the only way to get the new master key; it is not stored anywhere.
        console.print(f"new master key (store it in a secret manager, then):\n  export "
                      f"{settings.master_key_env}={generated}", highlight=False, soft_wrap=True)


@keys_app.command("list")
def list_keys(mapping_file: MappingArg) -> None:
    """Key ids, kinds, status and which key new writes use. Never key material."""
    mapping = _mapping(mapping_file)
    try:
        protector = _protector(mapping)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    ring = protector.keyring
    table = Table(title=str(ring.path), title_justify="left")
    for column in ("id", "kind", "status", "created", "current"):
        table.add_column(column)
    currents = {kind: ring.current(kind).id for kind in ("data", "siv", "kek")
                if any(k.kind == kind and k.status == "active" for k in ring.keys)}
    for key in ring.keys:
        table.add_row(str(key.id), key.kind, key.status, key.created, "yes" if currents.get(key.kind) == key.id else "")
    console.print(table)
    if protector.subjects is not None and Path(mapping.protection.subjects).exists():
        console.print(f"{protector.subjects.count()} data-subject keys in {mapping.protection.subjects}")


@keys_app.command("rotate")
def rotate(
    mapping_file: MappingArg,
    kind: Annotated[str, typer.Option(help="data, siv or kek.")] = "data",
) -> None:
    """Add a new current key; older keys still decrypt. Rotating the kek re-wraps every subject key."""
    mapping = _mapping(mapping_file)
    try:
        protector = _protector(mapping)
        key = protector.keyring.rotate(kind)
        rewrapped = protector.subjects.rewrap() if kind == "kek" and protector.subjects is not None else None
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    note = _audit(mapping, "key_rotated", key_id=f"{kind}:{key.id}")
    console.print(f"key {key.id} is the current {kind} key; {note}", highlight=False)
    if rewrapped is not None:
        console.print(f"{rewrapped} subject keys re-wrapped under it")


@keys_app.command("retire")
def retire(mapping_file: MappingArg, key_id: Annotated[int, typer.Argument(help="The key id to retire.")]) -> None:
    """Retire a key: it never decrypts again. Re-encrypt what it protects first."""
    mapping = _mapping(mapping_file)
    try:
        key = _protector(mapping).keyring.retire(key_id)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    note = _audit(mapping, "key_rotated", key_id=f"{key.kind}:{key.id}", details={"retired": True})
    console.print(f"key {key.id} ({key.kind}) retired; {note}", highlight=False)


@keys_app.command("reencrypt")
def reencrypt(
    mapping_file: MappingArg,
    entity: Annotated[str | None, typer.Option(help="Only this entity (default: every entity with encrypted "
                                               "fields whose target receives ciphertext).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per committed batch.", min=1)] = 1000,
) -> None:
    """Rewrite ciphertext in `receives: ciphertext` targets under the current keys, in resumable batches."""
    from crmbridge.connectors.sql import SqlConnector
    from crmbridge.protection.mapping_rules import receives_plaintext
    from crmbridge.protection.reencrypt import reencrypt_table

    mapping = _mapping(mapping_file)
    chosen = [e for e in mapping.entities if entity in (None, e.name)
              and any(f.protect in ("encrypt", "deterministic", "blind_index") for f in e.fields.values())
              and not receives_plaintext(mapping, e.target)]
    if not chosen:
        raise _fail("no entity with encrypted fields in a target that receives ciphertext"
                    + (f" named `{entity}`" if entity else ""), 2)
    try:
        protector = _protector(mapping)
        for item in chosen:
            connector = SqlConnector(mapping.targets[item.target], mapping)
            checkpoint = mapping.state_dir / "reencrypt" / f"{item.name}.json"
            result = reencrypt_table(protector, connector.engine_for("target"), item, checkpoint, batch_size)
            resumed = " (resumed after a checkpoint)" if result.resumed_after else ""
            console.print(f"{item.name}: {result.rows_read} rows read, {result.values_rewritten} values "
                          f"re-encrypted in {result.batches} batches{resumed}")
    except CrmbridgeError as error:
        raise _fail(str(error)) from None


def erase(
    mapping_file: MappingArg,
    subject: Annotated[str, typer.Option("--subject", help="The data subject's identifying value (e.g. their "
                                         "email); `-` reads it from standard input.", show_default=False)],
) -> None:
    """Erase a data subject by crypto-shredding: destroy their key and blind-index entries."""
    mapping = _mapping(mapping_file)
    value = sys.stdin.readline().rstrip("\n") if subject == "-" else subject
    if not value.strip():
        raise _fail("expected a non-empty --subject", 2)
    try:
        protector = _protector(mapping)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    if protector.subjects is None:
        raise _fail("the mapping has no subject key store (`protection.subjects`)", 2)
    ref = protector.keyring.subject_reference(value)
    erased = protector.subjects.erase(ref)
    from crmbridge.protection.policy import forget_protectors

    forget_protectors()  # no cached copy of the destroyed key survives in this process
    cleared = _clear_index_entries(mapping, protector, value)
    outcome = "succeeded" if erased is not None else "refused"
    note = _audit(mapping, "erasure", subject_ref=ref, outcome=outcome,
                  details={"subject_keys_destroyed": int(erased is not None), "index_entries_cleared": cleared})
    if erased is None:
        console.print(f"no key for subject {ref[:16]}… (never seen, or already erased); {note}", highlight=False)
        raise typer.Exit(1)
    console.print(f"subject {ref[:16]}… erased: key destroyed, {cleared} blind-index entries cleared; {note}",
                  highlight=False)


def _clear_index_entries(mapping, protector, value: str) -> int:
    """Null the subject's blind-index tokens in ciphertext targets (plaintext targets are the CRM's to erase)."""
    import sqlalchemy as sa

    from crmbridge.connectors.sql import SqlConnector
    from crmbridge.protection import blind_index
    from crmbridge.protection.mapping_rules import INDEX_SUFFIX, receives_plaintext

    cleared = 0
    for entity in mapping.entities:
        spec = entity.fields.get(entity.subject or "")
        if spec is None or spec.protect != "blind_index" or receives_plaintext(mapping, entity.target):
            continue
        token = blind_index.token(protector.keyring.index_key(entity.name, spec.name), value, protector.index_bytes)
        engine = SqlConnector(mapping.targets[entity.target], mapping).engine_for("target")
        try:
            table = sa.Table(entity.target_table, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            continue
        column = table.c[spec.name + INDEX_SUFFIX]
        with engine.begin() as conn:
            cleared += conn.execute(table.update().where(column == token).values({column.name: None})).rowcount
    return cleared
