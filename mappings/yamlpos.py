"""Safe YAML loading that remembers where every node came from, so errors can name line and column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass
class LocatedDocument:
    data: Any
    positions: dict[Path, tuple[int, int]]  # document path -> (line, column), both 1-based

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_located(text: str) -> LocatedDocument:
    """Parse YAML text (safe loader only: no tags, no code) and index node positions by path."""
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    positions: dict[Path, tuple[int, int]] = {}
    if root is not None:
        _index(root, (), positions)
    return LocatedDocument(data, positions)


def _index(node: yaml.Node, path: Path, out: dict[Path, tuple[int, int]]) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            _index(value_node, child, out)
            # Point at the key itself: that is where a reader looks for "this entry".
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), out)
