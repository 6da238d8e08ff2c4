"""The mapping language's protection parts: what loads into the model, and located errors for what is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from crmbridge.errors import MappingError
from crmbridge.mappings import load_mapping

BASE = """\
version: 1
name: protected
{protection}
sources:
  legacy: {{type: sql, url: "sqlite:///legacy.db"}}
targets:
  crm: {{type: sql, url: "sqlite:///crm.db"{receives}}}
entities:
  - name: contacts
    source: legacy
    table: contacts
    key: id
    target: crm
    target_table: contact
{entity}
    fields:
{fields}
"""
PROTECTION = "protection:\n  keyring: keys/ring.json\n  master_key_env: RING_KEY\n  index_bytes: 12"


def write(tmp_path: Path, fields: str, protection: str = PROTECTION, entity: str = "", receives: str = "") -> Path:
    text = BASE.format(protection=protection, fields=textwrap.indent(textwrap.dedent(fields), "      "),
                       entity=entity, receives=receives)
    path = tmp_path / "mapping.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    return [f"{p.line}:{p.path}: {p.message}" for p in caught.value.problems]


def test_protected_fields_load_into_the_model(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        email: {from: email, protect: blind_index, mask: email}
        phone: {from: phone, protect: encrypt}
        city: {from: city}
        """, entity="    subject: email", receives=", receives: ciphertext")
    mapping = load_mapping(path)
    fields = mapping.entity("contacts").fields
    assert list(fields) == ["email", "email_bidx", "phone", "city"]
    assert fields["email_bidx"].protect == "index" and fields["email_bidx"].source_column is None
    assert fields["phone"].mask == "full"  # protected and no mask given: hidden where people look
    assert fields["email"].mask == "email" and fields["city"].protect == "none"
    assert mapping.entity("contacts").subject == "email"
    settings = mapping.protection
    assert settings.keyring == tmp_path / "keys" / "ring.json"
    assert settings.subjects == tmp_path / "keys" / "ring.json.subjects.db"
    assert (settings.master_key_env, settings.index_bytes) == ("RING_KEY", 12)
    assert mapping.targets["crm"].options["receives"] == "ciphertext"


def test_protect_without_a_keyring_is_an_error(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "email: {from: email, protect: encrypt}\n", protection=""))
    assert any("no `protection` section" in p and "crmbridge keys init" in p for p in found), found


def test_wrong_protect_settings_are_located(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        id_copy: {from: id, protect: encrypt}
        age: {from: age, type: integer, protect: encrypt}
        email: {from: email, protect: blind_index}
        email_bidx: {from: other}
        """)
    found = problems(path)
    assert any("entities[0].fields.id_copy.protect" in p and "source key column `id`" in p for p in found), found
    assert any("entities[0].fields.age.protect" in p and "string fields" in p for p in found), found
    assert any("fields.email.protect" in p and "already has a field of that name" in p for p in found), found


def test_unknown_policy_is_a_schema_error(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "email: {from: email, protect: encrypted}\n"))
    assert any("fields.email.protect" in p and "did you mean `encrypt`" in p for p in found), found


def test_subject_must_be_a_protected_field(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "email: {from: email, protect: encrypt}\n", entity="    subject: mail"))
    assert any("entities[0].subject" in p and "unknown field `mail`" in p for p in found), found
    found = problems(write(tmp_path, "email: {from: email}\nphone: {from: phone, protect: encrypt}\n",
                           entity="    subject: email"))
    assert any("entities[0].subject" in p and "not protected" in p for p in found), found


def test_receives_belongs_to_targets(tmp_path: Path) -> None:
    path = write(tmp_path, "email: {from: email, protect: encrypt}\n")
    path.write_text(path.read_text().replace('url: "sqlite:///legacy.db"', 'url: "sqlite:///legacy.db", '
                                             'receives: plaintext'))
    found = problems(path)
    assert any("sources.legacy.receives" in p and "targets only" in p for p in found), found
    found = problems(write(tmp_path, "email: {from: email}\n", receives=", receives: encrypted"))
    assert any("targets.crm.receives" in p and "plaintext, ciphertext" in p for p in found), found


def test_index_bytes_bounds(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "email: {from: email}\n",
                           protection="protection:\n  keyring: k.json\n  index_bytes: 2"))
    assert any("protection.index_bytes" in p and "at least 4" in p for p in found), found
