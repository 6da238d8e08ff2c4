"""Per-data-subject data keys for erasure by crypto-shredding.

Every data subject (identified by the subject reference, a keyed HMAC of e.g. their email) gets a random
AES-256 key, stored wrapped (AES-256-GCM) by the keyring's current key-encryption key in a small SQLite file
next to the keyring. Values of that subject are encrypted under their key; destroying the key (`erase`)
makes every copy of those values unreadable, backups included. Rotating the KEK re-wraps the data keys
without touching the data.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crmbridge.protection.errors import ErasedSubjectError, KeyringError
from crmbridge.protection.keyring import Keyring

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_keys (
    id INTEGER PRIMARY KEY, ref TEXT UNIQUE NOT NULL, kek_id INTEGER NOT NULL, wrapped BLOB NOT NULL
);
"""


_CACHE_LIMIT = 100_000  # unwrapped subject keys kept in memory


def _wrap_aad(subject_id: int) -> bytes:
    return b"crmbridge-subject-key" + struct.pack(">I", subject_id)


class SubjectKeys:
    def __init__(self, keyring: Keyring, path: str | Path):
        self.keyring, self.path = keyring, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Any thread: Prefect runs a flow's tasks in worker threads (writes are serialised by the caller).
        self.con = sqlite3.connect(self.path, check_same_thread=False)
        self.con.executescript(_SCHEMA)
        self._ciphers: dict[int, AESGCM] = {}

    def close(self) -> None:
        self.con.close()

    def _unwrap(self, subject_id: int, kek_id: int, wrapped: bytes) -> AESGCM:
        kek = self.keyring.gcm(kek_id, "kek")
        try:
            key = kek.decrypt(wrapped[:12], wrapped[12:], _wrap_aad(subject_id))
        except InvalidTag:
            raise KeyringError(f"subject key {subject_id} does not unwrap (altered store)") from None
        return AESGCM(key)

    def _wrap(self, subject_id: int, key: bytes) -> tuple[int, bytes]:
        kek = self.keyring.current("kek")
        nonce = os.urandom(12)
        return kek.id, nonce + self.keyring.gcm(kek.id, "kek").encrypt(nonce, key, _wrap_aad(subject_id))

    def ensure(self, refs: Iterable[str]) -> dict[str, tuple[int, AESGCM]]:
        """(subject key id, cipher) per reference, creating keys for new subjects in one transaction."""
        wanted = list(dict.fromkeys(refs))
        if len(self._ciphers) > _CACHE_LIMIT:  # memory stays bounded by the batch size, not the subject count
            self._ciphers.clear()
        found: dict[str, tuple[int, AESGCM]] = {}
        rows: list[tuple[int, str, int, bytes]] = []
        for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
            chunk = wanted[start:start + 900]
            marks = ",".join("?" * len(chunk))
            rows += self.con.execute(f"SELECT id, ref, kek_id, wrapped FROM subject_keys WHERE ref IN ({marks})",
                                     chunk).fetchall()
        for subject_id, ref, kek_id, wrapped in rows:
            cipher = self._ciphers.get(subject_id) or self._unwrap(subject_id, kek_id, wrapped)
            self._ciphers[subject_id] = cipher
            found[ref] = (subject_id, cipher)
        new = [ref for ref in wanted if ref not in found]
        if new:
            with self.con:
                next_id = (self.con.execute("SELECT max(id) FROM subject_keys").fetchone()[0] or 0) + 1
                inserts = []
                for offset, ref in enumerate(new):
                    subject_id, key = next_id + offset, AESGCM.generate_key(256)
                    kek_id, wrapped = self._wrap(subject_id, key)
                    inserts.append((subject_id, ref, kek_id, wrapped))
                    cipher = self._ciphers[subject_id] = AESGCM(key)
                    found[ref] = (subject_id, cipher)
                self.con.executemany("INSERT INTO subject_keys VALUES (?, ?, ?, ?)", inserts)
        return found

    def cipher(self, subject_id: int) -> AESGCM:
        cipher = self._ciphers.get(subject_id)
        if cipher is not None:
            return cipher
        if len(self._ciphers) > _CACHE_LIMIT:
            self._ciphers.clear()
        row = self.con.execute("SELECT kek_id, wrapped FROM subject_keys WHERE id = ?", [subject_id]).fetchone()
        if row is None:
            raise ErasedSubjectError(f"subject key {subject_id} was erased (or never existed): the value can no "
                                     "longer be decrypted")
        cipher = self._ciphers[subject_id] = self._unwrap(subject_id, *row)
        return cipher

    def find(self, ref: str) -> int | None:
        row = self.con.execute("SELECT id FROM subject_keys WHERE ref = ?", [ref]).fetchone()
        return row[0] if row else None

    def erase(self, ref: str) -> int | None:
        """Destroy the subject's key and its reference entry; returns the erased key id (None: unknown)."""
        subject_id = self.find(ref)
        if subject_id is None:
            return None
        with self.con:
            self.con.execute("DELETE FROM subject_keys WHERE id = ?", [subject_id])
        self.con.execute("VACUUM")  # do not leave the wrapped key in free pages of the file
        self._ciphers.pop(subject_id, None)
        return subject_id

    def rewrap(self) -> int:
        """Re-wrap every subject key under the current KEK (after `keys rotate --kind kek`)."""
        current = self.keyring.current("kek").id
        rows = self.con.execute("SELECT id, kek_id, wrapped FROM subject_keys WHERE kek_id != ?",
                                [current]).fetchall()
        updates = []
        for subject_id, kek_id, wrapped in rows:
            kek = self.keyring.gcm(kek_id, "kek")
            key = kek.decrypt(wrapped[:12], wrapped[12:], _wrap_aad(subject_id))
            updates.append((*self._wrap(subject_id, key), subject_id))
        with self.con:
            self.con.executemany("UPDATE subject_keys SET kek_id = ?, wrapped = ? WHERE id = ?", updates)
        return len(updates)

    def count(self) -> int:
        return self.con.execute("SELECT count(*) FROM subject_keys").fetchone()[0]
