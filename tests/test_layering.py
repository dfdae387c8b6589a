"""The layering of docs/architecture.md, enforced by a static scan (no imports run):

    apps      megatron_cpt/cli, launch, report, demo.py, __main__.py
    training  megatron_cpt/training
    stages    data_prep, eval, megatron_cpt/tiny.py
    ground    megatron_cpt/errors.py, config_loader.py, config_ranges.py, run_folder.py, runtime, models, checkpoint,
              training/config.py (the typed schema of a run's config.yaml)

No import (module level or inside a function) may point to a higher layer, and Megatron-core
private attributes (``x._name = ...`` / ``setattr(x, "_name", ...)``) are assigned only under
megatron_cpt/runtime (each such patch checks the installed version there).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_cpt", "data_prep", "eval")
LAYERS = {  # path prefix (relative to the repo) -> layer; the longest matching prefix wins
    "megatron_cpt/__init__.py": 0, "megatron_cpt/errors.py": 0, "megatron_cpt/config_loader.py": 0,
    "megatron_cpt/config_ranges.py": 0,
    "megatron_cpt/run_folder.py": 0, "megatron_cpt/provenance.py": 0, "megatron_cpt/runtime/": 0, "megatron_cpt/models/": 0,
    "megatron_cpt/checkpoint/": 0,
    # the typed schema of a run folder's config.yaml: read by run_folder (ground) and by eval
    "megatron_cpt/training/config.py": 0,
    # experiment trackers: imports only run_folder; used by the trainer and by `eval run`
    "megatron_cpt/training/tracking.py": 0,
    "data_prep/": 1, "eval/": 1, "megatron_cpt/tiny.py": 1,
    "megatron_cpt/training/": 2,
    "megatron_cpt/cli/": 3, "megatron_cpt/launch/": 3, "megatron_cpt/report/": 3,
    "megatron_cpt/demo.py": 3, "megatron_cpt/__main__.py": 3,
}
NAMES = ("ground", "stages", "training", "apps")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _layer(rel: str) -> int | None:
    best = max((k for k in LAYERS if rel == k or (k.endswith("/") and rel.startswith(k))),
               key=len, default=None)
    return None if best is None else LAYERS[best]


def _module_file(module: str) -> str | None:
    """The repo file of a dotted module name (None: not ours)."""
    path = REPO / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def _imports(tree: ast.AST, rel: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, names resolved to modules where they are."""
    package = rel.rsplit("/", 1)[0].replace("/", ".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import module` imports pkg.module
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _module_file(sub) else base))
    return out


def test_every_module_has_a_layer():
    missing = [p.relative_to(REPO).as_posix() for p in _sources()
               if _layer(p.relative_to(REPO).as_posix()) is None]
    assert not missing, f"add these files to LAYERS (and docs/architecture.md): {missing}"


def test_no_import_points_upward():
    upward = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        mine = _layer(rel)
        for line, module in _imports(ast.parse(path.read_text(), rel), rel):
            target = _module_file(module) if module.split(".")[0] in PACKAGES else None
            if target is not None and (_layer(target) or 0) > (mine or 0):
                upward.append(f"{rel}:{line} ({NAMES[mine]}) imports {module} ({NAMES[_layer(target)]})")
    assert not upward, "imports pointing to a higher layer:\n" + "\n".join(upward)


def _megatron_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            names |= {a.asname or a.name for a in node.names}
    return names


def _private_assignments(tree: ast.AST) -> list[tuple[int, str]]:
    mcore = _megatron_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and _private(t.attr) and _root(t.value) in mcore:
                found.append((node.lineno, f"{_root(t.value)}.{t.attr}"))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and _private(str(node.args[1].value)) and _root(node.args[0]) in mcore):
            found.append((node.lineno, f"setattr({_root(node.args[0])}, {node.args[1].value!r})"))
    return found


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_megatron_private_state_is_patched_only_in_runtime():
    outside = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("megatron_cpt/runtime/"):
            continue
        outside += [f"{rel}:{line} assigns {what}"
                    for line, what in _private_assignments(ast.parse(path.read_text(), rel))]
    assert not outside, "move these Megatron-core patches to megatron_cpt/runtime:\n" + "\n".join(outside)


@pytest.mark.parametrize("code,expected", [
    ("from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
     "filesystem_async._results_queue = None\n", ["filesystem_async._results_queue"]),
    ("import megatron.core.parallel_state as ps\nsetattr(ps, '_GROUP', 1)\n", ["setattr(ps, '_GROUP')"]),
    ("import os\nos._private = 1\n", []),
])
def test_private_assignment_scan_finds_patches(code, expected):
    assert [w for _, w in _private_assignments(ast.parse(code))] == expected


def test_upward_import_is_detected():
    tree = ast.parse("def f():\n    from megatron_cpt.training import loop\n")
    (line, module), = _imports(tree, "megatron_cpt/checkpoint/x.py")
    assert (line, module) == (2, "megatron_cpt.training.loop")
    assert _layer(_module_file(module)) > _layer("megatron_cpt/checkpoint/x.py")


def test_mcore_patches_refuse_an_untested_version(monkeypatch):
    from megatron_cpt.runtime import mcore_patches

    assert mcore_patches.mcore_version() in mcore_patches.TESTED_MCORE  # the installed one passes
    mcore_patches.require_tested_mcore("cpu_backend")
    monkeypatch.setattr(mcore_patches, "mcore_version", lambda: "0.99.0")
    monkeypatch.delenv(mcore_patches.ALLOW_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"cpu_backend .* 0\.16\.1, but 0\.99\.0 is installed"):
        mcore_patches.require_tested_mcore("cpu_backend")
    monkeypatch.setenv(mcore_patches.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="running anyway"):
        mcore_patches.require_tested_mcore("cpu_backend")
