"""Memory and overlap options give the baseline's losses on the tiny CPU model."""
from __future__ import annotations

import pytest

from test_train import _ok, launch, losses

STEPS = ["budget.iterations=4", "data.valid=[]"]


@pytest.fixture(scope="module")
def baseline(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("opt") / "base"
    _ok(launch(toy, 1, run, STEPS))
    return losses(run)


@pytest.mark.parametrize("nproc,options", [
    (1, ["memory.recompute=selective"]),
    (1, ["memory.recompute=full", "memory.recompute_num_layers=2"]),
    (2, ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]),
], ids=["selective-recompute", "full-recompute", "dp2-overlap-grad-reduce-param-gather"])
def test_option_keeps_losses(toy, tmp_path, baseline, nproc, options):
    run = tmp_path / "run"
    _ok(launch(toy, nproc, run, STEPS + options))
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for it, value in baseline.items():
        assert got[it] == pytest.approx(value, abs=1e-5), (it, got, baseline)


def test_sequence_parallel_without_te_is_refused(toy, tmp_path):
    proc = launch(toy, 2, tmp_path / "run", STEPS + ["parallel.tp=2", "parallel.sequence_parallel=true"])
    assert "parallel.sequence_parallel needs the Transformer Engine layer spec" in proc.stderr + proc.stdout
    assert proc.returncode != 0


@pytest.mark.parametrize("options,msg", [
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.attention_backend=sdpa"],
     "this run uses the local spec (attention_backend=sdpa), whose RMSNorm does not support it"),
    (["model.attention_backend=local", "model.masked_softmax_fusion=true"],
     "model.masked_softmax_fusion=true but needs CUDA"),
    (["model.bias_activation_fusion=true"], "model.bias_activation_fusion=true but CPU"),
], ids=["sp-on-local-spec", "masked-softmax-without-kernels", "jit-fusion-on-cpu"])
def test_check_refuses_what_the_model_build_would_refuse(toy, tmp_path, options, msg):
    """Preflight decides from the spec in use and the kernels present: one line, exit 2, before
    any tensor (what it accepts builds: tests/test_bf16.py runs bf16 through its checkpoints)."""
    proc = launch(toy, 1, tmp_path / "run", STEPS + options + ["--check"], env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and "arning" not in ln]
    assert len(err) == 1 and msg in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
