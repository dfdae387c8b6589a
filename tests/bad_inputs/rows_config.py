"""Numeric settings outside their declared range (megatron_cpt/config_ranges.py): refused with
the place the value came from — the YAML's ``file:line`` or the command-line argument."""
from __future__ import annotations

from tests.bad_inputs import Ctx, Row
from tests.conftest import REPO

TINY = (REPO / "configs" / "train" / "tiny-cpu.yaml").read_text().replace(
    "run_dir: ../../runs/tiny-cpu", "run_dir: run")  # anything written would land in ctx.tmp
BAD_LR = TINY.replace("lr: 3.0e-3,", "lr: -1,")
LR_LINE = next(n for n, line in enumerate(BAD_LR.splitlines(), 1) if "lr: -1," in line)


def _yaml(ctx: Ctx, name: str, text: str) -> str:
    path = ctx.tmp / name
    path.write_text(text)
    return str(path)


def _toy(ctx: Ctx) -> list[str]:
    """Overrides pointing at the toy checkpoint and data: without the bad value, `train
    --check` passes (so the row shows the value itself is refused, not a missing input)."""
    from megatron_cpt.training.toy import toy_overrides

    return toy_overrides(ctx.fixture("toy"), ctx.tmp / "run")[1:]  # run_dir stays `run`


def _lr_in_yaml(ctx: Ctx) -> list[str]:
    return ["train", "--check", "--config", _yaml(ctx, "bad-lr.yaml", BAD_LR), *_toy(ctx)]


def _every_tokens_override(ctx: Ctx) -> list[str]:
    return ["train", "--check", "--config", _yaml(ctx, "tiny.yaml", TINY), *_toy(ctx),
            "checkpoint.every_tokens=-5"]


def _type_error_override(ctx: Ctx) -> list[str]:
    return ["train", "--check", "--config", _yaml(ctx, "tiny.yaml", TINY), "optimizer.lr=fast"]


def _negative_fewshot(ctx: Ctx) -> list[str]:
    return ["eval", "run", "--run-dir", str(ctx.tmp / "run"), "--num-fewshot", "-1"]


ROWS = [
    Row("config-lr-negative-in-yaml", _lr_in_yaml,
        (f"bad-lr.yaml:{LR_LINE}: optimizer.lr must be > 0, got -1",)),
    # a negative interval used to checkpoint every step; the argument, not the YAML, is blamed
    Row("config-every-tokens-negative-override", _every_tokens_override,
        ("command line `checkpoint.every_tokens=-5`: checkpoint.every_tokens must be > 0, got -5",)),
    Row("config-override-wrong-type-blames-argument", _type_error_override,
        ("command line `optimizer.lr=fast`: optimizer.lr must be float",)),
    # -1 shots used to become 0 silently
    Row("eval-run-negative-fewshot", _negative_fewshot, ("--num-fewshot must be >= 0, got -1",)),
]
