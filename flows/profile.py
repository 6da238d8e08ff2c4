"""Data-quality profile of a mapping's sources, before and after cleansing.

Per source column (before) and per target field (after): rows, missing rate, distinct count, top values
and detected patterns (the value's shape: `9` a digit, `A`/`a` a Latin letter, `汉` a CJK character, other
characters as they are), plus, after cleansing, how many rows each rule or transform refused or warned
about (its reason code). Values of masked or protected fields appear only masked; patterns never carry a
value. Rendered as a terminal table (`cli/profile_cmd.py`) and as one self-contained HTML file with inline
SVG charts (no script, no external file) a consultant can hand to the customer.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.connectors import connector_for
from crmbridge.mappings.cleanse import cleanse, shown_as
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.masking import mask_value

TOP = 5


@dataclass
class ColumnProfile:
    name: str
    rows: int = 0
    missing: int = 0
    values: Counter = field(default_factory=Counter)
    patterns: Counter = field(default_factory=Counter)
    policy: str = "none"  # how values are shown

    @property
    def missing_rate(self) -> float:
        return self.missing / self.rows if self.rows else 0.0

    @property
    def distinct(self) -> int:
        return len(self.values)

    def top(self, n: int = TOP) -> list[tuple[str, int]]:
        return [(mask_value(v, self.policy), c) for v, c in self.values.most_common(n)]

    def top_patterns(self, n: int = TOP) -> list[tuple[str, int]]:
        return self.patterns.most_common(n)

    def add(self, column: pd.Series) -> None:
        text = column.astype(object).map(_text, na_action="ignore")
        present = text.notna() & (text.astype(str).str.strip() != "")
        self.rows += len(column)
        self.missing += int((~present).sum())
        kept = text[present].astype(str)
        self.values.update(kept.value_counts().to_dict())
        self.patterns.update(shapes(kept).value_counts().to_dict())


@dataclass
class EntityProfile:
    entity: str
    rows: int = 0
    before: dict[str, ColumnProfile] = field(default_factory=dict)
    after: dict[str, ColumnProfile] = field(default_factory=dict)
    refused: Counter = field(default_factory=Counter)  # (field, code) -> rows quarantined
    keys: set = field(default_factory=set, repr=False)  # source keys of the rows that pass (for `exists_in`)
    warned: Counter = field(default_factory=Counter)  # (field, code) -> rows loaded with a warning
    quarantined_rows: int = 0


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_SHAPES = [(re.compile(r"[0-9]"), "9"), (re.compile(r"[A-Z]"), "A"), (re.compile(r"[a-z]"), "a"),
           (re.compile(r"[\u3400-\u9fff\uf900-\ufaff]"), "汉"), (re.compile(r"[^\x00-\x7f汉]"), "~")]


def shapes(values: pd.Series, longest: int = 24) -> pd.Series:
    """The pattern of each value: `138-0013-8000` -> `999-9999-9999`, `王伟` -> `汉汉`; runs of more than
    four equal symbols are kept, long patterns cut with `…`."""
    out = values.astype(str)
    for pattern, symbol in _SHAPES:
        out = out.str.replace(pattern, symbol, regex=True)
    return out.where(out.str.len() <= longest, out.str.slice(0, longest) + "…")


def profile_entity(mapping: Mapping, entity: Entity, limit: int | None = None) -> EntityProfile:
    """Read up to `limit` source rows (all when None) and profile them before and after cleansing."""
    from crmbridge.flows.quarantine import column_policies

    result = EntityProfile(entity.name)
    policies = column_policies(entity)
    result.before = {c: ColumnProfile(c, policy=policies.get(c, "none")) for c in entity.source_columns}
    result.after = {n: ColumnProfile(n, policy=shown_as(s)) for n, s in entity.fields.items()}
    source = connector_for(mapping.sources[entity.source], mapping).open_source(entity)
    try:
        for batch in source.read(entity.source_columns, mapping.batch_size):
            frame, rows = batch.frame, batch.row_numbers
            if limit is not None and result.rows + len(frame) > limit:
                keep = limit - result.rows
                frame, rows = frame.iloc[:keep], rows[:keep]
            result.rows += len(frame) + len(batch.rejected)
            for reject in batch.rejected:
                result.refused[("", reject.reason)] += 1
            result.quarantined_rows += len(batch.rejected)
            for column in entity.source_columns:
                result.before[column].add(frame[column])
            cleansed = cleanse(mapping, entity, frame, np.asarray(rows))
            result.keys.update(k for k in cleansed.frame["_key"].tolist() if k is not None)
            for name in entity.fields:
                result.after[name].add(cleansed.frame[name])
            result.quarantined_rows += len(cleansed.quarantined)
            for problems in cleansed.quarantined.values():
                for problem in problems:
                    result.refused[(problem.field, problem.code)] += 1
            for key, count in cleansed.warnings.items():
                result.warned[key] += count
            if limit is not None and result.rows >= limit:
                break
    finally:
        source.close()
    return result


def profile_mapping(mapping: Mapping, entities: list[Entity], limit: int | None = None) -> list[EntityProfile]:
    """Profile entities in load order, then count what the whole-entity rules (`unique`, `exists_in`) would
    refuse among the rows that pass; an estimate when `limit` cuts a source short."""
    found: dict[str, EntityProfile] = {}
    for entity in entities:
        profile = found[entity.name] = profile_entity(mapping, entity, limit)
        for spec in entity.fields.values():
            for rule in spec.rules:
                counts = profile.after[spec.name].values
                if rule.kind == "unique":
                    extra = sum(c - 1 for c in counts.values() if c > 1)
                elif rule.kind == "exists_in":
                    other = rule.argument if isinstance(rule.argument, str) else rule.argument["entity"]
                    parent = found.get(other)
                    if parent is None:
                        continue  # not profiled (filtered by --entity): nothing to compare with
                    allowed = parent.keys if isinstance(rule.argument, str) else \
                        set(parent.after[rule.argument["field"]].values)
                    extra = sum(c for v, c in counts.items() if v not in allowed)
                else:
                    continue
                if extra:
                    target = profile.warned if rule.severity == "warn" else profile.refused
                    target[(spec.name, "not_unique" if rule.kind == "unique" else "reference_missing")] += extra
                    if rule.severity != "warn":
                        profile.quarantined_rows += extra
    return list(found.values())


# --- HTML ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC",sans-serif;margin:2rem;color:#222}
h1{font-size:1.5rem}h2{margin-top:2.5rem;border-bottom:2px solid #ddd}h3{margin-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top;font-size:.9rem}th{background:#f4f4f4}.num{text-align:right}
.bad{color:#b00020}.muted{color:#777}svg{display:block}code{background:#f4f4f4;padding:0 .2rem}
"""


def _bar_chart(items: list[tuple[str, float]], width: int = 420, unit: str = "", colour: str = "#3b6ea5") -> str:
    """Horizontal bars as inline SVG; labels are escaped text."""
    if not items:
        return '<p class="muted">none</p>'
    high = max(v for _, v in items) or 1
    row = 20
    parts = [f'<svg width="{width + 260}" height="{row * len(items) + 4}" role="img">']
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        length = max(1, int(width * value / high)) if value else 0
        shown = f"{value:,.1f}{unit}" if unit else f"{int(value):,}"
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label[:32])}</text>'
                     f'<rect x="200" y="{y + 3}" width="{length}" height="14" fill="{colour}"/>'
                     f'<text x="{205 + length}" y="{y + 14}" font-size="12">{shown}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _columns_table(columns: dict[str, ColumnProfile]) -> str:
    head = ("<tr><th>column</th><th>rows</th><th>missing</th><th>distinct</th><th>top values</th>"
            "<th>patterns</th></tr>")
    body = []
    for profile in columns.values():
        top = "<br>".join(f"{html.escape(v)} <span class=muted>×{c:,}</span>" for v, c in profile.top())
        shapes_ = "<br>".join(f"<code>{html.escape(p)}</code> <span class=muted>×{c:,}</span>"
                              for p, c in profile.top_patterns())
        body.append(f"<tr><td>{html.escape(profile.name)}</td><td class=num>{profile.rows:,}</td>"
                    f"<td class=num>{profile.missing_rate:.1%}</td><td class=num>{profile.distinct:,}</td>"
                    f"<td>{top}</td><td>{shapes_}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render_html(mapping_name: str, profiles: list[EntityProfile]) -> str:
    sections = []
    for profile in profiles:
        refused = sorted(profile.refused.items(), key=lambda item: -item[1])
        warned = sorted(profile.warned.items(), key=lambda item: -item[1])
        sections.append(
            f"<h2>{html.escape(profile.entity)}</h2>"
            f"<p>{profile.rows:,} source rows profiled; {profile.quarantined_rows:,} would be quarantined "
            f"({profile.quarantined_rows / max(profile.rows, 1):.1%}).</p>"
            "<h3>Missing values after cleansing (% of rows)</h3>"
            + _bar_chart([(n, 100 * c.missing_rate) for n, c in profile.after.items()], unit="%")
            + "<h3>Rows refused per field and reason</h3>"
            + _bar_chart([(f"{f or '(row)'}: {code}", n) for (f, code), n in refused], colour="#b00020")
            + ("<h3>Warnings (loaded)</h3>" + _bar_chart([(f"{f}: {code}", n) for (f, code), n in warned],
                                                          colour="#c77800") if warned else "")
            + "<h3>Before cleansing: source columns</h3>" + _columns_table(profile.before)
            + "<h3>After cleansing: target fields (rows that pass)</h3>" + _columns_table(profile.after))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>Data-quality profile: {html.escape(mapping_name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>Data-quality profile: {html.escape(mapping_name)}</h1>"
            "<p class=muted>Values of masked or protected fields are shown masked. Patterns: 9 digit, A/a Latin "
            "letter, 汉 CJK character, ~ other non-ASCII.</p>" + "".join(sections) + "</body></html>")
