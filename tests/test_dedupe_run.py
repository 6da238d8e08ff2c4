"""Dedupe inside a real run: CSV source -> staging -> dedupe -> SQLite target, then the reconciliation, the
ledger (`merged` rows point at their survivor's target key), lineage, the review file and its decisions."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import duckdb
import pytest

from crmbridge.errors import MappingError
from crmbridge.flows.migrate import start_run
from crmbridge.mappings import load_mapping

pytestmark = pytest.mark.prefect

PEOPLE = [
    # id, given, family, email, phone, birth, city, updated
    ("1", "Jonathan", "Smith", "jon.smith@example.com", "+44 20 7946 0001", "1980-04-03", "London", "2020-01-01"),
    ("2", "Jonathon", "Smith", "jon.smith@example.com", "020 7946 0001", "1980-04-03", "", "2023-06-01"),
    ("3", "Jonathan", "Smyth", "", "+44 20 7946 0001", "1980-03-04", "London Borough", "2021-01-01"),
    ("4", "Maria", "Garcia", "maria.garcia@example.org", "+34 91 123 4567", "1975-11-20", "Madrid", "2022-01-01"),
    ("5", "Mario", "Garcia", "mario.garcia@example.org", "+34 91 765 4321", "1979-02-14", "Madrid", "2022-01-01"),
    ("6", "Li", "Wei", "wei.li@example.cn", "+86 10 5555 0100", "1990-07-08", "Beijing", "2022-01-01"),
    ("7", "Ana", "Lopez", "ana.lopez@example.es", "+34 93 000 1111", "1985-01-30", "Barcelona", "2022-01-01"),
    ("8", "Anna", "Lopez", "", "+34 93 000 1111", "1985-01-30", "Barcelona", "2024-01-01"),
]

MAPPING = """\
version: 1
name: dedupe-demo
sources:
  people: {{type: csv, path: people.csv}}
targets:
  crm: {{type: sql, url: "sqlite:///target.db"}}
entities:
  - name: contacts
    source: people
    key: id
    target: crm
    target_table: contact
    create_table: true
    fields:
      given_name: {{from: given}}
      family_name: {{from: family}}
      email: {{from: email, mask: email}}
      phone: {{from: phone, mask: last4}}
      birth_date: {{from: birth, type: date}}
      city: {{from: city}}
      updated_at: {{from: updated, type: date}}
    dedupe:
      blocking:
        - [soundex(family_name), year(birth_date)]
        - [email]
        - [last7(phone)]
      rules:
        - [email, birth_date]
      compare:
        given_name: {{method: jaro_winkler, weight: 2}}
        family_name: {{method: jaro_winkler, weight: 2}}
        birth_date: {{method: date, weight: 2}}
        phone: {{method: exact}}
        city: {{method: token_set, weight: 0.5}}
      match_above: {match_above}
      review_above: 0.7
      recency_field: updated_at
      survive:
        "*": first_non_null
        city: longest
        updated_at: max
"""


def _project(tmp_path: Path, match_above: float = 0.9) -> Path:
    with (tmp_path / "people.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "given", "family", "email", "phone", "birth", "city", "updated"])
        writer.writerows(PEOPLE)
    (tmp_path / "mapping.yaml").write_text(MAPPING.format(match_above=match_above), encoding="utf-8")
    return tmp_path / "mapping.yaml"


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_run_merges_duplicates_and_reconciles(tmp_path: Path) -> None:
    run, result = start_run(_project(tmp_path))
    counts = result["entities"][0]
    assert counts["balanced"] and counts["source"] == 8
    # 1, 2 (same email + birth date: rule), 3 (phone, transposed day/month) are one person; 7 and 8 too.
    assert counts["merged"] == 3 and counts["created"] == 5
    target = tmp_path / "target.db"
    assert _rows(target, "SELECT count(*) FROM contact") == [(5,)]
    with duckdb.connect(str(run.staging_path), read_only=True) as con:
        ledger = dict(con.execute("SELECT source_key, target_key FROM ledger").fetchall())
        lineage = con.execute("SELECT source_key, survivor_key, rule FROM dedupe_lineage "
                              "ORDER BY survivor_key, source_key").fetchall()
        explained = con.execute("SELECT field_scores FROM dedupe_pairs WHERE left_key = '1' "
                                "AND right_key = '3'").fetchone()
    assert ledger["2"] == ledger["1"] and ledger["3"] == ledger["1"] and ledger["8"] == ledger["7"]
    assert ledger["4"] != ledger["5"]  # Maria and Mario Garcia: same family, different people
    assert [(s, v) for s, v, _ in lineage] == [("1", "1"), ("2", "1"), ("3", "1"), ("7", "7"), ("8", "7")]
    assert next(r for s, _, r in lineage if s == "2") == "rule:email+birth_date"
    assert explained is not None and '"birth_date": 0.9' in explained[0]  # transposed day/month
    golden = _rows(target, "SELECT given_name, city, updated_at FROM contact WHERE external_id = "
                   f"'{ledger['1']}'")
    assert golden == [("Jonathan", "London Borough", "2023-06-01")]  # survivor's name, longest city, max date


def test_review_file_then_decisions_apply_on_the_next_run(tmp_path: Path) -> None:
    mapping = _project(tmp_path, match_above=0.99)  # nothing fuzzy merges alone now: it goes to review
    run, result = start_run(mapping)
    assert result["entities"][0]["merged"] == 1  # only the deterministic rule (1~2)
    review = tmp_path / ".crmbridge" / "review" / "contacts.csv"
    rows = list(csv.DictReader(review.open(encoding="utf-8")))
    assert rows and all(r["decision"] == "" for r in rows)
    text = review.read_text(encoding="utf-8")
    assert "jon.smith@example.com" not in text and "7946 0001" not in text  # masked like a preview
    for row in rows:
        row["decision"] = "approve" if {row["left_row"], row["right_row"]} & {"8", "9"} else "reject"
    with review.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run, result = start_run(mapping)
    counts = result["entities"][0]
    assert counts["balanced"] and counts["merged"] == 2  # the rule, plus the approved Ana/Anna Lopez pair
    with duckdb.connect(str(run.staging_path), read_only=True) as con:
        outcomes = dict(con.execute("SELECT rule, count(*) FROM dedupe_pairs GROUP BY rule").fetchall())
    assert outcomes.get("review:approve") == 1 and outcomes.get("review:reject", 0) >= 1


def test_a_bad_decision_names_the_file_and_line(tmp_path: Path) -> None:
    mapping = _project(tmp_path)
    review = tmp_path / ".crmbridge" / "review" / "contacts.csv"
    review.parent.mkdir(parents=True)
    review.write_text("left_id,right_id,decision\na,b,approve\nc,d,maybe\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"contacts\.csv: line 3: column `decision` is `maybe`; expected"):
        start_run(mapping)


def test_dedupe_block_errors_name_file_line_and_path(tmp_path: Path) -> None:
    mapping = _project(tmp_path)
    text = mapping.read_text(encoding="utf-8")
    text = text.replace("[soundex(family_name), year(birth_date)]", "[soundx(family_name), year(birthdate)]")
    text = text.replace("city: longest", "city: most_recent\n        town: longest")
    text = text.replace("review_above: 0.7", "review_above: 0.95")
    mapping.write_text(text.replace("      recency_field: updated_at\n", ""), encoding="utf-8")
    with pytest.raises(MappingError) as failure:
        load_mapping(mapping)
    message = str(failure.value)
    assert "mapping.yaml:24:12 at entities[0].dedupe.blocking[0][0]: unknown key function `soundx`" in message
    assert (":24:33 at entities[0].dedupe.blocking[0][1]: unknown field `birthdate` (did you mean "
            "`birth_date`?)") in message
    assert ":39:9 at entities[0].dedupe.survive.city: `most_recent` needs `recency_field`" in message
    assert "entities[0].dedupe.survive.town: unknown field `town`" in message
    assert "entities[0].dedupe.review_above: `review_above` (0.95) is above `match_above` (0.9)" in message


def test_explain_and_merge_report_show_scores_without_personal_data(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crmbridge.cli.main import app

    mapping = _project(tmp_path)
    run, _ = start_run(mapping)
    runner = CliRunner()
    result = runner.invoke(app, ["dedupe", "explain", run.run_id, "3", "--project", str(tmp_path)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "merged into `1`" in result.output and "birth_date" in result.output and "0.900" in result.output
    assert "Jonathan" not in result.output
    alone = runner.invoke(app, ["dedupe", "explain", run.run_id, "6", "--project", str(tmp_path)])
    assert alone.exit_code == 1 and "stands alone" in alone.output
    report = (run.path / "merge_report_contacts.csv").read_text(encoding="utf-8")
    assert "golden" in report and "member" in report and "jon.smith@example.com" not in report
    assert "j•••@example.com" in report  # the email mask, as in previews
    out = runner.invoke(app, ["dedupe", "report", run.run_id, "contacts", "-o", str(tmp_path / "r"),
                              "--project", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "2 clusters" in out.output and (tmp_path / "r" / "merge_report_contacts.html").exists()


def test_protected_fields_match_only_through_their_tokens(tmp_path: Path) -> None:
    mapping = _project(tmp_path)
    text = mapping.read_text(encoding="utf-8")
    text = text.replace("email: {from: email, mask: email}", "email: {from: email, protect: blind_index}")
    text = text.replace("phone: {from: phone, mask: last4}", "phone: {from: phone, protect: hash}")
    text = text.replace("- [email]\n", "- [email_bidx]\n        - [email]\n")
    text = text.replace("- [last7(phone)]", "- [last7(phone)]\n        - [phone]")
    text = text.replace("- [email, birth_date]", "- [email_bidx, birth_date]")
    text = text.replace("phone: {method: exact}", "phone: {method: jaro_winkler}\n        email: {method: exact}")
    mapping.write_text("protection: {keyring: keys.json}\n" + text, encoding="utf-8")
    with pytest.raises(MappingError) as failure:
        load_mapping(mapping)
    message = str(failure.value)
    assert "dedupe.blocking[2][0]: field `email` is staged encrypted (`protect: blind_index`), so equal values " \
           "do not compare equal; use its token column `email_bidx`" in message
    assert "dedupe.blocking[3][0]: `phone` is staged as a token (`protect: hash`): only equality" in message
    assert "dedupe.compare.phone: `phone` is staged as a token" in message
    assert "dedupe.compare.email: field `email` is staged encrypted" in message
    assert "blocking[1]" not in message and "blocking[4]" not in message and "rules" not in message


def test_match_target_updates_customers_the_target_already_holds(tmp_path: Path) -> None:
    mapping = _project(tmp_path)
    mapping.write_text(mapping.read_text(encoding="utf-8").replace(
        "      recency_field: updated_at\n", "      recency_field: updated_at\n      match_target: true\n"),
        encoding="utf-8")
    _, first = start_run(mapping)  # the target table does not exist yet: nothing to match against
    assert first["entities"][0]["created"] == 5
    target = tmp_path / "target.db"
    before = dict(_rows(target, "SELECT given_name || ' ' || family_name, external_id FROM contact"))
    # A later export from another system: new keys, the same people (one with a typo), and one new person.
    with (tmp_path / "people.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "given", "family", "email", "phone", "birth", "city", "updated"])
        writer.writerow(["A-1", "Jonathan", "Smith", "jon.smith@example.com", "+44 20 7946 0001", "1980-04-03",
                         "London", "2025-01-01"])
        writer.writerow(["A-2", "Maria", "Garcia", "maria.garcia@example.org", "+34 91 123 4567", "1975-11-20",
                         "Madrid Centro", "2025-01-01"])
        writer.writerow(["A-3", "Mario", "Garcia", "", "", "1979-02-14", "Madrid", "2025-01-01"])
        writer.writerow(["A-4", "Grace", "Hopper", "grace@example.mil", "+1 202 555 0100", "1906-12-09",
                         "Arlington", "2025-01-01"])
    run, second = start_run(mapping)
    counts = second["entities"][0]
    assert counts["balanced"] and counts["created"] == 1  # only Grace Hopper is new
    assert counts["updated"] + counts["unchanged"] == 3
    assert _rows(target, "SELECT count(*) FROM contact") == [(6,)]
    assert _rows(target, f"SELECT city FROM contact WHERE external_id = '{before['Maria Garcia']}'") == [
        ("Madrid Centro",)]
    with duckdb.connect(str(run.staging_path), read_only=True) as con:
        taken = dict(con.execute("SELECT source_key, target_external_id FROM dedupe_target_matches").fetchall())
    assert taken == {"A-1": before["Jonathan Smith"], "A-2": before["Maria Garcia"],
                     "A-3": before["Mario Garcia"]}
