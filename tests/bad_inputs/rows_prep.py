"""`prep` stages: tokenize, stats, split."""
from __future__ import annotations

import json
from pathlib import Path

from tests.bad_inputs import Ctx, Row


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


ROWS = [
    Row("tokenize-output-under-a-file", _under_a_file, ("cannot create",)),
    Row("tokenize-read-only-output", _read_only, ("cannot create /proc/megatron-cpt-test",)),
    Row("stats-verify-accounting", _accounting,
        ("accounting does not add up: 7 in != 5 written",)),
]
