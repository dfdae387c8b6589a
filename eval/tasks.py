"""Write lm-eval task YAMLs for exam files, so any exam runs with the stock harness.

For exam ``E`` and scored split ``S`` (val, test) the task ``mcpt_E_S`` asks each question
with ``num_fewshot`` dev questions before it (the first ones, in file order: the same prompt
for every checkpoint) and scores the letters A.. as continuations.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from eval.exams import LETTERS, by_split, load_exam

DEFAULT_PROMPT = ("{{question.strip()}}\n"
                  "{% for c in choices %}{{ 'ABCDEF'[loop.index0] }}. {{ c }}\n{% endfor %}"
                  "Answer:")
SCORED_SPLITS = ("val", "test")


class _FunctionTag(str):
    """Dumped as lm-eval's ``!function`` YAML tag."""


class _TaskDumper(yaml.SafeDumper):
    """A local dumper: the ``!function`` representer must not leak into ``yaml.safe_dump``."""


_TaskDumper.add_representer(
    _FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_name(exam: str, split: str) -> str:
    return f"mcpt_{exam}_{split}"


def _write_split(items, path: Path) -> None:
    with path.open("w") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "subject": it.subject, "question": it.question,
                                "choices": list(it.choices), "answer": it.answer,
                                "letters": list(LETTERS[: len(it.choices)])}) + "\n")


def write_tasks(exams: list[Path], out: Path, num_fewshot: int = 5,
                prompt: str = DEFAULT_PROMPT, splits=SCORED_SPLITS) -> list[str]:
    """Validate ``exams`` and write one task YAML per exam and split into ``out``.
    Returns the task names. Data paths in the YAMLs are absolute. All or nothing: every exam
    is validated before a file is written, files are staged beside ``out`` and moved in only
    when all were written, so a failed call leaves nothing behind."""
    out = Path(out).resolve()
    loaded = [(Path(p), load_exam(p)) for p in exams]
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / "data").mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("task_utils.py"), stage / "utils.py")
        names = [name for exam_path, items in loaded
                 for name in _write_exam(exam_path, items, stage, out, num_fewshot, prompt, splits)]
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def _write_exam(exam_path: Path, items, stage: Path, out: Path, num_fewshot: int, prompt: str,
                splits) -> list[str]:
    """One exam's split files and task YAMLs, written under ``stage``, naming paths in ``out``."""
    exam = exam_path.stem
    dev = by_split(items, "dev")
    _write_split(dev, stage / "data" / f"{exam}.dev.jsonl")
    files = {"dev": out / "data" / f"{exam}.dev.jsonl"}
    names = []
    for split in splits:
        scored = by_split(items, split)
        if not scored:
            continue
        _write_split(scored, stage / "data" / f"{exam}.{split}.jsonl")
        files[split] = out / "data" / f"{exam}.{split}.jsonl"
        name = task_name(exam, split)
        task = {
            "task": name,
            "tag": [f"mcpt_{split}", f"mcpt_{exam}"],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"dev": str(files["dev"]), split: str(files[split])}},
            "test_split": split,
            "fewshot_split": "dev",
            "num_fewshot": min(num_fewshot, len(dev)),
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": prompt,
            "doc_to_choice": "letters",
            "doc_to_target": "answer",
            "target_delimiter": " ",
            "fewshot_delimiter": "\n\n",
            "process_results": _FunctionTag("utils.process_results"),
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                {"metric": "answer_ppl",
                 "aggregation": _FunctionTag("utils.perplexity_of_mean_nll"),
                 "higher_is_better": False},
            ],
            "metadata": {"version": 1.0, "exam_file": str(Path(exam_path).resolve())},
        }
        (stage / f"{name}.yaml").write_text(yaml.dump(task, Dumper=_TaskDumper, sort_keys=False, width=1000))
        names.append(name)
    return names
