"""YAML reading that refuses a key given twice in one mapping.

PyYAML keeps the last of two equal keys without a word, so ``distill: {ipc: 10, ipc: 1}``
would run with IPC 1. :func:`load` composes the document, refuses duplicates by their dotted
path and line, and only then builds the Python values (``yaml.safe_load``'s types).
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds one key twice; ``path`` is its dotted path, ``line`` 1-based."""

    def __init__(self, path: str, line: int, first_line: int):
        super().__init__(f"{path} is given twice (lines {first_line} and {line})")
        self.path, self.line, self.first_line = path, line, first_line


def _refuse_duplicates(node: yaml.Node, prefix: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{prefix}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
            path = f"{prefix}.{name}" if prefix else str(name)
            line = key.start_mark.line + 1
            if name in seen:
                raise DuplicateKeyError(path, line, seen[name])
            seen[name] = line
            _refuse_duplicates(value, path)


def load(text: str) -> Any:
    """The one document in ``text`` as ``yaml.safe_load`` reads it, or :class:`DuplicateKeyError`
    (a ``yaml.YAMLError``) when a mapping repeats a key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()
