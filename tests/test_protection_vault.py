"""The Vault transit sealer with the real hvac client against a small local fake of Vault's transit HTTP API
(encrypt, decrypt, key rotation, token check, Vault's error format)."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("hvac")

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from typer.testing import CliRunner

from crmbridge.protection import KeyringError
from crmbridge.protection.keyring import Keyring, open_keyring
from crmbridge.protection.vault import VaultTransitSealer

TOKEN = "s.test-token"


class FakeTransit:
    """Vault's transit engine, as far as a keyring needs it: named keys with versions, `vault:vN:` ciphertexts."""

    def __init__(self) -> None:
        self.keys: dict[str, list[bytes]] = {}
        self.calls: list[str] = []

    def encrypt(self, name: str, plaintext: str) -> str:
        versions = self.keys.setdefault(name, [AESGCM.generate_key(256)])  # Vault creates the key on first use
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(versions[-1]).encrypt(nonce, base64.b64decode(plaintext), None)
        return f"vault:v{len(versions)}:{base64.b64encode(sealed).decode()}"

    def decrypt(self, name: str, ciphertext: str) -> str:
        _, version, body = ciphertext.split(":", 2)
        raw = base64.b64decode(body)
        key = self.keys[name][int(version[1:]) - 1]
        return base64.b64encode(AESGCM(key).decrypt(raw[:12], raw[12:], None)).decode()


def _handler(transit: FakeTransit):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            transit.calls.append(self.path)
            if self.headers.get("X-Vault-Token") != TOKEN:
                return self._reply(403, {"errors": ["permission denied"]})
            parts = self.path.strip("/").split("/")  # v1, mount, operation, name[, rotate]
            if len(parts) < 4 or parts[0] != "v1" or parts[1] != "transit":
                return self._reply(404, {"errors": ["no handler for route"]})
            operation, name = parts[2], parts[3]
            try:
                if operation == "encrypt":
                    return self._reply(200, {"data": {"ciphertext": transit.encrypt(name, body["plaintext"])}})
                if operation == "decrypt":
                    return self._reply(200, {"data": {"plaintext": transit.decrypt(name, body["ciphertext"])}})
                if operation == "keys" and parts[4:] == ["rotate"]:
                    transit.keys[name].append(AESGCM.generate_key(256))
                    return self._reply(200, {"data": {"latest_version": len(transit.keys[name])}})
            except (KeyError, ValueError, InvalidTag):
                return self._reply(400, {"errors": ["cipher: message authentication failed"]})
            return self._reply(404, {"errors": ["unsupported path"]})

    return Handler


@pytest.fixture
def vault() -> Iterator[tuple[str, FakeTransit]]:
    transit = FakeTransit()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(transit))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", transit
    finally:
        server.shutdown()
        server.server_close()


def test_keyring_sealed_by_vault_transit(vault, tmp_path: Path) -> None:
    url, transit = vault
    ring = Keyring.create(tmp_path / "ring.json", VaultTransitSealer(url, "crm", TOKEN))
    document = json.loads((tmp_path / "ring.json").read_text())
    assert document["sealer"] == {"type": "vault_transit", "url": url, "key": "crm", "mount": "transit"}
    assert TOKEN not in (tmp_path / "ring.json").read_text()
    assert base64.b64decode(document["sealed"]).startswith(b"vault:v1:")
    reopened = open_keyring(tmp_path / "ring.json", "VAULT_TOKEN", {"VAULT_TOKEN": TOKEN})
    assert reopened.current("data").material == ring.current("data").material
    assert any(call.endswith("/transit/decrypt/crm") for call in transit.calls)

    # Vault rotates its key; the next save re-seals under the new version and both still open
    transit.keys["crm"].append(AESGCM.generate_key(256))
    reopened.rotate("data")
    assert base64.b64decode(json.loads((tmp_path / "ring.json").read_text())["sealed"]).startswith(b"vault:v2:")
    assert open_keyring(tmp_path / "ring.json", "T", {"T": TOKEN}).current("data").id == 4


def test_vault_errors_are_clear_and_hide_the_token(vault, tmp_path: Path) -> None:
    url, _ = vault
    Keyring.create(tmp_path / "ring.json", VaultTransitSealer(url, "crm", TOKEN))
    with pytest.raises(KeyringError, match=r"Vault transit decrypt with key `crm`.*Forbidden") as caught:
        open_keyring(tmp_path / "ring.json", "T", {"T": "s.wrong"})
    assert "s.wrong" not in str(caught.value) and TOKEN not in str(caught.value)
    with pytest.raises(KeyringError, match="Vault transit encrypt"):
        Keyring.create(tmp_path / "other.json", VaultTransitSealer("http://127.0.0.1:9", "crm", TOKEN))


def test_keys_init_with_vault(vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crmbridge.cli.main import app

    url, _ = vault
    (tmp_path / "mapping.yaml").write_text(
        "version: 1\nname: v\nprotection: {keyring: ring.json, master_key_env: VAULT_TOKEN}\n"
        "sources: {s: {type: sql, url: 'sqlite:///s.db'}}\ntargets: {t: {type: sql, url: 'sqlite:///t.db'}}\n"
        "entities:\n  - {name: e, source: s, table: x, key: id, target: t, target_table: y,"
        " fields: {email: {from: email, protect: encrypt}}}\n")
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["keys", "init", str(tmp_path / "mapping.yaml"), "--vault-url", url,
                                      "--vault-key", "crm"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output and "master key" not in result.output
    listed = CliRunner().invoke(app, ["keys", "list", str(tmp_path / "mapping.yaml")])
    assert listed.exit_code == 0 and "kek" in listed.output
