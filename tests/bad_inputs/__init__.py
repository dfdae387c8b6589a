"""Rows of the bad-input table (tests/test_bad_inputs.py): one module per CLI stage.

A row is one probe a new user could try: how to build its inputs, what the one-line error must
say, its exit code, and which files must come out unchanged (compared by hash). Every module here
exports ``ROWS: list[Row]``; add a row when a stage gains a way to fail.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass
class Ctx:
    """What a row's setup gets: its own empty folder and the session fixtures, built on demand."""

    tmp: Path
    _request: Any

    def fixture(self, name: str) -> Any:
        """A conftest fixture by name (tiny_tokenizer, tiny_ckpt, toy, slurm_cluster ...)."""
        return self._request.getfixturevalue(name)


@dataclasses.dataclass
class Outcome:
    """What running a row produced: exit code and stderr (stdout kept for messages)."""

    code: int
    err: str
    out: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """One probe.

    setup: builds the inputs under ``ctx.tmp`` and returns the CLI argv.
    words: each must appear in the error output (the last stderr line when ``one_line``).
    code: the expected exit status (2 for bad input).
    unchanged: the paths whose content must be the same before and after (by hash, whole trees
        for folders); ``None`` means everything under ``ctx.tmp`` and no new files there.
    one_line: the error output is exactly one line.
    run: how to execute it; ``None`` runs ``megatron_cpt.cli.main(argv)`` in-process. A row that
        needs a real process or a signal gives its own runner (argv, ctx) -> Outcome.
    check: extra assertions after the run (e.g. a checkpoint that must now exist).
    """

    name: str
    setup: Callable[[Ctx], list[str]]
    words: tuple[str, ...]
    code: int = 2
    unchanged: Callable[[Ctx], list[Path]] | None = None
    one_line: bool = True
    run: Callable[[list[str], Ctx], Outcome] | None = None
    check: Callable[[Ctx, Outcome], None] | None = None


def snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (folders recursively); absent paths map to None."""
    out: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else "absent"
    return out
