"""`prep` stages: tokenize, stats, split."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bad_inputs import Ctx, Outcome, Row
from tests.conftest import REPO


def _tokenize_argv(ctx: Ctx, prefix: str) -> list[str]:
    (ctx.tmp / "in.jsonl").write_text("".join(json.dumps({"text": f"doc {i} text"}) + "\n"
                                              for i in range(5)))
    return ["prep", "tokenize", "--input", str(ctx.tmp / "in.jsonl"), "--tokenizer",
            str(ctx.fixture("tiny_tokenizer")), "--output-prefix", prefix]


def _under_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "plain").write_text("a file, not a folder")
    return _tokenize_argv(ctx, str(ctx.tmp / "plain" / "ds"))


def _read_only(ctx: Ctx) -> list[str]:
    return _tokenize_argv(ctx, "/proc/megatron-cpt-test/ds")


def _accounting(ctx: Ctx) -> list[str]:
    from megatron_cpt.cli import main

    prefix = str(ctx.tmp / "ds")
    assert main(_tokenize_argv(ctx, prefix)) == 0
    manifest = json.loads(Path(prefix + ".manifest.json").read_text())
    manifest["documents_in"] += 2  # two documents that were neither written nor dropped
    Path(prefix + ".manifest.json").write_text(json.dumps(manifest))
    return ["prep", "stats", prefix, "--verify"]


def _docs(path: Path, n: int, words: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = " ".join(f"word{i % 97} legal text" for i in range(words))
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"{i} {body}"}) + "\n" for i in range(n)))
    return path


SPLIT = ["--fractions", "train=0.9,valid=0.1"]


def _split_input_in_output(ctx: Ctx) -> list[str]:
    """The input sits in the output folder under a split's name: once wiped it, exit 0."""
    _docs(ctx.tmp / "s" / "train.jsonl", 50)
    return ["prep", "split", "--input", str(ctx.tmp / "s" / "train.jsonl"), "--output",
            str(ctx.tmp / "s"), *SPLIT]


def _split_output_is_a_file(ctx: Ctx) -> list[str]:
    _docs(ctx.tmp / "in.jsonl", 20)
    return ["prep", "split", "--input", str(ctx.tmp / "in.jsonl"), "--output",
            str(ctx.tmp / "in.jsonl"), *SPLIT]


def _split_output_under_a_file(ctx: Ctx) -> list[str]:
    _docs(ctx.tmp / "in.jsonl", 20)
    return ["prep", "split", "--input", str(ctx.tmp / "in.jsonl"), "--output",
            str(ctx.tmp / "in.jsonl" / "out"), *SPLIT]


def _split_again(ctx: Ctx) -> list[str]:
    """A previous split wrote test.jsonl; this one has no test split."""
    from megatron_cpt.cli import main

    _docs(ctx.tmp / "in.jsonl", 50)
    out = ctx.tmp / "out"
    assert main(["prep", "split", "--input", str(ctx.tmp / "in.jsonl"), "--output", str(out),
                 "--fractions", "train=0.8,valid=0.1,test=0.1"]) == 0
    assert (out / "test.jsonl").is_file()
    (out / "notes.txt").write_text("the user's own file: never removed")
    return ["prep", "split", "--input", str(ctx.tmp / "in.jsonl"), "--output", str(out), *SPLIT]


def _holds_what_split_json_lists(ctx: Ctx, _: Outcome) -> None:
    out = ctx.tmp / "out"
    summary = json.loads((out / "split.json").read_text())
    assert sorted(summary["files"].values()) == ["train.jsonl", "valid.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "split.json", "train.jsonl",
                                                     "valid.jsonl"]
    lines = sum(len((out / f).read_text().splitlines()) for f in summary["files"].values())
    assert lines == sum(summary["documents"].values()) == 50


def _tokenize_big(ctx: Ctx) -> list[str]:
    """An input that takes the tokenizer well over a few seconds (it is interrupted early)."""
    return ["prep", "tokenize", "--input", str(_docs(ctx.tmp / "big.jsonl", 10_000, words=200)),
            "--tokenizer", str(ctx.fixture("tiny_tokenizer")), "--output-prefix",
            str(ctx.tmp / "ds")]


def _ctrl_c_once_tokenizing(argv: list[str], ctx: Ctx) -> Outcome:
    """A real process and a real SIGINT to its process group (what Ctrl-C in a terminal
    sends), once the first shard is being written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_cpt", *argv], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        # a parent that ignores SIGINT (a background job) would pass that on: undo it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    shards = ctx.tmp / "ds.work" / "shards"
    deadline = time.monotonic() + 120
    while not shards.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"tokenize ended before the signal:\n{proc.communicate()}"
    assert shards.is_dir(), "tokenize did not start a shard within 120 s"
    time.sleep(0.3)
    assert proc.poll() is None, "tokenize ended before the signal: make the input bigger"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return Outcome(code=proc.returncode, err=err, out=out)


ROWS = [
    Row("tokenize-output-under-a-file", _under_a_file, ("cannot create",)),
    Row("tokenize-read-only-output", _read_only, ("cannot create /proc/megatron-cpt-test",)),
    Row("stats-verify-accounting", _accounting,
        ("accounting does not add up: 7 in != 5 written",)),
    Row("split-input-inside-output", _split_input_in_output,
        ("--input", "train.jsonl", "another --output folder")),
    Row("split-output-is-a-file", _split_output_is_a_file, ("is a file, not a folder",)),
    Row("split-output-under-a-file", _split_output_under_a_file,
        ("is under the file", "not a folder")),
    Row("split-again-removes-stale-split-files", _split_again, (), code=0, one_line=False,
        unchanged=lambda ctx: [ctx.tmp / "in.jsonl", ctx.tmp / "out" / "notes.txt"],
        check=_holds_what_split_json_lists),
    # everything under tmp unchanged and nothing new: PREFIX.work and PREFIX.* are gone
    Row("tokenize-ctrl-c", _tokenize_big, ("interrupted (SIGINT)", "removed", "ds.work"),
        code=130, run=_ctrl_c_once_tokenizing),
]
