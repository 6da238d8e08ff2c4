"""Ed25519 keys for checkpoints and archive anchors. The private key stays in the project's state
directory (mode 0600) or wherever `settings.audit.signing_key` points; the public key is all a third party
needs to verify an exported checkpoint."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crmbridge.errors import CrmbridgeError


class SigningError(CrmbridgeError):
    """A signing key is missing, unreadable or of the wrong kind."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as error:
        raise SigningError("not a PEM public key") from error
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError("the public key is not an Ed25519 key")
    return key


class Signer:
    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def from_file(cls, path: Path, create: bool = True) -> Signer:
        """Load the key; on first use create it (0600) so every project signs from its first run."""
        if not path.exists():
            if not create:
                raise SigningError(f"no audit signing key at {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(pem)
            return cls(private)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as error:
            raise SigningError(f"the audit signing key at {path} is not an unencrypted PEM key") from error
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"the audit signing key at {path} is not an Ed25519 key")
        return cls(key)

    def sign(self, body: str) -> str:
        return base64.b64encode(self._private.sign(body.encode())).decode()


def verify_signature(public: Ed25519PublicKey, body: str, signature: str) -> bool:
    try:
        public.verify(base64.b64decode(signature), body.encode())
    except (InvalidSignature, ValueError):
        return False
    return True
