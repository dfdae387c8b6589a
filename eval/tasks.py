"""Write lm-eval task YAMLs for exam files, so any exam runs with the stock harness.

Two formulations per exam (OLMES, Gu et al. 2024), each with ``num_fewshot`` dev questions
before the question (the first ones, in file order: the same prompt for every checkpoint):

- MCF, task ``mcpt_E_S`` (exam ``E``, scored split ``S`` in val/test): the lettered options
  are shown and the letters A.. are scored as continuations (arXiv 2501.02068's format);
- CF, task ``mcpt_E_cf_S``: only the question is shown and each choice's text is scored as
  the continuation. Small models that cannot use letters can still show what they know.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from eval.exams import LETTERS, by_split, load_exam
from megatron_cpt.errors import UsageError

DEFAULT_PROMPT = ("{{question.strip()}}\n"
                  "{% for c in choices %}{{ 'ABCDEF'[loop.index0] }}. {{ c }}\n{% endfor %}"
                  "Answer:")
CF_PROMPT = "Question: {{question.strip()}}\nAnswer:"
SCORED_SPLITS = ("val", "test")
FORMULATIONS = ("mcf", "cf")
CF_SUFFIX = "_cf"


class _FunctionTag(str):
    """Dumped as lm-eval's ``!function`` YAML tag."""


class _TaskDumper(yaml.SafeDumper):
    """A local dumper: the ``!function`` representer must not leak into ``yaml.safe_dump``."""


_TaskDumper.add_representer(
    _FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_name(exam: str, split: str, formulation: str = "mcf") -> str:
    return f"mcpt_{exam}{CF_SUFFIX if formulation == 'cf' else ''}_{split}"


def parse_task(task: str) -> tuple[str, str]:
    """``mcpt_legal_cf_val`` -> (``legal_cf``, ``val``): the exam key results are stored under
    (``E`` for MCF, ``E_cf`` for CF) and the split."""
    exam, split = task.removeprefix("mcpt_").rsplit("_", 1)
    return exam, split


def _metrics() -> list[dict]:
    ppl = _FunctionTag("utils.perplexity_of_mean_nll")
    names = ["acc", "acc_norm"]
    return [*({"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names),
            {"metric": "answer_ppl", "aggregation": ppl, "higher_is_better": False}]


def _write_split(items, path: Path) -> None:
    with path.open("w") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "subject": it.subject, "question": it.question,
                                "choices": list(it.choices), "answer": it.answer,
                                "letters": list(LETTERS[: len(it.choices)])}) + "\n")


def write_tasks(exams: list[Path], out: Path, num_fewshot: int = 5,
                prompt: str = DEFAULT_PROMPT, splits=SCORED_SPLITS,
                formulations=FORMULATIONS, cf_prompt: str = CF_PROMPT) -> list[str]:
    """Validate ``exams`` and write one task YAML per exam, split and formulation into
    ``out``. Returns the task names. Data paths in the YAMLs are absolute. All or nothing:
    every exam is validated before a file is written, files are staged beside ``out`` and
    moved in only when all were written, so a failed call leaves nothing behind."""
    bad = [f for f in formulations if f not in FORMULATIONS]
    if bad or not formulations:
        raise UsageError(f"formulation(s) {bad or '(none)'} unknown; use mcf and/or cf")
    prompts = {"mcf": prompt, "cf": cf_prompt}
    prompts = {form: prompts[form] for form in formulations}
    out = Path(out).resolve()
    _check_names(exams)
    loaded = [(Path(p), load_exam(p)) for p in exams]
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / "data").mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("task_utils.py"), stage / "utils.py")
        names = [name for exam_path, items in loaded
                 for name in _write_exam(exam_path, items, stage, out, num_fewshot, prompts, splits)]
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def _check_names(exams: list[Path]) -> None:
    """Tasks and data files are named by the exam file's stem: two exams with one stem would
    overwrite each other's files (one's val set scored with the other's dev shots)."""
    seen: dict[str, Path] = {}
    for p in map(Path, exams):
        if p.stem in seen:
            same = " (the same file twice)" if p.resolve() == seen[p.stem].resolve() else ""
            raise UsageError(f"exams {seen[p.stem]} and {p} share the name {p.stem!r}{same}: tasks "
                             "are named by the file name (mcpt_<name>_<split>); rename one")
        seen[p.stem] = p


def _write_exam(exam_path: Path, items, stage: Path, out: Path, num_fewshot: int,
                prompts: dict[str, str], splits) -> list[str]:
    """One exam's split files and task YAMLs (one per formulation in ``prompts``), written
    under ``stage``, naming paths in ``out``."""
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
        for form, prompt in prompts.items():
            task = _task(exam, split, form, files, min(num_fewshot, len(dev)), prompt, exam_path)
            (stage / f"{task['task']}.yaml").write_text(
                yaml.dump(task, Dumper=_TaskDumper, sort_keys=False, width=1000))
            names.append(task["task"])
    return names


def _task(exam: str, split: str, form: str, files: dict, num_fewshot: int, prompt: str,
          exam_path) -> dict:
    """One lm-eval task: MCF scores the letters, CF the choice texts."""
    name = task_name(exam, split, form)
    return {
        "task": name,
        "tag": [f"mcpt_{split}", f"mcpt_{exam}", f"mcpt_{form}"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"dev": str(files["dev"]), split: str(files[split])}},
        "test_split": split,
        "fewshot_split": "dev",
        "num_fewshot": num_fewshot,
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "doc_to_text": prompt,
        "doc_to_choice": "letters" if form == "mcf" else "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "process_results": _FunctionTag("utils.process_results" if form == "mcf"
                                        else "utils.process_results_cf"),
        "metric_list": _metrics(),
        "metadata": {"version": 1.0, "formulation": form,
                     "exam_file": str(Path(exam_path).resolve())},
    }
