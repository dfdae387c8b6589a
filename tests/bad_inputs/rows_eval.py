"""`eval` stages: tasks, run."""
from __future__ import annotations

from tests.bad_inputs import Ctx, Row
from tests.conftest import REPO

EXAM = REPO / "eval" / "exams" / "legal.jsonl"


def _bad_exam(ctx: Ctx) -> list[str]:
    bad = ctx.tmp / "broken.jsonl"
    bad.write_text(EXAM.read_text().splitlines()[0] + "\n{not json\n")
    return ["eval", "tasks", "--exams", str(EXAM), str(bad), "--out", str(ctx.tmp / "tasks")]


def _bad_exam_existing_out(ctx: Ctx) -> list[str]:
    from megatron_cpt.cli import main

    assert main(["eval", "tasks", "--exams", str(EXAM), "--out", str(ctx.tmp / "tasks")]) == 0
    return _bad_exam(ctx)


def _two_exams_one_name(ctx: Ctx) -> list[str]:
    """Another exam saved as legal.jsonl in another folder: once mixed silently with the first."""
    other = ctx.tmp / "other" / "legal.jsonl"
    other.parent.mkdir()
    other.write_text(REPO.joinpath("eval", "exams", "medical.jsonl").read_text())
    return ["eval", "tasks", "--exams", str(EXAM), str(other), "--out", str(ctx.tmp / "tasks")]


ROWS = [
    Row("eval-tasks-bad-exam", _bad_exam, ("broken.jsonl:2: invalid JSON",)),
    Row("eval-tasks-bad-exam-existing-out", _bad_exam_existing_out,
        ("broken.jsonl:2: invalid JSON",)),
    Row("eval-tasks-two-exams-one-name", _two_exams_one_name,
        (str(EXAM), "other/legal.jsonl", "share the name 'legal'", "rename one")),
]
