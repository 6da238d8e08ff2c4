"""A small SOQL subset: SELECT fields (incl. `Parent.Field`) FROM object [WHERE ...] [ORDER BY ...] [LIMIT n].

WHERE takes comparisons (= != < <= > >=), IN (...), AND, OR and parentheses: enough for look-ups by external
id and for compound incremental cursors such as `SystemModstamp > X OR (SystemModstamp = X AND Id > 'Y')`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op><=|>=|!=|=|<|>|\(|\)|,)
                    |(?P<word>[A-Za-z0-9_.:+\-]+))""", re.X)


class SoqlError(ValueError):
    """A query the emulator (like Salesforce) refuses: MALFORMED_QUERY or INVALID_FIELD."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Query:
    fields: list[str]
    sobject: str
    where: Callable[[Callable[[str], Any]], bool] | None = None
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    limit: int | None = None
    where_fields: list[str] = field(default_factory=list)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise SoqlError("MALFORMED_QUERY", f"unexpected text at position {pos}")
        kind = match.lastgroup or "word"
        out.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _literal(kind: str, text: str) -> Any:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text) if "." in text else int(text)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}(T[\d:.]+(Z|[+-]\d{2}:?\d{2}))?", text):
        return text  # date / datetime literal; compared in canonical text form by the store
    raise SoqlError("MALFORMED_QUERY", f"unexpected token `{text}`")


class _Parser:
    def __init__(self, text: str, normalize: Callable[[str, Any], Any]):
        self.tokens = _tokens(text)
        self.i = 0
        self.normalize = normalize  # (field, literal) -> comparable value
        self.where_fields: list[str] = []

    def peek(self, upper: bool = True) -> str | None:
        if self.i >= len(self.tokens):
            return None
        return self.tokens[self.i][1].upper() if upper else self.tokens[self.i][1]

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise SoqlError("MALFORMED_QUERY", "unexpected end of query")
        self.i += 1
        return self.tokens[self.i - 1]

    def expect(self, word: str) -> None:
        _, text = self.take()
        if text.upper() != word:
            raise SoqlError("MALFORMED_QUERY", f"expected {word}, found `{text}`")

    def parse(self) -> Query:
        self.expect("SELECT")
        fields = [self.take()[1]]
        while self.peek() == ",":
            self.take()
            fields.append(self.take()[1])
        self.expect("FROM")
        query = Query(fields, self.take()[1])
        if self.peek() == "WHERE":
            self.take()
            query.where = self.expr()
        if self.peek() == "ORDER":
            self.take()
            self.expect("BY")
            while True:
                name = self.take()[1]
                descending = False
                if self.peek() in ("ASC", "DESC"):
                    descending = self.take()[1].upper() == "DESC"
                query.order.append((name, descending))
                if self.peek() != ",":
                    break
                self.take()
        if self.peek() == "LIMIT":
            self.take()
            query.limit = int(self.take()[1])
        if self.peek() is not None:
            raise SoqlError("MALFORMED_QUERY", f"unexpected `{self.peek(False)}`")
        query.where_fields = self.where_fields
        return query

    def expr(self):
        terms = [self.term()]
        while self.peek() == "OR":
            self.take()
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else (lambda get: any(t(get) for t in terms))

    def term(self):
        factors = [self.factor()]
        while self.peek() == "AND":
            self.take()
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else (lambda get: all(f(get) for f in factors))

    def factor(self):
        if self.peek() == "(":
            self.take()
            inner = self.expr()
            self.expect(")")
            return inner
        name = self.take()[1]
        self.where_fields.append(name)
        op = self.take()[1].upper()
        if op in ("IN", "NOT"):
            negate = op == "NOT"
            if negate:
                self.expect("IN")
            self.expect("(")
            values = set()
            while True:
                values.add(self.normalize(name, _literal(*self.take())))
                if self.peek() != ",":
                    break
                self.take()
            self.expect(")")
            return lambda get: (get(name) in values) != negate
        value = self.normalize(name, _literal(*self.take()))
        compare = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b,
                   "<": lambda a, b: a is not None and b is not None and a < b,
                   "<=": lambda a, b: a is not None and b is not None and a <= b,
                   ">": lambda a, b: a is not None and b is not None and a > b,
                   ">=": lambda a, b: a is not None and b is not None and a >= b}.get(op)
        if compare is None:
            raise SoqlError("MALFORMED_QUERY", f"unknown operator `{op}`")
        return lambda get: compare(get(name), value)


def parse(text: str, normalize: Callable[[str, Any], Any] = lambda _f, v: v) -> Query:
    return _Parser(text, normalize).parse()
