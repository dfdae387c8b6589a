"""Every numeric setting declares its range (megatron_cpt/config_ranges.py): each int/float
field of every config dataclass the loader fills, and each int/float option of the CLI. A new
field or option without one fails here, naming it."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from pathlib import Path

import pytest

from megatron_cpt.config_ranges import Range, field_range
from megatron_cpt.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("megatron_cpt", "data_prep", "eval")


def _roots() -> list[type]:
    """The config kinds read from YAML: the loader's (``build``) and the ``from_raw`` ones."""
    from data_prep.dedup import DedupConfig
    from data_prep.filter import _FilterFile
    from data_prep.language import LanguageConfig
    from megatron_cpt.launch.study import ReplaySpec, SizeSpec, _StudyFile
    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.training.config import TrainConfig

    return [TrainConfig, ModelConfig, _StudyFile, SizeSpec, ReplaySpec, _FilterFile, DedupConfig, LanguageConfig]


def _leaf_types(tp) -> list:
    """The scalar and dataclass types inside ``tp`` (Optional, Union, list, dict unwrapped)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return [leaf for a in args if a is not type(None) for leaf in _leaf_types(a)]
    return [tp]


def _walk(cls, seen: dict[type, None]) -> list[str]:
    """``Class.field`` of every numeric field without a declared range, recursively."""
    if cls in seen:
        return []
    seen[cls] = None
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        leaves = _leaf_types(hints[f.name])
        if any(t in (int, float) for t in leaves) and field_range(f) is None:
            missing.append(f"{cls.__module__}.{cls.__name__}.{f.name}")
        for t in leaves:
            if dataclasses.is_dataclass(t):
                missing += _walk(t, seen)
    return missing


def _loaded_classes() -> set[str]:
    """Names of the classes handed to ``build(X, ...)`` anywhere in the code (``cls`` = the
    class the classmethod is defined in): each must be reachable from ``_roots``."""
    names = set()
    for root in SOURCES:
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)] + [tree]:
                for call in ast.walk(cls):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                            and call.func.id == "build" and call.args
                            and isinstance(call.args[0], ast.Name)):
                        arg = call.args[0].id
                        if arg == "cls" and isinstance(cls, ast.ClassDef):
                            names.add(cls.name)
                        elif arg not in ("cls", "tp"):  # tp: the loader's own recursion
                            names.add(arg)
    return names


def test_every_numeric_config_field_declares_a_range():
    seen: dict[type, None] = {}
    missing = [m for root in _roots() for m in _walk(root, seen)]
    assert not missing, f"numeric fields without ranged(...) or unbounded(...): {missing}"
    reached = {c.__name__ for c in seen}
    assert _loaded_classes() <= reached, \
        f"loaded by build() but not walked here (add to _roots): {_loaded_classes() - reached}"
    assert len(seen) >= 20  # the walk really descended into the sections


def _numeric_options(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _numeric_options(sub, f"{path} {name}")
        elif action.type in (int, float):
            out.append((f"{path} {'/'.join(action.option_strings) or action.dest}", action))
    return out


def test_every_numeric_cli_option_declares_a_range():
    from megatron_cpt.cli import build_parser

    options = _numeric_options(build_parser(), "megatron-cpt")
    assert len(options) >= 20, options
    missing = [name for name, action in options if not isinstance(getattr(action, "bounds", None), Range)]
    assert not missing, f"numeric options without **arg_range(...): {missing}"


@pytest.mark.parametrize("rng,inside,outside,words", [
    (Range(0, None, lo_open=True), [1e-9, 5], [0, -1, float("nan")], "> 0"),
    (Range(1, None), [1, 7], [0, -3], ">= 1"),
    (Range(0, 1, hi_open=True), [0, 0.999], [1, 1.5, -0.1], "in [0, 1)"),
])
def test_range_bounds(rng, inside, outside, words):
    assert all(rng.contains(v) for v in inside) and not any(rng.contains(v) for v in outside)
    with pytest.raises(UsageError, match=rf"x must be {words[0]}.*, got {outside[0]}"):
        rng.check(outside[0], "x")


def test_override_blame_follows_the_last_argument(tmp_path):
    """A section replaced on the command line blames that argument for its keys; a later,
    wider override takes the blame back from an earlier, narrower one."""
    from megatron_cpt.training.config import TrainConfig

    config = REPO / "configs" / "train" / "tiny-cpu.yaml"
    with pytest.raises(UsageError, match=r"^command line `optimizer=\{lr: 0\}`: optimizer.lr must be > 0"):
        TrainConfig.load(config, ["optimizer.lr=1", "optimizer={lr: 0}"])
    with pytest.raises(UsageError, match=r"^command line `optimizer.lr=0`: "):
        TrainConfig.load(config, ["optimizer={lr: 1}", "optimizer.lr=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("keep_last: 2", "keep_last: 0"))
    line = next(n for n, s in enumerate(bad.read_text().splitlines(), 1) if "keep_last: 0" in s)
    with pytest.raises(UsageError, match=rf"^{bad}:{line}: checkpoint.keep_last must be >= 1, got 0"):
        TrainConfig.load(bad, ["optimizer.lr=1e-4"])  # an unrelated override does not take the blame
