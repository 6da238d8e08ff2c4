"""Generate the demo's messy legacy data (deterministic: the same seed gives the same files).

- data/legacy_crm.db   SQLite legacy CRM: customers and contacts with stray whitespace, mixed case,
                       inconsistent phone formats, blank required fields, duplicate people, dangling links
- data/partner_contacts.csv   a second legacy system's export, GB18030-encoded, with Chinese names and
                       one broken line
- data/target_crm.db   the new CRM's (empty) schema the demo migrates into

Usage: python examples/generate_demo.py [OUT_DIR] [--customers N] [--contacts N] [--force]
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

from faker import Faker

SEED = 20261123


def messy_phone(rng: random.Random, digits: str) -> str:
    area, mid, end = digits[:3], digits[3:6], digits[6:]
    return rng.choice([
        f"({area}) {mid}-{end}", f"{area}-{mid}-{end}", f"{area}.{mid}.{end}", f"+1 {area} {mid} {end}",
        f"  {area}{mid}{end} ", f"1-{area}-{mid}-{end}",
    ])


def messy_text(rng: random.Random, text: str) -> str:
    text = rng.choice([text, text.upper(), text.lower(), f"  {text}", f"{text}  ", text.replace(" ", "   ")])
    return text


def build_legacy(path: Path, customers: int, contacts: int, fake: Faker, rng: random.Random) -> None:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE customers (
            cust_id INTEGER PRIMARY KEY, company_name TEXT, phone TEXT, city TEXT, country TEXT,
            credit_limit NUMERIC, customer_since TEXT, created_at DATETIME);
        CREATE TABLE contacts (
            contact_id INTEGER PRIMARY KEY, cust_id INTEGER, first_name TEXT, last_name TEXT,
            email TEXT, phone TEXT, updated_at DATETIME);
    """)
    start = datetime(2009, 1, 1)
    rows = []
    for cust_id in range(1, customers + 1):
        name = fake.company()
        if rng.random() < 0.03:
            name = "   "  # blank required field
        since = start + timedelta(days=rng.randrange(0, 5000))
        rows.append((cust_id, messy_text(rng, name), messy_phone(rng, fake.numerify("##########")),
                     messy_text(rng, fake.city()), rng.choice(["US", "us", "USA", " US"]),
                     round(rng.uniform(0, 50000), 2) if rng.random() > 0.1 else None,
                     since.strftime("%Y-%m-%d"),
                     (since + timedelta(seconds=rng.randrange(86400))).strftime("%Y-%m-%d %H:%M:%S")))
    db.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?,?,?)", rows)
    people = []
    for contact_id in range(1, contacts + 1):
        first, last = fake.first_name(), fake.last_name()
        if people and rng.random() < 0.05:  # the same person entered twice
            first, last = rng.choice(people)
        people.append((first, last))
        email = f"{first}.{last}@{fake.free_email_domain()}".lower()
        email = rng.choice([email, email.upper(), f" {email} "]) if rng.random() > 0.04 else ""
        cust = rng.randrange(1, customers + 1) if rng.random() > 0.01 else customers + 1000  # dangling link
        db.execute("INSERT INTO contacts VALUES (?,?,?,?,?,?,?)", (
            contact_id, cust, messy_text(rng, first), messy_text(rng, last) if rng.random() > 0.02 else None,
            email, messy_phone(rng, fake.numerify("##########")),
            (start + timedelta(days=rng.randrange(0, 6000), seconds=rng.randrange(86400))).strftime(
                "%Y-%m-%d %H:%M:%S")))
    db.commit()
    db.close()


def build_partner_csv(path: Path, count: int, customers: int, rng: random.Random) -> None:
    fake = Faker("zh_CN")
    fake.seed_instance(SEED)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["编号", "姓名", "手机", "邮箱", "城市", "客户编号"])
    for i in range(1, count + 1):
        mobile = fake.phone_number()
        mobile = rng.choice([mobile, f"+86 {mobile[:3]} {mobile[3:7]} {mobile[7:]}", f"{mobile[:3]}-{mobile[3:]}"])
        writer.writerow([f"P{i:05d}", rng.choice([fake.name(), f" {fake.name()} "]), mobile,
                         fake.email() if rng.random() > 0.05 else "", fake.city(), rng.randrange(1, customers + 1)])
        if i == count // 2:
            out.write('P99999,"未闭合的引号,13800000000\r\n')  # a broken line, as real exports have
    path.write_bytes(out.getvalue().encode("gb18030"))


def build_target(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE account (
            id INTEGER PRIMARY KEY AUTOINCREMENT, external_id VARCHAR(64) NOT NULL UNIQUE,
            name TEXT NOT NULL, phone TEXT, city TEXT, country TEXT, credit_limit NUMERIC(14, 2),
            customer_since DATE, created_at TIMESTAMP);
        CREATE TABLE contact (
            id INTEGER PRIMARY KEY AUTOINCREMENT, external_id VARCHAR(64) NOT NULL UNIQUE,
            account_id INTEGER REFERENCES account(id), first_name TEXT, last_name TEXT NOT NULL,
            email TEXT, phone TEXT, city TEXT, source_system TEXT NOT NULL);
    """)
    db.commit()
    db.close()


def generate(out: Path, customers: int = 500, contacts: int = 2000, partners: int = 300, force: bool = False) -> bool:
    """Create the demo files; returns False (and changes nothing) when they exist and force is off."""
    data = out / "data"
    files = [data / "legacy_crm.db", data / "partner_contacts.csv", data / "target_crm.db"]
    if all(f.exists() for f in files) and not force:
        return False
    data.mkdir(parents=True, exist_ok=True)
    for f in files:
        f.unlink(missing_ok=True)
    rng = random.Random(SEED)
    fake = Faker("en_US")
    fake.seed_instance(SEED)
    build_legacy(files[0], customers, contacts, fake, rng)
    build_partner_csv(files[1], partners, customers, rng)
    build_target(files[2])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "demo"))
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--contacts", type=int, default=2000)
    parser.add_argument("--partners", type=int, default=300)
    parser.add_argument("--force", action="store_true", help="regenerate (and empty the target)")
    args = parser.parse_args()
    made = generate(Path(args.out), args.customers, args.contacts, args.partners, args.force)
    print(f"demo data {'written to' if made else 'already in'} {Path(args.out) / 'data'}")


if __name__ == "__main__":
    main()
