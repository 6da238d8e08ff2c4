"""The load's fast protection paths give what the plain paths give: fields decrypted straight from the staged
Arrow columns (not converted to Python objects first), external ids encoded once for every field, bodies sliced
by Arrow, base64 decoded without strict mode, and blind-index tokens made in a plain loop."""

from __future__ import annotations

import base64
import os
import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from crmbridge.flows.steps import written_values
from crmbridge.protection import DecryptionError, Keyring, Protector, envelope
from crmbridge.protection import load as protection_load
from crmbridge.protection.blind_index import token, token_column
from crmbridge.protection.keyring import MasterKeySealer
from crmbridge.protection.policy import _slices

MASTER = base64.b64encode(os.urandom(32)).decode()
NAMES = ["Ada Lovelace", None, "", "北京 Zhāng Wěi", "x" * 300, "12"]


@pytest.fixture
def ring(tmp_path):
    return Keyring.create(tmp_path / "keyring.json", MasterKeySealer.from_text(MASTER))


def _exts(n: int) -> list[str]:
    return [f"ext-{i}" for i in range(n)]


def _field(name: str, protect: str = "none", ref: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, type="string", ref=ref, protect=protect)


ENTITY = SimpleNamespace(name="contacts", target="crm", subject=None, fields={
    "name": _field("name", "encrypt"), "city": _field("city"), "email": _field("email", "blind_index"),
    "email_bidx": _field("email_bidx", "index")})


def _mapping(ring: Keyring, receives: str) -> SimpleNamespace:
    return SimpleNamespace(targets={"crm": SimpleNamespace(options={"receives": receives})},
                           protection=SimpleNamespace(), _protector=Protector(ring, index_bytes=8))


@pytest.fixture
def staged(ring, monkeypatch):
    """A load batch's staged table for ENTITY (what `Staging.rows_for_load_arrow` returns) and the plaintext."""
    protector = Protector(ring, index_bytes=8)
    monkeypatch.setattr(protection_load, "protector_for", lambda mapping: mapping._protector)
    exts = _exts(len(NAMES))
    emails = ["a@x.cn", "b@x.cn", None, "a@x.cn", "ü@x.cn", "c@x.cn"]
    bidx = token_column(ring.index_key("contacts", "email"), pa.array(emails, pa.string()))
    table = pa.table({
        "_ext": pa.array(exts), "name": pa.array(protector.encrypt_values("contacts", "name", NAMES, exts)),
        "city": pa.array(["Berlin"] * len(NAMES)), "email": pa.array(
            protector.encrypt_values("contacts", "email", emails, exts)), "email_bidx": bidx})
    return table, emails


def _loaded(mapping, table, left_out) -> list[list]:
    desired = written_values(ENTITY, table, {}, left_out)
    protection_load.prepare(mapping, ENTITY, table, desired, {}, table.column("_ext").to_pylist())
    return desired


@pytest.mark.parametrize("receives", ["plaintext", "ciphertext"])
def test_fields_read_from_the_staged_columns_load_the_same_values(ring, staged, receives):
    table, emails = staged
    mapping = _mapping(ring, receives)
    left_out = protection_load.from_staged_columns(mapping, ENTITY, sealed_needed=False)
    assert left_out == ({"name", "email", "email_bidx"} if receives == "plaintext" else {"email_bidx"})
    assert written_values(ENTITY, table, {}, left_out)[0 if receives == "plaintext" else 1] == (
        [] if receives == "plaintext" else ["Berlin"] * len(NAMES))
    fast, plain = _loaded(mapping, table, left_out), _loaded(mapping, table, ())
    assert fast == plain
    assert fast[3] == [None if t is None else t[:16] for t in table.column("email_bidx").to_pylist()]
    if receives == "plaintext":
        assert fast[0] == NAMES and fast[2] == emails
    else:
        assert fast[0] == table.column("name").to_pylist()


def test_a_writer_elsewhere_still_gets_sealed_values(ring):
    """Distributed loads send encrypted fields sealed to the writer, so those are converted as before."""
    mapping = _mapping(ring, "plaintext")
    assert protection_load.from_staged_columns(mapping, ENTITY, sealed_needed=True) == {"email_bidx"}
    plain = SimpleNamespace(name="plain", target="crm", fields={"city": _field("city")})
    assert protection_load.from_staged_columns(mapping, plain, sealed_needed=False) == set()


def test_encoded_external_ids_bind_every_row_as_the_text_ones_do(ring):
    protector = Protector(ring)
    exts = _exts(40)
    values = [None if i % 7 == 3 else f"value {i}" for i in range(40)]  # nulls: a subset of rows is opened
    sealed = protector.encrypt_values("contacts", "name", values, exts)
    records = [ext.encode() for ext in exts]
    assert protector.decrypt_values("contacts", "name", pa.array(sealed), exts, records) == values
    assert protector._decrypt_column("contacts", "name", pa.array(sealed), exts, records) == values
    sealed[10], sealed[11] = sealed[11], sealed[10]  # each row's envelope in the other's place
    assert protector._decrypt_column("contacts", "name", pa.array(sealed), exts, records) is None
    with pytest.raises(DecryptionError, match="does not authenticate"):
        protector.decrypt_values("contacts", "name", pa.array(sealed), exts, records)


def test_arrow_slices_are_python_slices():
    rng = random.Random(5)
    data = os.urandom(5000)
    cuts = sorted(rng.sample(range(5000), 400))
    first, last = np.array(cuts[0::2]), np.array(cuts[1::2])
    last[::5] = first[::5]  # empty ranges
    last[1::7] = np.minimum(first[2::7][:len(last[1::7])], last[1::7])  # ranges that meet the next
    assert _slices(data, first, last) == [data[a:b] for a, b in zip(first.tolist(), last.tolist(), strict=True)]
    assert _slices(data, np.array([], np.int64), np.array([], np.int64)) == []


@pytest.mark.parametrize("first, last", [([5], [3]), ([0, 10], [20, 30]), ([4990], [5001]), ([-1], [3])])
def test_slices_out_of_order_or_outside_the_data_are_refused(first, last):
    """Arrow does not check offsets built by hand; reading past them would read other memory."""
    with pytest.raises(ValueError):
        _slices(os.urandom(5000), np.array(first), np.array(last))


@pytest.mark.parametrize("text", ["YWJj\n\n\n\n", "YWJj!!!!", "YW.Jj..Y", "\tYWJ"])
def test_characters_outside_the_alphabet_leave_the_column_to_the_value_by_value_path(text):
    """The column decoder is not in strict mode, which skips such characters; its length check notices."""
    assert envelope.decode_column(pa.array(["YWJj", text])) is None


def test_token_column_with_nulls_and_truncation():
    key = os.urandom(32)
    values = ["A@B.com", None, "c@d", None]
    assert token_column(key, pa.array(values), 6).to_pylist() == [
        None if v is None else token(key, v, 6) for v in values]
    assert token_column(key, pa.array([], pa.string())).to_pylist() == []
