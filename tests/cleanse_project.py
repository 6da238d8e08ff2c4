"""A small project for the cleansing, rules and quarantine tests: two CSV exports (accounts, contacts) with
messy legacy values, loaded into a SQLite CRM through the vocabulary of issue 3."""

from __future__ import annotations

import csv
from pathlib import Path

ACCOUNTS = [
    # cust_id, name, country, phone, vat, tier
    ["A1", "  ACME  trading ", "中国", "138 0013 8000", "91350100M000100Y43", "gold"],
    ["A2", "mcdonald & SONS", "United Kingdom", "020 7946 0018", "", "silver"],
    ["A3", "ＢＥＩＪＩＮＧ　Ｔｅｃｈ", "CN", "12345", "", "gold"],            # invalid phone
    ["A4", "Globex", "Narnia", "+1 650 253 0000", "", "bronze"],             # unknown country
    ["A5", "Initech", "USA", "(650) 253-0000", "", "platinum"],              # not in the tier enum
    ["A6", "Umbrella", "Deutschland", "030 901820", "", "gold"],
]

CONTACTS = [
    # contact_id, cust_id, full_name, email, birthday, id_number
    ["C1", "A1", "欧阳修", "Ouyang.Xiu@Example.COM", "31/01/1980", "11010519491231002X"],
    ["C2", "A2", "Ronald McDonald", "ronald@example.com", "01/02/1975", ""],
    ["C3", "A1", "王伟", "not-an-email", "03/04/1990", ""],                    # invalid email
    ["C4", "A6", "Anna Schmidt", "anna@example.com", "31/04/1990", ""],       # impossible date
    ["C5", "A9", "Li Lei", "lilei@example.com", "05/06/1985", ""],            # no such account
    ["C6", "A2", "Hans Meier", "ronald@example.com", "07/08/1970", ""],       # e-mail not unique
    ["C7", "A6", "张三", "zhang@example.com", "09/10/1988", "110105194912310021"],  # bad check digit
]

MAPPING = """\
version: 1
name: cleanse-test
sources:
  export:
    type: csv
    path: data/accounts.csv
  contacts_export:
    type: csv
    path: data/contacts.csv
targets:
  crm:
    type: sql
    url: sqlite:///data/crm.db
entities:
  - name: accounts
    source: export
    key: cust_id
    target: crm
    target_table: account
    create_table: true
    fields:
      name:
        from: name
        transform: [halfwidth, collapse_whitespace, name_case]
        required: true
      country:
        from: country
        transform: [country]
      phone:
        from: phone
        transform: [{phone: {region: CN, region_from: country}}]
        mask: last4
      tier:
        from: tier
        rules:
          - enum: [gold, silver, bronze]
      vat:
        from: vat
        transform: [{checksum: cn_uscc}]
        rules:
          - required: true
            when: {field: country, equals: CN}
            severity: warn
  - name: contacts
    source: contacts_export
    key: contact_id
    target: crm
    target_table: contact
    create_table: true
    fields:
      account:
        from: cust_id
        rules:
          - exists_in: accounts
      family_name:
        from: full_name
        transform: [{name_part: {part: family}}]
      given_name:
        from: full_name
        transform: [{name_part: {part: given}}]
      email:
        from: email
        transform: [{email: {lower: true}}]
        mask: email
        rules:
          - unique: true
      birthday:
        from: birthday
        type: date
        transform: [{date: {order: DMY}}]
      id_number:
        from: id_number
        transform: [cn_resident_id]
        mask: full
"""


def write_project(root: Path, accounts: list[list[str]] | None = None,
                  contacts: list[list[str]] | None = None) -> Path:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    _write(data / "accounts.csv", ["cust_id", "name", "country", "phone", "vat", "tier"], accounts or ACCOUNTS)
    _write(data / "contacts.csv", ["contact_id", "cust_id", "full_name", "email", "birthday", "id_number"],
           contacts or CONTACTS)
    mapping = root / "mapping.yaml"
    mapping.write_text(MAPPING, encoding="utf-8")
    return mapping


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
