"""SDPA core attention equals Megatron's local attention (fp32, CPU), with GQA and TP2."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_torchrun

DRIVER = REPO / "tests" / "helpers" / "mp_driver.py"


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_matches_local_attention(tmp_path, tiny_ckpt, tp):
    # untied_kv2: 4 heads, 2 kv heads -> GQA (2 heads per group), also per TP2 partition
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps([{"op": "attention", "ckpt": str(tiny_ckpt["untied_kv2"]),
                                  "tp": tp, "pp": 1}]))
    run_torchrun(DRIVER, str(steps), str(tmp_path / "out.json"), nproc=tp)
    (result,) = json.loads((tmp_path / "out.json").read_text())
    assert result["max_abs_logit"] > 0.1  # real logits, not zeros
    assert result["max_abs_diff"] <= 1e-5, result


def test_unknown_backend_is_refused():
    from megatron_cpt.errors import UsageError
    from megatron_cpt.models.qwen2 import BuildOptions, resolve_attention_backend

    with pytest.raises(UsageError, match="unknown model.attention_backend"):
        resolve_attention_backend(BuildOptions(attention_backend="flash"))
    with pytest.raises(UsageError, match="needs Transformer Engine"):
        resolve_attention_backend(BuildOptions(attention_backend="te"))
    assert resolve_attention_backend(BuildOptions()) == "sdpa"  # default without TE
