"""Whole-column protection (the fast paths the flow uses) gives exactly what value-by-value protection gives:
the same envelope format, the same plaintexts, the same tokens, and the same precise errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crmbridge.protection import DecryptionError, Keyring, Protector, RetiredKeyError, envelope
from crmbridge.protection.blind_index import normalise, token_column, tokens
from crmbridge.protection.keyring import MasterKeySealer

MASTER = base64.b64encode(os.urandom(32)).decode()
VALUES = ["Ada Lovelace", None, "", "北京 Zhāng Wěi", "x" * 300, "12", None, "ab", "abc"]


@pytest.fixture
def ring(tmp_path):
    return Keyring.create(tmp_path / "keyring.json", MasterKeySealer.from_text(MASTER))


def _exts(n: int) -> list[str]:
    return [f"ext-{i}" for i in range(n)]


def test_sealed_column_is_the_documented_envelope_format():
    cipher, prefix = AESGCM(os.urandom(32)), envelope.aad("contacts", "name", "")
    values = pa.array(VALUES)
    records = [ext.encode() for ext in _exts(len(VALUES))]
    sealed = envelope.seal_column(cipher, 7, values, prefix, records).to_pylist()
    assert [s is None for s in sealed] == [v is None for v in VALUES]
    nonces = set()
    for value, record, token in zip(VALUES, records, sealed, strict=True):
        if value is None:
            continue
        assert "=" not in token and "+" not in token and "/" not in token  # unpadded URL-safe base64
        data = envelope.unb64(token)
        assert len(data) == len(value.encode()) + envelope.OVERHEAD
        assert envelope.header(data) == (envelope.VERSION_GCM, 7)
        nonces.add(data[envelope.HEADER.size:envelope.HEADER.size + envelope.NONCE])
        assert envelope.open_(cipher, data, prefix + record).decode() == value
    assert len(nonces) == sum(v is not None for v in VALUES)  # a fresh nonce per value


def test_sealed_column_of_a_slice_and_of_nothing():
    cipher = AESGCM(os.urandom(32))
    values = pa.array(["a", None, "c", "d"]).slice(1, 2)
    sealed = envelope.seal_column(cipher, 1, values, b"p", [b"r1", b"r2"]).to_pylist()
    assert sealed[0] is None and envelope.open_(cipher, envelope.unb64(sealed[1]), b"pr2") == b"c"
    assert envelope.seal_column(cipher, 1, pa.array([], pa.string()), b"p", []).to_pylist() == []


def test_decoded_column_matches_value_by_value_decoding():
    texts = [None if v is None else envelope.b64(v.encode()) for v in VALUES]
    data, start, end = envelope.decode_column(pa.array(texts))
    assert [data[a:b] for a, b in zip(start, end, strict=True)] == [
        b"" if t is None else envelope.unb64(t) for t in texts]


@pytest.mark.parametrize("text", ["YQ==", "abcde", "ab!d", "ab d"])
def test_text_that_is_not_plain_base64_is_left_to_the_value_by_value_path(text):
    assert envelope.decode_column(pa.array(["YWJj", text])) is None


def test_column_decryption_equals_value_by_value_decryption(ring):
    protector = Protector(ring)
    exts = _exts(len(VALUES))
    sealed = protector.encrypt_values("contacts", "name", VALUES, exts)
    assert protector.decrypt_values("contacts", "name", sealed, exts) == VALUES
    assert protector.decrypt_values("contacts", "name", pa.array(sealed), exts) == VALUES
    with_nan = [float("nan") if s is None else s for s in sealed]  # pandas' missing value
    assert protector.decrypt_values("contacts", "name", with_nan, exts) == VALUES
    assert protector._decrypt_each("contacts", "name", sealed, exts) == VALUES
    assert protector._decrypt_column("contacts", "name", pa.array(sealed), exts) == VALUES  # not a fallback


def test_envelopes_sealed_one_by_one_still_decrypt_in_bulk(ring):
    """Envelopes written before the column path (one `envelope.seal` per value) have the same format."""
    protector = Protector(ring)
    key = ring.current("data")
    exts = _exts(3)
    old = [envelope.b64(envelope.seal(ring.gcm(key.id), key.id, v.encode(), envelope.aad("contacts", "name", e)))
           for v, e in zip(["a", "bb", "ccc"], exts, strict=True)]
    assert protector.decrypt_values("contacts", "name", old, exts) == ["a", "bb", "ccc"]


def test_a_column_under_two_keys_decrypts_and_a_retired_one_fails(ring):
    protector = Protector(ring)
    exts = _exts(4)
    old = protector.encrypt_values("contacts", "name", ["a", "b", None, None], exts)
    old_key = ring.current("data")
    ring.rotate("data")
    new = protector.encrypt_values("contacts", "name", [None, None, "c", "d"], exts)
    mixed = [old[0], new[2], old[1], new[3]]
    mixed_exts = [exts[0], exts[2], exts[1], exts[3]]
    assert protector.decrypt_values("contacts", "name", mixed, mixed_exts) == ["a", "c", "b", "d"]
    assert protector._decrypt_column("contacts", "name", pa.array(mixed), mixed_exts) == ["a", "c", "b", "d"]
    ring.retire(old_key.id)
    with pytest.raises(RetiredKeyError):
        Protector(ring).decrypt_values("contacts", "name", mixed, mixed_exts)


@pytest.mark.parametrize("how", ["tampered", "other row", "other field"])
def test_one_bad_value_in_a_column_fails_with_the_precise_error(ring, how):
    protector = Protector(ring)
    exts = _exts(50)
    values = [f"value {i}" for i in range(50)]
    sealed = protector.encrypt_values("contacts", "name", values, exts)
    if how == "tampered":
        raw = bytearray(envelope.unb64(sealed[30]))
        raw[-1] ^= 1
        sealed[30] = envelope.b64(bytes(raw))
    elif how == "other row":
        sealed[30] = sealed[31]
    else:
        sealed[30] = protector.encrypt_values("contacts", "phone", [values[30]], [exts[30]])[0]
    with pytest.raises(DecryptionError, match="does not authenticate"):
        protector.decrypt_values("contacts", "name", sealed, exts)


def test_frame_protection_of_arrow_backed_and_object_columns_agree(ring):
    protector = Protector(ring)
    entity = SimpleNamespace(name="contacts", subject=None, fields={
        "name": SimpleNamespace(name="name", protect="encrypt"),
        "email": SimpleNamespace(name="email", protect="blind_index"),
        "email_bidx": SimpleNamespace(name="email_bidx", protect="index")})
    emails = ["A@x.cn ", None, "ünï@x.cn", "a@x.cn"]
    for kind in ("string[pyarrow]", object):
        frame = pd.DataFrame({"_ext": _exts(4), "name": pd.Series(VALUES[:4], dtype=kind),
                              "email": pd.Series(emails, dtype=kind), "email_bidx": [None] * 4})
        out = protector.protect_frame(entity, frame)
        assert protector.decrypt_values("contacts", "name", out["name"].tolist(), _exts(4)) == VALUES[:4]
        assert protector.decrypt_values("contacts", "email", out["email"].tolist(), _exts(4)) == emails
        bidx = [None if pd.isna(t) else t for t in out["email_bidx"]]
        assert bidx[1] is None and bidx[0] == bidx[3] != bidx[2]
        assert frame["name"].tolist()[0] == VALUES[0]  # the input frame is left as it was


def test_token_column_is_hmac_sha256_of_the_normalised_value():
    key = os.urandom(32)
    values = ["A@B.com ", None, "Ünïcode  X", "", "x\ty", "ﬁ@x.cn"]  # ASCII and not, spaces, a ligature
    expected = [None if v is None else hmac.new(key, normalise(v).encode(), hashlib.sha256).hexdigest()
                for v in values]
    assert tokens(key, values) == expected
    assert tokens(key, values, 8) == [None if t is None else t[:16] for t in expected]
    assert token_column(key, pa.array(values).slice(1, 3)).to_pylist() == expected[1:4]


def test_staged_envelope_columns_are_stored_uncompressed(tmp_path):
    """Random envelopes do not compress; DuckDB's attempt made staging them about three times slower."""
    from crmbridge.staging import Staging

    entity = SimpleNamespace(name="contacts", fields={
        "name": SimpleNamespace(name="name", type="string", ref=None, protect="encrypt"),
        "city": SimpleNamespace(name="city", type="string", ref=None, protect="none")})
    staging = Staging(tmp_path / "staging.duckdb")
    staging.create_rows_table(entity)
    frame = pd.DataFrame({"_row": range(3000), "_key": [str(i) for i in range(3000)],
                          "_ext": _exts(3000), "name": [envelope.b64(os.urandom(40)) for _ in range(3000)],
                          "city": ["Berlin"] * 3000})
    staging.stage_batch(entity, 0, 0, frame, 3000, [])
    staging.con.execute("CHECKPOINT")
    found = dict(staging.con.execute(
        "SELECT column_name, list(DISTINCT compression) FROM pragma_storage_info('rows_contacts') "
        "WHERE segment_type = 'VARCHAR' GROUP BY column_name").fetchall())
    assert found["name"] == ["Uncompressed"]
    assert found["city"] != ["Uncompressed"]
    staging.close()
