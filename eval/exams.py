"""Exam files: one multiple-choice question per JSONL line, validated with line numbers.

A line looks like (fields in this order by convention; order is not enforced)::

    {"id": "legal-dev-001", "split": "dev", "subject": "contracts",
     "question": "...", "choices": ["...", "...", "...", "..."], "answer": 2}

- ``id``: unique non-empty string within the file.
- ``split``: ``dev`` (few-shot examples), ``val`` (checkpoint selection) or ``test`` (reported).
- ``subject``: optional string (or null), used for per-subject breakdowns.
- ``question``: non-empty string.
- ``choices``: 2 to 6 distinct non-empty strings, shown as options A-F.
- ``answer``: 0-based index into ``choices``.

A val or test question whose normalized text (see :func:`normalize_question`) repeats a
question of another split is refused: dev questions appear verbatim in every few-shot
prompt, and a val/test overlap would let checkpoint selection see the reported items.
Blank lines are ignored. See docs/exams.md.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from megatron_cpt.errors import UsageError

SPLITS = ("dev", "val", "test")
LETTERS = "ABCDEF"
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
REQUIRED_FIELDS = ("id", "split", "question", "choices", "answer")
OPTIONAL_FIELDS = ("subject",)
SAMPLE_EXAMS_DIR = Path(__file__).resolve().parent / "exams"


@dataclass(frozen=True)
class ExamItem:
    """One validated multiple-choice question."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    split: str
    subject: str | None = None
    line: int = field(default=0, compare=False)  # 1-based line in the source file

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def normalize_question(text: str) -> str:
    """Text used to detect a question repeated across splits: NFKC, case-folded,
    punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def sample_exam_paths() -> dict[str, Path]:
    """The exams shipped with the package, by name (file stem)."""
    return {p.stem: p for p in sorted(SAMPLE_EXAMS_DIR.glob("*.jsonl"))}


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _parse_item(record, where: str, lineno: int) -> ExamItem:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object per line, got {type(record).__name__}; "
                         "write one {\"id\": ..., \"question\": ...} object per line")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise UsageError(f"{where}: missing field(s) {', '.join(missing)}; every line needs "
                         f"{', '.join(REQUIRED_FIELDS)} (subject is optional)")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed fields are "
                         f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    for key in ("id", "question"):
        if not _is_text(record[key]):
            raise UsageError(f"{where}: field {key!r} must be a non-empty string, got "
                             f"{record[key]!r}")
    split = record["split"]
    if split not in SPLITS:
        raise UsageError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}; "
                         "use dev (few-shot), val (checkpoint selection) or test (reported)")
    subject = record.get("subject")
    if subject is not None and not _is_text(subject):
        raise UsageError(f"{where}: field 'subject' must be a non-empty string or null, got "
                         f"{subject!r}")
    choices = record["choices"]
    if not isinstance(choices, list):
        raise UsageError(f"{where}: field 'choices' must be a list of strings, got "
                         f"{type(choices).__name__}")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise UsageError(f"{where}: {len(choices)} choice(s); give between {MIN_CHOICES} "
                         f"and {MAX_CHOICES} choices")
    for i, choice in enumerate(choices):
        if not _is_text(choice):
            raise UsageError(f"{where}: choice {i} must be a non-empty string, got {choice!r}")
    seen_choices: dict[str, int] = {}
    for i, choice in enumerate(choices):
        key = " ".join(unicodedata.normalize("NFKC", choice).casefold().split())
        if key in seen_choices:
            raise UsageError(f"{where}: choices {seen_choices[key]} and {i} are the same "
                             f"({choice!r}); make every choice distinct")
        seen_choices[key] = i
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UsageError(f"{where}: field 'answer' must be an integer index into choices "
                         f"(0 = A), got {answer!r}")
    if not 0 <= answer < len(choices):
        raise UsageError(f"{where}: answer {answer} is out of range for {len(choices)} choices; "
                         f"use a 0-based index from 0 to {len(choices) - 1}")
    return ExamItem(id=record["id"], question=record["question"], choices=tuple(choices),
                    answer=answer, split=split, subject=subject, line=lineno)


def load_exam(path) -> list[ExamItem]:
    """Read and validate an exam JSONL file; raise UsageError naming file:line on the first
    problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: exam file not found; pass an existing .jsonl path") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                         "save the file as UTF-8") from None

    items: list[ExamItem] = []
    id_lines: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                             "write one complete JSON object per line") from None
        item = _parse_item(record, where, lineno)
        if item.id in id_lines:
            raise UsageError(f"{where}: duplicate id {item.id!r} (first on line "
                             f"{id_lines[item.id]}); give every question a unique id")
        id_lines[item.id] = lineno
        items.append(item)
    if not items:
        raise UsageError(f"{path}: no questions; an exam needs at least one JSON line")

    # Contamination between splits: dev is shown in every prompt, val picks the checkpoint.
    first_by_split: dict[str, dict[str, ExamItem]] = {s: {} for s in SPLITS}
    for item in items:
        first_by_split[item.split].setdefault(normalize_question(item.question), item)
    for item in items:
        if item.split == "dev":
            continue
        earlier = ["dev"] if item.split == "val" else ["dev", "val"]
        for other in earlier:
            hit = first_by_split[other].get(normalize_question(item.question))
            if hit is not None:
                raise UsageError(
                    f"{path}:{item.line}: {item.split} question {item.id!r} repeats {other} "
                    f"question {hit.id!r} (line {hit.line}); remove or rewrite one of the two")
    return items


def by_split(items, split: str) -> list[ExamItem]:
    """The items of one split, in file order."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return [item for item in items if item.split == split]
