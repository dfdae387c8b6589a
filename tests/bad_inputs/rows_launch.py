"""`launch` stages: render-sbatch."""
from __future__ import annotations

import yaml

from tests.bad_inputs import Ctx, Outcome, Row
from tests.conftest import REPO


def _study_with_a_size_too_big(ctx: Ctx, *flags: str) -> list[str]:
    """configs/study.yaml cut to 1.5B and 14B x (general, legal), 14B on one GPU per model
    replica (TP1): 160 GiB per 80 GiB GPU. The 1.5B scripts once were written before the
    refusal (21 of 28 on the whole study)."""
    raw = yaml.safe_load((REPO / "configs" / "study.yaml").read_text())
    raw["train_config"] = str(REPO / "configs" / "train" / "study-base.yaml")
    raw["eval"]["exams"] = []
    raw.update(domains=["legal"], controls=[])
    raw["sizes"] = {"1.5b": raw["sizes"]["1.5b"], "14b": {**raw["sizes"]["14b"], "tp": 1, "nodes": 1}}
    (ctx.tmp / "study.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return ["launch", "render-sbatch", "--study", str(ctx.tmp / "study.yaml"), "--out",
            str(ctx.tmp / "scripts"), *flags]


def _only_the_cells_that_fit(ctx: Ctx, _: Outcome) -> None:
    names = sorted(p.name for p in (ctx.tmp / "scripts").iterdir())
    assert names == ["cpt_1.5b_general.sh", "cpt_1.5b_legal.sh"], names


ROWS = [
    Row("render-sbatch-one-size-refused", _study_with_a_size_too_big,
        ("size 14b", "2 of 4 cells refused, no script written", "--skip-refused")),
    Row("render-sbatch-skip-refused", lambda ctx: _study_with_a_size_too_big(ctx, "--skip-refused"),
        ("warning: skipped 2 refused cell(s) cpt_14b_general.sh cpt_14b_legal.sh", "size 14b"), code=0,
        unchanged=lambda ctx: [ctx.tmp / "study.yaml"], check=_only_the_cells_that_fit),
]
