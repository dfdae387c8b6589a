"""Bad input is one line and exit 2, and leaves nothing behind: a table of the error paths of
`prep tokenize` (output path), `prep stats --verify` (manifest accounting) and `eval tasks`
(a bad exam among good ones). YAML syntax errors of every config kind: test_config_loader.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_cpt.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAM = REPO / "eval" / "exams" / "legal.jsonl"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _tokenize(tmp: Path, tok: Path, prefix: str) -> list[str]:
    (tmp / "in.jsonl").write_text("".join(json.dumps({"text": f"doc {i} text"}) + "\n"
                                          for i in range(5)))
    return ["prep", "tokenize", "--input", str(tmp / "in.jsonl"), "--tokenizer", str(tok),
            "--output-prefix", prefix]


def _under_a_file(tmp, tok):
    (tmp / "plain").write_text("a file, not a folder")
    return _tokenize(tmp, tok, str(tmp / "plain" / "ds")), "cannot create"


def _read_only(tmp, tok):
    return _tokenize(tmp, tok, "/proc/megatron-cpt-test/ds"), "cannot create /proc/megatron-cpt-test"


def _accounting(tmp, tok):
    prefix = str(tmp / "ds")
    assert main(_tokenize(tmp, tok, prefix)) == 0
    manifest = json.loads(Path(prefix + ".manifest.json").read_text())
    manifest["documents_in"] += 2  # two documents that were neither written nor dropped
    Path(prefix + ".manifest.json").write_text(json.dumps(manifest))
    return ["prep", "stats", prefix, "--verify"], "accounting does not add up: 7 in != 5 written"


def _bad_exam(tmp, tok):
    bad = tmp / "broken.jsonl"
    bad.write_text(EXAM.read_text().splitlines()[0] + "\n{not json\n")
    return (["eval", "tasks", "--exams", str(EXAM), str(bad), "--out", str(tmp / "tasks")],
            f"{bad}:2: invalid JSON")


def _bad_exam_existing_out(tmp, tok):
    assert main(["eval", "tasks", "--exams", str(EXAM), "--out", str(tmp / "tasks")]) == 0
    argv, message = _bad_exam(tmp, tok)
    return argv, message


CASES = {"tokenize-output-under-a-file": _under_a_file, "tokenize-read-only-output": _read_only,
         "stats-verify-accounting": _accounting, "eval-tasks-bad-exam": _bad_exam,
         "eval-tasks-bad-exam-existing-out": _bad_exam_existing_out}


@pytest.mark.parametrize("case", list(CASES))
def test_error_path_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, tiny_tokenizer, capsys):
    argv, message = CASES[case](tmp_path, tiny_tokenizer)
    before = _tree(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert _tree(tmp_path) == before  # nothing written, nothing left behind


def test_empty_input_warns(tmp_path, tiny_tokenizer, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["prep", "tokenize", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer",
                 str(tiny_tokenizer), "--output-prefix", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err
    assert f"warning: the input {tmp_path / 'empty.jsonl'} holds no documents" in err, err
