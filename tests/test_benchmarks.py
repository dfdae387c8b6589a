"""The throughput benchmark runs on the tiny shape on CPU and writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_throughput_script_on_cpu(tmp_path, backend):
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(REPO / "benchmarks/throughput.py"), "--model", "tiny-a",
           "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--steps", "2", "--warmup", "1", "--attention-backend", backend,
           "--recompute", "selective", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["attention_backend"] == {"sdpa": "SDPAttention", "local": "DotProductAttention"}[backend]
    assert r["global_batch_size"] == 4 and r["tokens_per_s_per_gpu"] > 0
    # model TFLOP/s are tokens/s x the budget module's FLOPs per token
    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.training.budget import flops_per_token

    fpt = flops_per_token(ModelConfig.load("tiny-a"), 128)
    assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * fpt / 1e12)
    assert r["mfu"] is None and r["peak_rss_gib"] > 0  # no peak on CPU
    assert r["markdown_row"].startswith("| tiny-a | 128 | 1/1/1 | 2x2 | float32 |")
    # fp32 on CPU: no fused kernel applies; TP1 leaves CUDA_DEVICE_MAX_CONNECTIONS alone
    assert r["fusions"] == dict.fromkeys(("gradient_accumulation_fusion", "apply_rope_fusion",
                                          "cross_entropy_loss_fusion", "bias_activation_fusion",
                                          "bias_dropout_fusion", "masked_softmax_fusion",
                                          "persist_layer_norm"), False)


def test_checkpoint_save_benchmark_on_tiny(tmp_path):
    """Both kinds' bytes/parameter and the async stall (timings are not asserted: noisy)."""
    out = tmp_path / "ckpt.json"
    cmd = [sys.executable, str(REPO / "benchmarks/checkpoint_save.py"), "--model", "tiny-a",
           "--stall", "--compute-s", "0.05", "--work", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # fp32 weights (4 B) plus the index and per-tensor overhead of a 250k-parameter model
    assert 4.0 < r["evaluation_bytes_per_param"] < 4.5
    # + fp32 main params, two Adam moments (distributed optimizer) and the RNG state
    assert 16.0 < r["resume_bytes_per_param"] < 18.0
    assert r["async_stall_s"] > 0 and r["sync_save_s"] > 0 and not list(tmp_path.glob("ckpt-bench-*"))


def test_optimizer_format_benchmark_saves_both_formats(tmp_path):
    """benchmarks/optimizer_format.py at DP2 (torchrun, gloo): both formats written and timed;
    each holds the same state (fp32: weights 4 + main params and two Adam moments 12 bytes per
    parameter, so about 16 B/param either way)."""
    out = tmp_path / "fmt.json"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
           "--nproc_per_node", "2", str(REPO / "benchmarks/optimizer_format.py"), "--model",
           "tiny-a", "--rounds", "1", "--dir", str(tmp_path / "ckpt"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["parameters"] > 0
    for fmt in ("dp_reshardable", "fully_reshardable"):
        assert r["save_s"][fmt] > 0
        assert 15 < r["bytes_per_param"][fmt] < 19, r["bytes_per_param"]
    assert not (tmp_path / "ckpt").exists()  # cleaned up
