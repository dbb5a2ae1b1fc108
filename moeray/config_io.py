"""YAML documents with line numbers, and pydantic errors explained against them.

Contract (a bottom-layer module: platform settings and job specs both use it, it imports
neither):
- `read_yaml(path, error, what)` returns a `YamlDocument` (the data and its node tree), or
  raises `error` with the file and line of invalid YAML, or when the top level is not a
  mapping (`what` names what the file should hold: "settings", "job spec").
- `explain(err, document, skip=())` turns a pydantic `ValidationError` into one line per
  problem, `file:line: setting 'a.b': message` (`unknown setting` for a key a strict model
  forbids). `skip` lists location parts that are not keys of the document (the tag of a
  discriminated union) and are left out of both the key and the line lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


@dataclass(frozen=True)
class YamlDocument:
    path: Path | str | None
    data: dict[str, Any]
    node: yaml.Node | None


def read_yaml(path: Path, error: type[Exception], what: str = "settings") -> YamlDocument:
    try:
        text = path.read_text()
    except OSError as err:
        raise error(f"cannot read {what} file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what} at the top level")
    return YamlDocument(path, data, node)


def line_of(node: yaml.Node | None, keys: tuple) -> int | None:
    """1-based line of the deepest key of `keys` present in the YAML node tree."""
    line = None
    for key in keys:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def explain(err: ValidationError, document: YamlDocument | None, path: Path | str | None = None,
            skip: tuple[str, ...] = ()) -> str:
    path = document.path if document is not None else path
    problems = []
    for problem in err.errors():
        loc = tuple(part for part in problem["loc"] if part not in skip)
        key = ".".join(str(p) for p in loc)
        message = "unknown setting" if problem["type"] == "extra_forbidden" else problem["msg"]
        where = f"{path}: " if path is not None else ""
        if document is not None:
            line = line_of(document.node, loc)
            where = f"{path}:{line}: " if line else f"{path}: "
        problems.append(f"{where}setting '{key}': {message}")
    return "; ".join(problems)
