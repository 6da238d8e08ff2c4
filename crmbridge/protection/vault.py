"""A keyring sealer backed by HashiCorp Vault's transit engine (optional: `pip install crmbridge[vault]`).

The keyring payload is encrypted and decrypted by Vault (`transit/encrypt/<key>`, `transit/decrypt/<key>`),
so the master key never leaves Vault; the environment variable named by `protection.master_key_env` holds
the Vault token. The keyring file records Vault's address, mount and key name (never the token). Rotating
the transit key in Vault and saving the keyring again (any `crmbridge keys` change) re-seals it under the
new key version.
"""

from __future__ import annotations

import base64
from typing import Any

from crmbridge.protection.errors import KeyringError


class VaultTransitSealer:
    def __init__(self, url: str, key: str, token: str, mount: str = "transit", verify: bool | str = True,
                 client: Any = None):
        try:
            import hvac
        except ImportError:  # pragma: no cover - depends on the installation
            raise KeyringError("the keyring is sealed by Vault, but the `hvac` package is not installed "
                               "(pip install 'crmbridge[vault]')") from None
        self.url, self.key, self.mount = url, key, mount
        self._client = client or hvac.Client(url=url, token=token, verify=verify, timeout=15)
        self._errors = (hvac.exceptions.VaultError, OSError)

    def _call(self, what: str, call) -> dict[str, Any]:
        try:
            return call()
        except self._errors as error:
            # hvac's messages are Vault's error list (no token, no payload): name the key and the failure.
            reason = type(error).__name__
            raise KeyringError(f"Vault transit {what} with key `{self.key}` at {self.url} failed ({reason}: "
                               f"{str(error)[:200]})") from None

    def seal(self, payload: bytes) -> bytes:
        response = self._call("encrypt", lambda: self._client.secrets.transit.encrypt_data(
            name=self.key, plaintext=base64.b64encode(payload).decode(), mount_point=self.mount))
        return response["data"]["ciphertext"].encode()

    def unseal(self, sealed: bytes) -> bytes:
        response = self._call("decrypt", lambda: self._client.secrets.transit.decrypt_data(
            name=self.key, ciphertext=sealed.decode(), mount_point=self.mount))
        return base64.b64decode(response["data"]["plaintext"])

    def describe(self) -> dict[str, Any]:
        return {"type": "vault_transit", "url": self.url, "key": self.key, "mount": self.mount}
