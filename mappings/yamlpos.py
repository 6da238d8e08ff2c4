"""Safe YAML loading that remembers where every node came from, so errors can name line and column.

Mapping keys are names (of sources, entities, fields, columns, ...), so every key is read as the text
written in the file: `on:`, `no:` or `1:` name the field `on`, `no` or `1`, as JSON and YAML 1.2 read
them, not the boolean or number YAML 1.1 would make of them. Structural mistakes that a plain loader
would hide (a key written twice, a list or mapping used as a key, an alias that contains itself) are
reported with their positions instead of being silently resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_NODES = 200_000  # after expanding aliases: a mapping is never that large, an alias bomb is


@dataclass(frozen=True)
class StructureProblem:
    path: Path
    line: int
    column: int
    message: str


@dataclass
class LocatedDocument:
    data: Any
    positions: dict[Path, tuple[int, int]]  # document path -> (line, column), both 1-based
    problems: list[StructureProblem] = field(default_factory=list)  # when set, `data` is not usable

    def locate(self, path: Path) -> tuple[int | None, int | None]:
        """Position of `path`, or of its nearest ancestor that exists in the document."""
        for cut in range(len(path), -1, -1):
            found = self.positions.get(tuple(path[:cut]))
            if found:
                return found
        return None, None


def format_path(path: Path) -> str:
    """`('entities', 1, 'fields', 'Email')` -> `entities[1].fields.Email`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _NameKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mapping keys are always the text written in the file.

    Duplicate keys are found before construction (see `_check_structure`), where their paths are known.
    """

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<: *anchor` merge keys; explicit keys win over merged ones
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # rejected by _check_structure first
                raise yaml.constructor.ConstructorError(
                    None, None, "expected a name as key", key_node.start_mark
                )
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def load_located(text: str) -> LocatedDocument:
    """Parse YAML text (safe loader only: no tags, no code) and index node positions by path.

    Raises yaml.YAMLError for text that is not YAML. Structural problems (duplicate keys, keys that are
    not names, recursive aliases) come back in `problems`, all of them, with `data` set to None.
    """
    loader = _NameKeyLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return LocatedDocument(None, {})
        problems: list[StructureProblem] = []
        _check_structure(root, (), problems, set(), [0])
        positions = _positions(root)  # before construction, which flattens merge keys in place
        if problems:
            return LocatedDocument(None, positions, problems)
        data = loader.construct_document(root)
    finally:
        loader.dispose()
    return LocatedDocument(data, positions)


def _where(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_structure(node: yaml.Node, path: Path, out: list[StructureProblem], ancestors: set[int],
                     count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_NODES:
        if count[0] == MAX_NODES + 1:
            out.append(StructureProblem(path, *_where(node), f"the document expands to more than {MAX_NODES} "
                                        "nodes through aliases; expected a mapping of ordinary size"))
        return
    if id(node) in ancestors:
        out.append(StructureProblem(path, *_where(node), "an alias refers to a node that contains it; "
                                    "expected a structure without loops"))
        return
    if isinstance(node, yaml.MappingNode):
        ancestors = ancestors | {id(node)}
        seen: dict[str, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                _check_structure(value_node, path, out, ancestors, count)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
                out.append(StructureProblem(path, *_where(key_node), f"expected a name as key, found {kind}"))
                continue
            name = key_node.value
            if name in seen:
                line, column = seen[name]
                out.append(StructureProblem((*path, name), *_where(key_node),
                                            f"duplicate key `{name}`; it is already set at line {line}, "
                                            f"column {column} (expected each key once)"))
            else:
                seen[name] = _where(key_node)
            _check_structure(value_node, (*path, name), out, ancestors, count)
    elif isinstance(node, yaml.SequenceNode):
        ancestors = ancestors | {id(node)}
        for i, item in enumerate(node.value):
            _check_structure(item, (*path, i), out, ancestors, count)


def _positions(root: yaml.Node) -> dict[Path, tuple[int, int]]:
    positions: dict[Path, tuple[int, int]] = {}
    _index(root, (), positions, set())
    return positions


def _index(node: yaml.Node, path: Path, out: dict[Path, tuple[int, int]], ancestors: set[int]) -> None:
    if len(out) > MAX_NODES or id(node) in ancestors:
        return
    out.setdefault(path, _where(node))
    if isinstance(node, yaml.MappingNode):
        ancestors = ancestors | {id(node)}
        merged = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merged.append(value_node)
            elif isinstance(key_node, yaml.ScalarNode):
                # Point at the key itself: that is where a reader looks for "this entry".
                child = (*path, key_node.value)
                out.setdefault(child, _where(key_node))
                _index(value_node, child, out, ancestors)
        # Keys merged in with `<<: *anchor` point at the anchor's text, unless written explicitly here.
        for value_node in merged:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if isinstance(source, yaml.MappingNode) and id(source) not in ancestors:
                    _index(source, path, out, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        ancestors = ancestors | {id(node)}
        for i, item in enumerate(node.value):
            _index(item, (*path, i), out, ancestors)
