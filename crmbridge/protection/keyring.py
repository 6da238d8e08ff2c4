"""Named, versioned keys in a local keyring file sealed by a master key or a passphrase.

File (JSON): {"format": "crmbridge-keyring", "sealer": {...}, "sealed": base64(AES-256-GCM(payload))}.
The payload lists the keys (id, kind, material, status) and the blind-index root. Key kinds:
  data  32-byte AES-256-GCM keys for `encrypt` / `blind_index` fields (envelopes carry the key id)
  siv   64-byte AES-SIV keys for `deterministic` fields
  kek   32-byte key-encryption keys that wrap the per-data-subject keys
The newest active key of a kind is the one new writes use; older active keys still decrypt; a retired key
never decrypts again. Sealing is behind the `Sealer` interface so other backends (Vault transit, a cloud
KMS) can hold the master key instead of the environment.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from crmbridge.protection import blind_index
from crmbridge.protection.errors import KeyringError, RetiredKeyError, UnknownKeyError

FORMAT = "crmbridge-keyring"
KIND_BYTES = {"data": 32, "siv": 64, "kek": 32}
_SEAL_AAD = b"crmbridge-keyring/1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


class Sealer(Protocol):
    """Seals and unseals the keyring payload; `describe` is what the file records to reopen it."""

    def seal(self, payload: bytes) -> bytes: ...
    def unseal(self, sealed: bytes) -> bytes: ...
    def describe(self) -> dict[str, Any]: ...


class MasterKeySealer:
    """AES-256-GCM under a 32-byte master key (base64 in an environment variable)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise KeyringError(f"the master key is {len(key)} bytes; expected 32 (base64 of 32 random bytes, "
                               "e.g. from `crmbridge keys init --print-master-key`)")
        self._cipher = AESGCM(key)

    @classmethod
    def from_text(cls, text: str) -> MasterKeySealer:
        try:
            key = base64.b64decode(text.strip().encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise KeyringError("the master key is not base64 text; expected base64 of 32 random bytes") from None
        return cls(key)

    def seal(self, payload: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._cipher.encrypt(nonce, payload, _SEAL_AAD)

    def unseal(self, sealed: bytes) -> bytes:
        try:
            return self._cipher.decrypt(sealed[:12], sealed[12:], _SEAL_AAD)
        except InvalidTag:
            raise KeyringError("the keyring does not open with this master key or passphrase "
                               "(wrong secret, or the file was altered)") from None

    def describe(self) -> dict[str, Any]:
        return {"type": "master_key"}


class PassphraseSealer(MasterKeySealer):
    """The master key derived from a passphrase with scrypt (salt and cost stored in the file)."""

    def __init__(self, passphrase: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
                 p: int = SCRYPT_P):
        self.salt, self.n, self.r, self.p = salt or os.urandom(16), n, r, p
        super().__init__(Scrypt(salt=self.salt, length=32, n=n, r=r, p=p).derive(passphrase.encode()))

    def describe(self) -> dict[str, Any]:
        return {"type": "passphrase", "salt": _b64(self.salt), "n": self.n, "r": self.r, "p": self.p}


def sealer_for(description: dict[str, Any], secret: str) -> Sealer:
    kind = description.get("type")
    if kind == "master_key":
        return MasterKeySealer.from_text(secret)
    if kind == "passphrase":
        return PassphraseSealer(secret, _unb64(description["salt"]), description["n"], description["r"],
                                description["p"])
    if kind == "vault_transit":  # the secret is the Vault token
        from crmbridge.protection.vault import VaultTransitSealer

        return VaultTransitSealer(description["url"], description["key"], secret, description.get("mount", "transit"))
    raise KeyringError(f"unknown keyring sealer `{kind}`; expected master_key, passphrase or vault_transit")


@dataclass
class Key:
    id: int
    kind: str
    material: bytes = field(repr=False)
    status: str = "active"  # active | retired
    created: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "material": _b64(self.material), "status": self.status,
                "created": self.created}


class Keyring:
    def __init__(self, path: Path, sealer: Sealer, keys: list[Key], index_root: bytes):
        self.path, self._sealer, self.keys, self._index_root = Path(path), sealer, keys, index_root
        self._ciphers: dict[tuple[str, int], Any] = {}
        self._index_keys: dict[tuple[str, str], bytes] = {}

    # --- files --------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, sealer: Sealer) -> Keyring:
        path = Path(path)
        if path.exists():
            raise KeyringError(f"{path}: a keyring already exists; expected a new path (use `keys rotate` "
                               "to add keys to it)")
        ring = cls(path, sealer, [], os.urandom(32))
        for kind in KIND_BYTES:
            ring._add(kind)
        ring.save()
        return ring

    @classmethod
    def open(cls, path: str | Path, secret: str | None) -> Keyring:
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyringError(f"{path}: no keyring here; create one with `crmbridge keys init`") from None
        except (OSError, ValueError) as error:
            raise KeyringError(f"{path}: cannot read the keyring ({error})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise KeyringError(f"{path}: not a crmbridge keyring file")
        if not secret:
            raise KeyringError(f"{path}: the keyring is sealed; expected its master key or passphrase in the "
                               "environment variable the mapping names (`protection.master_key_env`)")
        sealer = sealer_for(document["sealer"], secret)
        payload = json.loads(sealer.unseal(_unb64(document["sealed"])))
        keys = [Key(k["id"], k["kind"], _unb64(k["material"]), k["status"], k.get("created", ""))
                for k in payload["keys"]]
        return cls(path, sealer, keys, _unb64(payload["index_root"]))

    def save(self) -> None:
        payload = json.dumps({"keys": [k.as_json() for k in self.keys], "index_root": _b64(self._index_root)})
        document = {"format": FORMAT, "version": 1, "sealer": self._sealer.describe(),
                    "sealed": _b64(self._sealer.seal(payload.encode()))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
        os.replace(temporary, self.path)  # atomic: a crash never leaves half a keyring

    # --- keys ---------------------------------------------------------------------------------------

    def _add(self, kind: str) -> Key:
        next_id = max((k.id for k in self.keys), default=0) + 1
        key = Key(next_id, kind, os.urandom(KIND_BYTES[kind]),
                  created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self.keys.append(key)
        return key

    def rotate(self, kind: str = "data") -> Key:
        """A new current key of `kind`; older keys keep decrypting until retired. Saves the keyring."""
        if kind not in KIND_BYTES:
            raise KeyringError(f"unknown key kind `{kind}`; expected one of: {', '.join(KIND_BYTES)}")
        key = self._add(kind)
        self.save()
        return key

    def retire(self, key_id: int) -> Key:
        key = self._find(key_id)
        if key.status == "retired":
            return key
        if self.current(key.kind).id == key.id:
            raise KeyringError(f"key {key_id} is the current {key.kind} key; rotate first, then retire it")
        key.status = "retired"
        self.save()
        self._ciphers.pop((key.kind, key_id), None)
        return key

    def _find(self, key_id: int) -> Key:
        for key in self.keys:
            if key.id == key_id:
                return key
        raise UnknownKeyError(f"key id {key_id} is not in the keyring {self.path}")

    def key(self, key_id: int, kind: str) -> Key:
        """A key that may decrypt: present, of the right kind, not retired."""
        key = self._find(key_id)
        if key.kind != kind:
            raise UnknownKeyError(f"key id {key_id} is a {key.kind} key; the value needs a {kind} key")
        if key.status == "retired":
            raise RetiredKeyError(f"key {key_id} ({kind}) is retired and can no longer decrypt; re-encrypt "
                                  "with `crmbridge keys reencrypt` before retiring a key")
        return key

    def current(self, kind: str) -> Key:
        active = [k for k in self.keys if k.kind == kind and k.status == "active"]
        if not active:
            raise KeyringError(f"the keyring has no active {kind} key; add one with `crmbridge keys rotate "
                               f"--kind {kind}`")
        return max(active, key=lambda k: k.id)

    def gcm(self, key_id: int, kind: str = "data") -> AESGCM:
        cipher = self._ciphers.get((kind, key_id))
        if cipher is None:
            cipher = self._ciphers[(kind, key_id)] = AESGCM(self.key(key_id, kind).material)
        return cipher

    def siv(self, key_id: int) -> AESSIV:
        cipher = self._ciphers.get(("siv", key_id))
        if cipher is None:
            cipher = self._ciphers[("siv", key_id)] = AESSIV(self.key(key_id, "siv").material)
        return cipher

    def index_key(self, entity: str, field_name: str) -> bytes:
        found = self._index_keys.get((entity, field_name))
        if found is None:
            found = self._index_keys[(entity, field_name)] = blind_index.field_key(self._index_root, entity,
                                                                                   field_name)
        return found

    @cached_property
    def subject_key(self) -> bytes:
        """The HMAC key of data-subject references (shared by every entity, so one person has one)."""
        return blind_index.derive_key(self._index_root, "subject-reference")

    def subject_reference(self, value: str) -> str:
        return blind_index.token(self.subject_key, value)


def open_keyring(path: str | Path, env_var: str, environ: dict[str, str] | None = None) -> Keyring:
    environ = os.environ if environ is None else environ
    return Keyring.open(path, environ.get(env_var))
