"""The project's promise in one place: bad input or a signal never loses work.

One row per probe (tests/bad_inputs/rows_*.py): its inputs, exit code, the words of its one-line
error, and the files that must be unchanged, compared by hash before and after. New stages add
rows there, not tests here.
"""
from __future__ import annotations

import importlib
import pkgutil

import pytest

import tests.bad_inputs as bad_inputs
from tests.bad_inputs import Ctx, Outcome, Row, snapshot


def _rows() -> list[Row]:
    rows: list[Row] = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(bad_inputs.__path__)
                      if m.name.startswith("rows_")):
        rows += importlib.import_module(f"tests.bad_inputs.{mod}").ROWS
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), f"duplicate row names: {names}"
    return rows


ROWS = _rows()


def _in_process(argv: list[str], ctx: Ctx, capsys) -> Outcome:
    from megatron_cpt.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return Outcome(code=code, err=captured.err, out=captured.out)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, tmp_path, request, capsys):
    ctx = Ctx(tmp=tmp_path, _request=request)
    argv = row.setup(ctx)
    watched = row.unchanged(ctx) if row.unchanged else [tmp_path]
    before = snapshot(watched)
    outcome = row.run(argv, ctx) if row.run else _in_process(argv, ctx, capsys)
    err = outcome.err.strip()
    assert outcome.code == row.code, f"exit {outcome.code}, want {row.code}; stderr:\n{err[-3000:]}"
    if row.one_line:
        assert len(err.splitlines()) == 1, f"want one line, got:\n{err[-3000:]}"
    for word in row.words:
        assert word in err, f"{word!r} not in:\n{err[-3000:]}"
    assert snapshot(watched) == before, "a file that must be unchanged changed (or appeared)"
    if row.check:
        row.check(ctx, outcome)
