"""Rewrite stored ciphertext under the current keys, in resumable batches.

Works on a target table that receives ciphertext (`receives: ciphertext`): rows are read in external-id
order, values whose envelope names an older data or SIV key are decrypted and encrypted again under the
current one (same entity, field and record binding), and each batch is committed with a checkpoint of the
last external id done, so an interrupted re-encryption carries on where it stopped. Values under
per-subject keys are left alone: rotating the KEK re-wraps those keys instead (`keys rotate --kind kek`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from crmbridge.protection import envelope, siv
from crmbridge.protection.errors import ProtectionError
from crmbridge.protection.policy import Protector


@dataclass
class ReencryptResult:
    rows_read: int = 0
    values_rewritten: int = 0
    batches: int = 0
    resumed_after: str | None = None


def stale(protector: Protector, token: str | None) -> bool:
    """Whether a stored envelope was made with a key that is no longer the current one of its kind."""
    if token is None:
        return False
    data = envelope.unb64(token)
    version, key_id = envelope.HEADER.unpack_from(data)
    if version == envelope.VERSION_GCM:
        return key_id != protector.keyring.current("data").id
    if version == siv.VERSION_SIV:
        return key_id != protector.keyring.current("siv").id
    return False  # subject keys: re-wrapped, never rewritten


def reencrypt_table(protector: Protector, engine: sa.Engine, entity: Any, checkpoint: Path,
                    batch_size: int = 1000, stop_after_batches: int | None = None) -> ReencryptResult:
    """Re-encrypt the entity's protected columns in its target table. `stop_after_batches` exists for tests
    and for running the work in slices; the checkpoint file makes the next call continue."""
    fields = [spec for spec in entity.fields.values() if spec.protect in ("encrypt", "deterministic", "blind_index")]
    if not fields:
        raise ProtectionError(f"entity `{entity.name}` has no encrypted field to re-encrypt")
    table = sa.Table(entity.target_table, sa.MetaData(), autoload_with=engine)
    ext_col = table.c[entity.external_id_column]
    after = json.loads(checkpoint.read_text())["after"] if checkpoint.exists() else None
    result = ReencryptResult(resumed_after=after)
    siv_key = protector.keyring.current("siv")
    while stop_after_batches is None or result.batches < stop_after_batches:
        query = sa.select(ext_col, *(table.c[f.name] for f in fields)).order_by(ext_col).limit(batch_size)
        if after is not None:
            query = query.where(ext_col > after)
        with engine.begin() as conn:
            rows = conn.execute(query).fetchall()
            if not rows:
                checkpoint.unlink(missing_ok=True)  # done: the next re-encryption starts from the top
                break
            updates = []
            for ext, *values in rows:
                changed: dict[str, str] = {}
                for spec, token in zip(fields, values, strict=True):
                    if not stale(protector, token):
                        continue
                    plain = protector.decrypt_value(entity.name, spec.name, token, ext)
                    if spec.protect == "deterministic":
                        changed[spec.name] = siv.seal_many(protector.keyring.siv(siv_key.id), siv_key.id, [plain],
                                                           siv.associated(entity.name, spec.name))[0]
                    else:
                        changed[spec.name] = protector.encrypt_values(entity.name, spec.name, [plain], [ext])[0]
                if changed:
                    updates.append((ext, changed))
            for ext, changed in updates:
                conn.execute(table.update().where(ext_col == ext).values(**changed))
            after = rows[-1][0]
            result.rows_read += len(rows)
            result.values_rewritten += sum(len(c) for _, c in updates)
            result.batches += 1
        # The checkpoint is written after the batch commits: a crash between the two repeats one batch,
        # which is harmless because re-encrypting skips values already under the current key.
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(json.dumps({"entity": entity.name, "after": after}))
    return result
