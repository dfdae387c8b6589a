"""Exam format validation, the shipped sample exams, and the multiple-choice metrics."""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from eval.exams import LETTERS, ExamItem, by_split, load_exam, normalize_question, sample_exam_paths
from megatron_cpt.errors import UsageError

# ---------------------------------------------------------------- shipped exams

EXAMS = ("legal", "medical", "accounting", "general")


def test_all_sample_exams_are_shipped():
    assert set(sample_exam_paths()) == set(EXAMS)


@pytest.mark.parametrize("name", EXAMS)
def test_sample_exam_loads_and_meets_counts(name):
    path = sample_exam_paths()[name]
    items = load_exam(path)
    splits = Counter(item.split for item in items)
    assert splits == {"dev": 12, "val": 30, "test": 30}
    assert all(len(item.choices) == 4 for item in items)
    assert all(item.subject for item in items)
    # answers balanced over A-D, overall and within every split
    assert set(Counter(item.answer_letter for item in items).values()) == {18}
    for split, n in splits.items():
        per_letter = Counter(item.answer for item in by_split(items, split)).values()
        assert max(per_letter) - min(per_letter) <= 1, split
    # ids follow <exam>-<split>-NNN
    for item in items:
        prefix, split, number = item.id.rsplit("-", 2)
        assert (prefix, split) == (name, item.split) and len(number) == 3 and number.isdigit()
    # no question repeats anywhere in the file
    assert len({normalize_question(item.question) for item in items}) == len(items)
    # the dev split (the few-shot examples) covers every subject
    assert {i.subject for i in items if i.split == "dev"} == {i.subject for i in items}


@pytest.mark.parametrize("name", EXAMS)
def test_sample_exam_field_order(name):
    with open(sample_exam_paths()[name], encoding="utf-8") as f:
        for line in f:
            assert list(json.loads(line)) == ["id", "split", "subject", "question", "choices",
                                              "answer"]


# ---------------------------------------------------------------- malformed files


def _record(**overrides):
    record = {"id": "x-dev-001", "split": "dev", "subject": "s",
              "question": "What is one plus one?", "choices": ["1", "2", "3", "4"], "answer": 1}
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


def _write(tmp_path, lines):
    path = tmp_path / "exam.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n",
                    encoding="utf-8")
    return path


def _good(i, split="val", question=None, **overrides):
    fields = dict(id=f"x-{split}-{i:03d}", split=split,
                  question=question or f"What is question number {i}?")
    fields.update(overrides)
    return _record(**fields)


def test_valid_file_loads(tmp_path):
    path = _write(tmp_path, [_record(), "", _good(2), _good(3, "test")])
    items = load_exam(path)
    assert [i.id for i in items] == ["x-dev-001", "x-val-002", "x-test-003"]
    assert items[0] == ExamItem(id="x-dev-001", question="What is one plus one?",
                                choices=("1", "2", "3", "4"), answer=1, split="dev", subject="s")
    assert items[0].answer_letter == "B" and items[2].line == 4
    # subject is optional
    assert load_exam(_write(tmp_path, [_record(subject=_DROP)]))[0].subject is None


BAD_CASES = {
    "invalid json": ('{"id": "x", "split": "val",', "invalid JSON"),
    "not an object": ('["a", "b"]', "expected a JSON object"),
    "missing answer": (_good(9, answer=_DROP), "missing field(s) answer"),
    "missing choices": (_good(9, choices=_DROP), "missing field(s) choices"),
    "unknown field": (_good(9, answers=1), "unknown field(s) answers"),
    "empty question": (_good(9, question="  "), "'question' must be a non-empty string"),
    "id not a string": (_good(9, id=7), "'id' must be a non-empty string"),
    "choices not a list": (_good(9, choices="A B C D"), "'choices' must be a list"),
    "choice not a string": (_good(9, choices=["a", 2, "c"]), "choice 1 must be"),
    "one choice": (_good(9, choices=["only"], answer=0), "1 choice(s); give between 2 and 6"),
    "seven choices": (_good(9, choices=list("abcdefg")), "7 choice(s); give between 2 and 6"),
    "duplicate choices": (_good(9, choices=["Yes", "no", "yes "]),
                          "choices 0 and 2 are the same"),
    "answer out of range": (_good(9, answer=4), "answer 4 is out of range for 4 choices"),
    "negative answer": (_good(9, answer=-1), "answer -1 is out of range"),
    "answer is a letter": (_good(9, answer="B"), "'answer' must be an integer index"),
    "answer is a bool": (_good(9, answer=True), "'answer' must be an integer index"),
    "answer is a float": (_good(9, answer=1.0), "'answer' must be an integer index"),
    "bad split": (_good(9, split="train"), "split 'train' is not one of dev, val, test"),
    "bad subject": (_good(9, subject=3), "'subject' must be a non-empty string or null"),
    "duplicate id": (_good(9, id="x-val-002"), "duplicate id 'x-val-002' (first on line 2)"),
    "val repeats dev": (_good(9, "val", "what is ONE plus one"),
                        "val question 'x-val-009' repeats dev question 'x-dev-001' (line 1)"),
    "test repeats dev": (_good(9, "test", "What  is one plus one?!"),
                         "test question 'x-test-009' repeats dev question 'x-dev-001' (line 1)"),
    "test repeats val": (_good(9, "test", "What is question number 2?"),
                         "test question 'x-test-009' repeats val question 'x-val-002' (line 2)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_line_is_refused_with_its_line_number(tmp_path, case):
    bad, expected = BAD_CASES[case]
    # bad line is line 4, after a blank line, so the count includes blank lines
    path = _write(tmp_path, [_record(), _good(2), "", bad, _good(5, "test")])
    with pytest.raises(UsageError) as err:
        load_exam(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert expected in message, message
    assert "\n" not in message
    assert err.value.exit_code == 2


def test_repeat_detected_when_dev_comes_after(tmp_path):
    # file order does not matter: a val line before its dev twin is still refused
    path = _write(tmp_path, [_good(1, "val", "Name the gas plants absorb."), _good(2),
                             _good(3, "dev", "name the gas plants absorb")])
    with pytest.raises(UsageError, match=r":1: val question 'x-val-001' repeats dev question "
                                         r"'x-dev-003' \(line 3\)"):
        load_exam(path)


def test_same_question_within_one_split_is_allowed(tmp_path):
    path = _write(tmp_path, [_good(1, "val", "Which is true?"), _good(2, "val", "Which is true?")])
    assert len(load_exam(path)) == 2


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="no questions"):
        load_exam(_write(tmp_path, ["", "  "]))
    with pytest.raises(UsageError, match="exam file not found"):
        load_exam(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "caf\xe9"}\n')
    with pytest.raises(UsageError, match="not valid UTF-8"):
        load_exam(bad)


def test_six_choices_and_letters(tmp_path):
    items = load_exam(_write(tmp_path, [_record(choices=list("abcdef"), answer=5)]))
    assert items[0].answer_letter == "F" and LETTERS == "ABCDEF"


# ---------------------------------------------------------------- metrics

# Three questions, four choices each, natural-log log-likelihoods of each choice continuation.
LOGLIKS = [
    [-1.0, -2.0, -3.0, -4.0],   # q0: argmax A
    [-9.0, -6.0, -4.0, -8.0],   # q1: argmax C
    [-5.0, -5.5, -2.0, -7.0],   # q2: argmax C
]
ANSWERS = [0, 1, 2]             # q0 right, q1 wrong, q2 right -> acc = 2/3
LENGTHS = [
    [1, 4, 4, 4],               # q0: normalized -1.0, -0.5, -0.75, -1.0 -> B (wrong)
    [9, 12, 2, 16],             # q1: -1.0, -0.5, -2.0, -0.5 -> B (ties D; lowest index wins; right)
    [10, 11, 2, 14],            # q2: -0.5, -0.5, -1.0, -0.5 -> A (wrong)
]


def _score(logliks, answers, lengths):
    """The generated tasks' metrics (eval/task_utils.py, as lm-eval calls them): per-question
    process_results, acc/acc_norm averaged, answer_ppl through the task's aggregation."""
    import task_utils
    docs = [{"answer": a, "letters": ["x" * int(n) for n in ns]} for a, ns in zip(answers, lengths)]
    per = [task_utils.process_results(d, [(ll, False) for ll in lls]) for d, lls in zip(docs, logliks)]
    return {"acc": sum(p["acc"] for p in per) / len(per),
            "acc_norm": sum(p["acc_norm"] for p in per) / len(per),
            "answer_ppl": task_utils.perplexity_of_mean_nll(p["answer_ppl"] for p in per)}


@pytest.fixture(autouse=True, scope="module")
def _task_utils_on_path():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    yield
    sys.path.remove(str(Path(__file__).resolve().parents[1] / "eval"))


def test_metrics_hand_computed():
    # NLL of the correct choices: 1.0, 6.0, 2.0 -> mean 3.0 -> answer_ppl exp(3.0)
    assert _score(LOGLIKS, ANSWERS, LENGTHS) == {
        "acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1 / 3),
        "answer_ppl": pytest.approx(20.085536923187668)}


def test_acc_norm_equals_acc_for_equal_lengths():
    # lettered answers (" A", " B", ...) all have the same length
    m = _score(LOGLIKS, ANSWERS, [[2] * 4] * 3)
    assert m["acc_norm"] == m["acc"]


def test_perfect_and_certain_model():
    assert _score([[0.0, -50.0]], [0], [[1, 1]]) == {"acc": 1.0, "acc_norm": 1.0, "answer_ppl": 1.0}


def test_exams_and_metrics_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, eval.exams, eval.task_utils; "
            "sys.exit('torch' in sys.modules or 'megatron.core' in sys.modules)")
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0
