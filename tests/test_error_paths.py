"""Warnings that are not errors. The error paths (one line, exit 2, nothing left behind) are
rows of tests/test_bad_inputs.py."""
from __future__ import annotations

from megatron_cpt.cli import main


def test_empty_input_warns(tmp_path, tiny_tokenizer, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["prep", "tokenize", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer",
                 str(tiny_tokenizer), "--output-prefix", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err
    assert f"warning: the input {tmp_path / 'empty.jsonl'} holds no documents" in err, err
