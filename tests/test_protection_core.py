"""Round trips of every policy, and the ways protected values must fail: tampering, a wrong key id, a value
moved to another field or row, a retired key, an erased subject. Rotation and re-wrapping lose nothing."""

from __future__ import annotations

import base64
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest

from crmbridge.protection import (
    DecryptionError,
    ErasedSubjectError,
    Keyring,
    KeyringError,
    Protector,
    RetiredKeyError,
    UnknownKeyError,
    envelope,
    subject_reference,
)
from crmbridge.protection.blind_index import collision_bytes, normalise
from crmbridge.protection.keyring import MasterKeySealer, PassphraseSealer
from crmbridge.protection.subject_keys import SubjectKeys

MASTER = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def ring(tmp_path):
    return Keyring.create(tmp_path / "keyring.json", MasterKeySealer.from_text(MASTER))


def _entity(subject=None, **policies):
    fields = {name: SimpleNamespace(name=name, protect=p) for name, p in policies.items()}
    for name, p in policies.items():
        if p == "blind_index":
            fields[name + "_bidx"] = SimpleNamespace(name=name + "_bidx", protect="index")
    return SimpleNamespace(name="contacts", fields=fields, subject=subject)


def _frame(**columns):
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"_row": range(n), "_key": [str(i) for i in range(n)],
                         "_ext": [f"ext-{i}" for i in range(n)], **columns})


def test_every_policy_round_trips(ring):
    protector = Protector(ring)
    entity = _entity(email="blind_index", phone="encrypt", city="deterministic", ssn="hash", note="drop")
    emails = ["a@x.cn", "B@x.cn", None, "a@x.cn"]
    frame = _frame(email=emails, email_bidx=[None] * 4, phone=["13800001111", "", "13900002222", None],
                   city=["北京", "Shanghai", "北京", None], ssn=["110101199003070011", None, "x", "x"],
                   note=["secret", "b", "c", "d"])
    out = protector.protect_frame(entity, frame)
    exts = frame["_ext"].tolist()
    for name in ("email", "phone", "city"):
        plain = [None if pd.isna(v) else v for v in frame[name].tolist()]
        assert all(a != b for a, b in zip(out[name].tolist(), plain, strict=True) if b is not None)
        assert protector.decrypt_values("contacts", name, out[name].tolist(), exts) == plain
    assert out["city"][0] == out["city"][2]  # deterministic: equal values, equal ciphertexts
    assert out["email"][0] != out["email"][3]  # probabilistic: equal values, different ciphertexts
    assert out["email_bidx"][0] == out["email_bidx"][3] and len(out["email_bidx"][0]) == 64
    assert out["ssn"][2] == out["ssn"][3] and pd.isna(out["ssn"][1]) and "1101" not in out["ssn"][0]
    assert out["note"].isna().all()
    assert pd.isna(out["email"][2]) and pd.isna(out["email_bidx"][2])
    # the envelope's overhead is 33 bytes before base64
    raw = envelope.unb64(out["phone"][0])
    assert len(raw) == len(b"13800001111") + 33


def test_tampered_wrong_key_swapped_field_and_row_fail_clearly(ring):
    protector = Protector(ring)
    token = protector.encrypt_values("contacts", "phone", ["13800001111"], ["ext-1"])[0]
    raw = bytearray(envelope.unb64(token))
    raw[-1] ^= 1
    with pytest.raises(DecryptionError, match="does not authenticate"):
        protector.decrypt_value("contacts", "phone", envelope.b64(bytes(raw)), "ext-1")
    with pytest.raises(DecryptionError, match="another entity, field or record"):
        protector.decrypt_value("contacts", "mobile", token, "ext-1")  # copied into another field
    with pytest.raises(DecryptionError):
        protector.decrypt_value("contacts", "phone", token, "ext-2")  # copied into another row
    wrong = bytearray(envelope.unb64(token))
    wrong[1:5] = (999).to_bytes(4, "big")
    with pytest.raises(UnknownKeyError, match="key id 999"):
        protector.decrypt_value("contacts", "phone", envelope.b64(bytes(wrong)), "ext-1")
    siv_id = ring.current("siv").id
    wrong[1:5] = siv_id.to_bytes(4, "big")  # a key that exists, but of another kind
    with pytest.raises(UnknownKeyError, match="siv key"):
        protector.decrypt_value("contacts", "phone", envelope.b64(bytes(wrong)), "ext-1")
    with pytest.raises(DecryptionError, match="expected at least 33"):
        protector.decrypt_value("contacts", "phone", envelope.b64(b"\x01short"), "ext-1")


def test_messages_never_contain_the_value(ring):
    protector = Protector(ring)
    token = protector.encrypt_values("contacts", "phone", ["13800001111"], ["ext-1"])[0]
    with pytest.raises(DecryptionError) as caught:
        protector.decrypt_value("contacts", "phone", token, "ext-2")
    assert "13800001111" not in str(caught.value) and token not in str(caught.value)


def test_rotation_keeps_old_ciphertext_readable_and_retire_stops_it(tmp_path, ring):
    protector = Protector(ring)
    old = protector.encrypt_values("e", "f", ["v1"], ["x"])[0]
    first = ring.current("data").id
    new_key = ring.rotate("data")
    reopened = Keyring.open(ring.path, MASTER)
    assert reopened.current("data").id == new_key.id != first
    again = Protector(reopened)
    new = again.encrypt_values("e", "f", ["v2"], ["x"])[0]
    assert envelope.header(envelope.unb64(new))[1] == new_key.id
    assert again.decrypt_value("e", "f", old, "x") == "v1"
    with pytest.raises(KeyringError, match="current data key"):
        reopened.retire(new_key.id)
    reopened.retire(first)
    after = Protector(Keyring.open(ring.path, MASTER))
    with pytest.raises(RetiredKeyError, match=f"key {first} .* retired"):
        after.decrypt_value("e", "f", old, "x")
    assert after.decrypt_value("e", "f", new, "x") == "v2"


def test_keyring_sealing(tmp_path):
    ring = Keyring.create(tmp_path / "k.json", PassphraseSealer("correct horse", n=2**10))
    text = (tmp_path / "k.json").read_text()
    assert all(base64.b64encode(k.material).decode() not in text for k in ring.keys)
    assert json.loads(text)["sealer"]["type"] == "passphrase"
    assert Keyring.open(tmp_path / "k.json", "correct horse").current("data").material == ring.current("data").material
    with pytest.raises(KeyringError, match="does not open"):
        Keyring.open(tmp_path / "k.json", "wrong horse")
    with pytest.raises(KeyringError, match="is sealed"):
        Keyring.open(tmp_path / "k.json", None)
    with pytest.raises(KeyringError, match="expected 32"):
        MasterKeySealer.from_text(base64.b64encode(b"short").decode())
    with pytest.raises(KeyringError, match="already exists"):
        Keyring.create(tmp_path / "k.json", PassphraseSealer("x", n=2**10))


def test_subject_keys_erasure_and_kek_rotation(tmp_path, ring):
    subjects = SubjectKeys(ring, tmp_path / "subjects.db")
    protector = Protector(ring, subjects)
    entity = _entity(subject="email", email="blind_index", phone="encrypt")
    frame = _frame(email=["ann@x.cn", "bob@x.cn", "ann@x.cn"], email_bidx=[None] * 3,
                   phone=["111", "222", "333"])
    out = protector.protect_frame(entity, frame)
    exts = frame["_ext"].tolist()
    assert subjects.count() == 2
    versions = {envelope.header(envelope.unb64(t))[0] for t in out["phone"]}
    assert versions == {envelope.VERSION_GCM_SUBJECT}
    # rotating the KEK re-wraps subject keys without touching the data
    ring.rotate("kek")
    assert subjects.rewrap() == 2
    fresh = Protector(Keyring.open(ring.path, MASTER), SubjectKeys(Keyring.open(ring.path, MASTER),
                                                                  tmp_path / "subjects.db"))
    assert fresh.decrypt_values("contacts", "phone", out["phone"].tolist(), exts) == ["111", "222", "333"]
    # erase ann: her rows no longer decrypt and her reference is gone; bob is untouched
    ref = subject_reference(ring, "ANN@x.cn ")
    assert ref == subject_reference(fresh, "ann@x.cn")
    assert fresh.subjects.erase(ref) is not None
    assert fresh.subjects.find(ref) is None
    for i in (0, 2):
        with pytest.raises(ErasedSubjectError, match="erased"):
            fresh.decrypt_value("contacts", "phone", out["phone"][i], exts[i])
        with pytest.raises(ErasedSubjectError):
            fresh.decrypt_value("contacts", "email", out["email"][i], exts[i])
    assert fresh.decrypt_value("contacts", "phone", out["phone"][1], exts[1]) == "222"
    # the erased key is gone from the store file too, not just unlinked
    assert fresh.subjects.erase(ref) is None


def test_blind_index_dedup_equals_plaintext_dedup(ring):
    """Grouping by the blind-index token finds exactly the groups normalised plaintext finds."""
    import random

    rng = random.Random(5)
    people = [f"user{i}@example.com" for i in range(300)]
    variants = [rng.choice([p, p.upper(), f"  {p}", p.replace("@", "@").title()]) for p in people for _ in
                range(rng.randint(1, 3))]
    rng.shuffle(variants)
    frame = _frame(email=variants, email_bidx=[None] * len(variants))
    out = Protector(ring).protect_frame(_entity(email="blind_index"), frame)
    plain_groups = frame.groupby(frame["email"].map(normalise)).apply(lambda g: tuple(g["_ext"]),
                                                                       include_groups=False)
    token_groups = out.groupby("email_bidx").apply(lambda g: tuple(g["_ext"]), include_groups=False)
    assert sorted(plain_groups) == sorted(token_groups)
    assert sum(len(g) > 1 for g in token_groups) > 50  # there were duplicates to find
    # per entity and field keys: the same value gives another token in another field
    other = Protector(ring).protect_frame(_entity(mail="blind_index"),
                                          _frame(mail=variants[:1], mail_bidx=[None]))
    assert other["mail_bidx"][0] != out["email_bidx"][0]


def test_collision_bytes_grows_with_rows():
    assert collision_bytes(1_000) < collision_bytes(10_000_000) <= 32
    assert collision_bytes(1_000_000) == 8  # 1e12 / 2e-6 = 5e17 ≈ 2^59 → 8 bytes


def test_bulk_tokens_equal_the_reference_normalisation(ring):
    """The Arrow fast path for ASCII values gives exactly HMAC(normalise(value)), like the slow path."""
    import hashlib
    import hmac

    from crmbridge.protection.blind_index import tokens

    key = ring.index_key("contacts", "email")
    values = ["  Li.Wei@Example.COM ", "li.wei@example.com", "a\tb\x0bc\x1cd", "Straße  Ä", "ＡＢＣ", None, "",
              "x  y", "Ǆ", "İstanbul"]
    expected = [None if v is None else hmac.new(key, normalise(v).encode(), hashlib.sha256).hexdigest()
                for v in values]
    assert tokens(key, values) == expected
    assert tokens(key, values)[0] == tokens(key, values)[1]
    assert tokens(key, values, 8)[0] == expected[0][:16]


def test_load_step_decrypts_for_plaintext_targets_and_keeps_envelopes_stable_for_ciphertext_ones(tmp_path, ring,
                                                                                                 monkeypatch):
    """`protection.load.prepare`: plaintext at the last moment, truncated tokens, and for a ciphertext target a
    value the target already holds (same plaintext) keeps the target's envelope, so a rerun is `unchanged`."""
    import json

    import pyarrow as pa

    from crmbridge.mappings.model import ProtectionSettings
    from crmbridge.protection import load
    from crmbridge.protection.policy import forget_protectors

    monkeypatch.setenv("CORE_MASTER", MASTER)
    forget_protectors()
    settings = ProtectionSettings(keyring=ring.path, master_key_env="CORE_MASTER", subjects=None, index_bytes=8)

    def mapping(receives):
        return SimpleNamespace(protection=settings, targets={"crm": SimpleNamespace(options={"receives": receives})})

    entity = _entity(email="blind_index", phone="encrypt")
    entity.target = "crm"
    frame = _frame(email=["a@x.cn", "b@x.cn"], email_bidx=[None, None], phone=["111", None])
    staged = Protector(ring).protect_frame(entity, frame)
    table = pa.Table.from_pandas(staged, preserve_index=False)
    names = list(entity.fields)
    columns = lambda: [table.column(n).to_pylist() for n in names]  # noqa: E731

    desired = columns()
    load.prepare(mapping("plaintext"), entity, table, desired, {})
    assert desired[names.index("email")] == ["a@x.cn", "b@x.cn"] and desired[names.index("phone")] == ["111", None]
    assert [len(t) for t in desired[names.index("email_bidx")]] == [16, 16]

    # the target holds another envelope of the same value for row 0, and a different value for row 1
    other = Protector(ring).encrypt_values("contacts", "email", ["a@x.cn", "changed@x.cn"], ["ext-0", "ext-1"])
    existing = {f"ext-{i}": SimpleNamespace(values={"email": other[i]}) for i in range(2)}
    desired = columns()
    load.prepare(mapping("ciphertext"), entity, table, desired, existing)
    assert desired[names.index("email")][0] == other[0]  # same plaintext: the target's envelope stays
    assert desired[names.index("email")][1] == staged["email"][1]  # changed: the staged envelope is written

    # before-images of a plaintext target are sealed before they reach the ledger
    images = [json.dumps({"email": "old@x.cn", "city": "Berlin"}), None]
    load.seal_before_images(mapping("plaintext"), entity, ["ext-0", "ext-1"], images)
    sealed = json.loads(images[0])
    assert sealed["city"] == "Berlin" and "old@x.cn" not in images[0]
    assert Protector(ring).decrypt_value("contacts", "email", sealed["email"], "ext-0") == "old@x.cn"
    forget_protectors()
