"""The one YAML -> dataclass loader: every config kind reads its file through here.

Why not PyYAML + ``cls(**data)``: a typo'd key, a list where a number belongs or a tab in
the YAML must stop the run before any work with one line naming ``file:line`` (exit 2),
not a traceback or a silently ignored setting. ``read_yaml`` keeps the line of every key;
``build`` fills a dataclass strictly (unknown keys, wrong types and numbers outside the
field's declared range, :mod:`megatron_cpt.config_ranges`, refused) and names the line of the
offending key, or the command-line override that set it (:meth:`YamlDoc.override`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_cpt.config_ranges import field_range
from megatron_cpt.errors import UsageError

Key = tuple  # a path into the document: ("data", "train", 0, "prefix")


@dataclass
class YamlDoc:
    """Parsed YAML plus the line (1-based) of every mapping key and list item."""

    data: Any
    source: str = "config"           # the file name used in messages
    lines: dict[Key, int] = field(default_factory=dict)
    # keys set after reading (command line) -> where the value came from, e.g. "command line
    # `optimizer.lr=-1`": errors under that key blame it, not the YAML line it replaced
    overrides: dict[Key, str] = field(default_factory=dict)

    def override(self, key: Key, value: Any, origin: str) -> None:
        """Set ``key`` (creating sections) to ``value``, remembering ``origin`` for errors."""
        node = self.data
        for n, part in enumerate(key[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"{origin}: {_dotted(key[:n + 1])} is not a section")
        node[key[-1]] = value
        self.overrides = {k: a for k, a in self.overrides.items() if k[:len(key)] != key}
        self.overrides[key] = origin

    def where(self, key: Key = ()) -> str:
        """``file:line`` of ``key`` (or of its nearest parent that has a line), or the
        command-line argument that set it or a section above it."""
        for n in range(len(key), 0, -1):
            if key[:n] in self.overrides:
                return self.overrides[key[:n]]
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines:
                return f"{self.source}:{self.lines[key[:n]]}"
        return self.source

    def error(self, key: Key, message: str) -> UsageError:
        return UsageError(f"{self.where(key)}: {message}")


def read_yaml(path: str | Path, what: str = "config") -> YamlDoc:
    """Parse ``path``; a missing file or a YAML syntax error is a UsageError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} file {path} not found")
    return parse_yaml(path.read_text(), str(path))


def parse_yaml(text: str, source: str = "config") -> YamlDoc:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{source}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    lines: dict[Key, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return YamlDoc({} if data is None else data, source, lines)


def _record_lines(node: yaml.Node, key: Key, lines: dict[Key, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            child = key + (k.value,)
            lines[child] = k.start_mark.line + 1
            _record_lines(v, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[key + (i,)] = v.start_mark.line + 1
            _record_lines(v, key + (i,), lines)


def load(cls, path: str | Path, what: str = "config"):
    """Read ``path`` and build ``cls`` from it (the whole loader for simple config kinds)."""
    doc = read_yaml(path, what)
    return build(cls, doc.data, doc)


def build(cls, data: Any, doc: YamlDoc | None = None, key: Key = ()):
    """A ``cls`` instance from a mapping: unknown keys and wrong types raise UsageError."""
    doc = doc or YamlDoc(data)
    if not isinstance(data, dict):
        raise doc.error(key, f"{_dotted(key) or 'the file'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        bad = key + (next(k for k in data if str(k) == unknown[0]),)
        where = f" in {_dotted(key)}" if key else ""
        raise doc.error(bad, f"unknown key(s) {unknown}{where}; valid: {sorted(names)}")
    kwargs = {name: coerce(hints[name], value, doc, key + (name,)) for name, value in data.items()}
    for f in dataclasses.fields(cls):
        rng = field_range(f)
        if rng is not None and kwargs.get(f.name) is not None:
            try:
                rng.check(kwargs[f.name], _dotted(key + (f.name,)))
            except UsageError as exc:
                raise doc.error(key + (f.name,), str(exc)) from None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [n for n in names if n not in data]
        raise doc.error(key, f"{_dotted(key) or 'the file'} needs {missing} ({exc})") from None


def coerce(tp, value: Any, doc: YamlDoc, key: Key):
    """``value`` as type ``tp`` (dataclass, list, dict, Optional, bool, int, float, str)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None and (dataclasses.is_dataclass(tp) or origin in (list, dict) or tp in (list, dict)):
        value = {} if origin is not list and tp is not list else []  # `key:` left empty
    if dataclasses.is_dataclass(tp):
        return build(tp, value, doc, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce([a for a in args if a is not type(None)][0], value, doc, key)
    if origin is list:
        if not isinstance(value, list):
            raise doc.error(key, f"{_dotted(key)} must be a list, got {value!r}")
        return [coerce(args[0], v, doc, key + (i,)) for i, v in enumerate(value)]
    if tp in (dict, list) and not isinstance(value, tp):
        raise doc.error(key, f"{_dotted(key)} must be a {'mapping' if tp is dict else 'list'}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise doc.error(key, f"{_dotted(key)} must be a mapping, got {value!r}")
        return {k: coerce(args[1], v, doc, key + (k,)) for k, v in value.items()} if args else dict(value)
    return _scalar(tp, value, doc, key)


def _scalar(tp, value: Any, doc: YamlDoc, key: Key):
    # YAML 1.1 reads "1e-4" as a string: numbers given as numeric strings are accepted.
    try:
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and not isinstance(value, (bool, list, dict)):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float and not isinstance(value, (bool, list, dict)):
            return float(value)
        if tp is str and not isinstance(value, (list, dict)) and value is not None:
            return str(value)
        if tp not in (bool, int, float, str):
            return value
    except (TypeError, ValueError):
        pass
    raise doc.error(key, f"{_dotted(key)} must be {tp.__name__}, got {value!r}")


def _dotted(key: Key) -> str:
    out = ""
    for k in key:
        out += f"[{k}]" if isinstance(k, int) else f".{k}"
    return out.lstrip(".")
