"""Throughput defaults (issue 18): CUDA_DEVICE_MAX_CONNECTIONS, fused kernels, manual GC and
the startup record. Launched children are real torchrun ranks on CPU (gloo)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cpt.errors import UsageError
from megatron_cpt.models import fusions
from megatron_cpt.runtime import cuda_connections as cc
from megatron_cpt.training import startup_record
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.gc_policy import GCPolicy
from test_train import CONFIG, _args, _ok, launch, losses

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"
BIN = Path(sys.executable).parent
STEPS = ["budget.iterations=4", "data.valid=[]"]


def _cfg(toy, run_dir, *extra):
    from megatron_cpt.training.toy import toy_overrides

    return TrainConfig.load(CONFIG, [*toy_overrides(toy, run_dir), *STEPS, *extra])


# -- CUDA_DEVICE_MAX_CONNECTIONS ---------------------------------------------------------------

def test_connections_rule_sets_only_for_tp_and_keeps_an_exported_value():
    env = {}
    assert cc.apply(1, False, env).source == "unset" and cc.ENV not in env
    s = cc.apply(2, True, env)
    assert (s.value, s.source, env[cc.ENV]) == ("1", "megatron-cpt", "1")
    assert "sequence parallelism" in s.why
    env = {cc.ENV: "32"}  # e.g. a Blackwell cluster's own choice: never overwritten
    s = cc.apply(4, False, env)
    assert (s.value, s.source, env[cc.ENV]) == ("32", "environment", "32")
    assert "wants 1" in s.why


def _observe_env(toy, tmp_path, nproc: int, extra: list[str]) -> list[str | None]:
    out = tmp_path / "observed"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != cc.ENV}
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           str(HELPERS / "observe_cuda_env.py"), str(out), "train",
           *_args(toy, tmp_path / "run", STEPS + extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(out.glob("rank*.json"))
    assert len(seen) == nproc, (seen, proc.stderr[-2000:])
    return [json.loads(p.read_text())["value"] for p in seen]


@pytest.mark.parametrize("nproc,extra,want", [
    (2, ["parallel.tp=2"], "1"),
    (2, [], None),  # DP2, TP1: nothing to order; the variable must stay unset
], ids=["tp2-set", "dp2-unset"])
def test_every_rank_sees_the_setting_before_cuda_would_initialise(toy, tmp_path, nproc, extra, want):
    assert _observe_env(toy, tmp_path, nproc, extra) == [want] * nproc


def test_sbatch_exports_it_for_tp_cells_only():
    slurm = ROOT / "slurm"
    line = 'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"'
    assert line in (slurm / "cpt_7b_legal.sh").read_text()      # TP2
    assert line in (slurm / "cpt_14b_general.sh").read_text()   # TP4
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in (slurm / "cpt_1.5b_legal.sh").read_text()  # TP1


# -- fusions ---------------------------------------------------------------------------------

GPU_TE = fusions.KernelProbe(cuda=True, te=True, te_why="transformer_engine.pytorch imports",
                             apex_wgrad=False, triton=True)
GPU_TE_APEX = fusions.KernelProbe(cuda=True, te=True, te_why="ok", apex_wgrad=True, triton=True)
# the first GPU run's machine: CUDA, Triton (ships with torch), no TE, no APEX, no compiled
# Megatron-LM kernels
GPU_NO_TE = fusions.KernelProbe(cuda=True, te=False, te_why="transformer_engine is not installed",
                                apex_wgrad=False, triton=True, megatron_softmax=False)
CPU = fusions.KernelProbe(cuda=False, te=False, te_why="no CUDA device", apex_wgrad=False)
NEVER_ON = {"persist_layer_norm": False, "memory_efficient_layer_norm": False}


def _fields(probe, dtype="bfloat16", backend="sdpa", **model):
    section = TrainConfig.from_dict({"model": model}).model
    return fusions.transformer_config_fields(fusions.resolve(section, dtype, probe, backend))


def test_transformer_config_fields_for_te_present_and_absent():
    jit = {"bias_activation_fusion": True, "bias_dropout_fusion": True}
    assert _fields(GPU_TE, backend="te") == {
        "gradient_accumulation_fusion": False, "apply_rope_fusion": True,
        "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "te",
        "masked_softmax_fusion": False, **jit, **NEVER_ON}
    assert _fields(GPU_TE_APEX, backend="te")["gradient_accumulation_fusion"] is True
    assert _fields(GPU_NO_TE) == {"gradient_accumulation_fusion": False, "apply_rope_fusion": False,
                                  "cross_entropy_loss_fusion": True,
                                  "cross_entropy_fusion_impl": "native",
                                  "masked_softmax_fusion": False, **jit, **NEVER_ON}
    off = {"bias_activation_fusion": False, "bias_dropout_fusion": False,
           "masked_softmax_fusion": False, **NEVER_ON}
    assert _fields(CPU, "float32") == {"gradient_accumulation_fusion": False,
                                       "apply_rope_fusion": False, "cross_entropy_loss_fusion": False,
                                       **off}
    # each can be switched off
    assert _fields(GPU_TE_APEX, backend="te", rope_fusion=False, gradient_accumulation_fusion=False,
                   cross_entropy_fusion="off", bias_activation_fusion=False,
                   bias_dropout_fusion=False) == {"gradient_accumulation_fusion": False,
                                                  "apply_rope_fusion": False,
                                                  "cross_entropy_loss_fusion": False, **off}
    why = fusions.resolve(TrainConfig().model, "bfloat16", GPU_TE)["gradient_accumulation_fusion"].why
    assert "fused_weight_gradient_mlp_cuda" in why


def test_gpu_only_flags_follow_the_spec_and_the_kernels_not_cuda():
    """What failed on the first GPU run: flags set from "CUDA is present"."""
    # Megatron's masked softmax: only its local attention uses it, and only with the compiled kernels
    assert _fields(GPU_NO_TE, backend="local")["masked_softmax_fusion"] is False
    with_kernels = fusions.KernelProbe(cuda=True, te=False, te_why="", apex_wgrad=False,
                                       triton=True, megatron_softmax=True)
    assert _fields(with_kernels, backend="local")["masked_softmax_fusion"] is True
    assert _fields(with_kernels, backend="sdpa")["masked_softmax_fusion"] is False
    # TE present but a non-TE attention backend: the local spec, so no persistent norm either
    assert _fields(GPU_TE, backend="sdpa")["persist_layer_norm"] is False
    assert _fields(GPU_TE, backend="sdpa")["apply_rope_fusion"] is True  # TE's RoPE needs only TE
    # torch.compile fusions need Triton on CUDA
    no_triton = fusions.KernelProbe(cuda=True, te=False, te_why="", apex_wgrad=False, triton=False)
    assert _fields(no_triton)["bias_activation_fusion"] is False
    why = fusions.resolve(fusions.AUTO, "bfloat16", GPU_NO_TE, "local")["masked_softmax_fusion"].why
    assert "scaled_masked_softmax_cuda" in why


def test_the_gpu_configuration_builds_on_cpu(tmp_path):
    """The model built with the exact TransformerConfig "CUDA without TE/APEX" gets: it must
    construct (persist_layer_norm=on_gpu asserted here on the GPU) with every parameter bf16."""
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(GPU_NO_TE.__dict__))
    proc = subprocess.run([sys.executable, str(HELPERS / "build_for_probe.py"), str(probe)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built["fields"] == _fields(GPU_NO_TE) and built["persist"] is False
    assert built["dtypes"] == ["torch.bfloat16"]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fields_reach_megatron_transformer_config():
    from megatron_cpt.models import BuildOptions, ModelConfig, transformer_config

    tc = transformer_config(ModelConfig.load("tiny-a"),
                            BuildOptions(extra=_fields(CPU, "float32", cross_entropy_fusion="native")))
    assert (tc.cross_entropy_loss_fusion, tc.cross_entropy_fusion_impl) == (True, "native")
    assert (tc.apply_rope_fusion, tc.gradient_accumulation_fusion) == (False, False)


@pytest.mark.parametrize("probe,model,msg", [
    (GPU_NO_TE, {"rope_fusion": True}, "model.rope_fusion=true but needs Transformer Engine"),
    (GPU_NO_TE, {"masked_softmax_fusion": True, "attention_backend": "local"},
     "model.masked_softmax_fusion=true but Megatron-LM's compiled scaled_masked_softmax_cuda"),
    (GPU_NO_TE, {"masked_softmax_fusion": True}, "attention_backend=sdpa does not use"),
    (CPU, {"bias_activation_fusion": True}, "model.bias_activation_fusion=true but CPU"),
    (GPU_TE, {"gradient_accumulation_fusion": True}, "fused_weight_gradient_mlp_cuda is missing"),
    (CPU, {"cross_entropy_fusion": "te"}, "model.cross_entropy_fusion=te needs Transformer Engine"),
])
def test_a_fusion_asked_for_but_missing_is_refused(probe, model, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(")):
        section = TrainConfig.from_dict({"model": model}).model
        fusions.resolve(section, "bfloat16", probe, section.attention_backend or "sdpa")


def test_refusal_is_one_line_exit_2_from_the_cli(toy, tmp_path):
    proc = launch(toy, 1, tmp_path / "run", STEPS + ["model.rope_fusion=true", "--check"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "model.rope_fusion=true" in err[0], proc.stderr


def test_native_cross_entropy_fusion_same_loss_and_grads_on_cpu():
    """Runs on CPU (torch.compile). megatron-core 0.16.1 returns the fused logits gradient in
    bf16 (fusions/fused_cross_entropy.py:82), so gradients agree to bf16 precision."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(HELPERS / "cross_entropy_fusion.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert torch.tensor(r["loss_fused"]) == pytest.approx(torch.tensor(r["loss_plain"]), abs=1e-5)
    fused, plain = torch.tensor(r["grad_fused"]), torch.tensor(r["grad_plain"])
    assert torch.equal(fused, fused.to(torch.bfloat16).float())  # bf16 values
    torch.testing.assert_close(fused, plain, rtol=2 ** -8, atol=1e-7)


# -- manual GC -------------------------------------------------------------------------------

def test_gc_policy_collects_only_at_its_points():
    starts = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            starts.append(1)

    was = gc.isenabled()
    gc.callbacks.append(count)
    try:
        p = GCPolicy(3)
        p.start()
        assert not gc.isenabled() and len(starts) == 1
        for it in (1, 2):
            p.step(it)
        assert len(starts) == 1
        p.step(3)
        p.at_sync_point()
        assert len(starts) == 3 == p.collections
        p.stop()
        assert gc.isenabled() == was
        auto = GCPolicy(None)
        auto.start()
        auto.step(100)
        assert gc.isenabled() == was and auto.collections == 0
    finally:
        gc.callbacks.remove(count)
        if was:
            gc.enable()


def test_manual_gc_keeps_losses_and_run_json_holds_the_startup_record(toy, tmp_path):
    auto, manual = tmp_path / "auto", tmp_path / "manual"
    _ok(launch(toy, 1, auto, STEPS + ["train.gc_interval=null"]))
    proc = launch(toy, 1, manual, STEPS + ["train.gc_interval=2"])
    _ok(proc)
    assert losses(manual) == losses(auto)  # bit-identical: GC never touches the numbers
    assert sorted(losses(manual)) == [1, 2, 3, 4]
    startup = json.loads((manual / "run.json").read_text())["startup"]
    assert startup["gc"] == {"mode": "manual", "interval": 2, "why": startup["gc"]["why"]}
    assert "startup: gc = manual" in proc.stderr  # printed once, by rank 0
    assert proc.stderr.count("startup: layer_spec") == 1


# -- the startup record ----------------------------------------------------------------------

def test_startup_record_for_the_tiny_cpu_config(toy, tmp_path):
    rec = startup_record.build(_cfg(toy, tmp_path / "run"), "float32", probe=CPU)
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["layer_spec"] == {"value": "local", "fallback": False,
                                 "why": "no CUDA device; local spec with torch SDPA"}
    assert rec["attention_backend"]["value"] == "sdpa"
    assert {k: v["on"] for k, v in rec["fusions"].items()} == {
        "gradient_accumulation_fusion": False, "rope_fusion": False, "cross_entropy_fusion": False,
        "bias_activation_fusion": False, "bias_dropout_fusion": False,
        "masked_softmax_fusion": False, "persist_layer_norm": False}
    assert rec["fp8"]["on"] is False and rec["sequence_parallel"]["on"] is False
    assert rec["distributed_optimizer"]["on"] is True
    assert rec["cuda_device_max_connections"]["source"] in ("unset", "environment")
    assert rec["gc"]["mode"] == "manual" and rec["gc"]["interval"] == 100
    assert rec["tensorboard"] == {"on": False, "why": "logging.tensorboard=false"}
    assert startup_record.warnings(rec) == []
    # a GPU without Transformer Engine is a visible fallback
    gpu = startup_record.build(_cfg(toy, tmp_path / "run", "precision.dtype=bfloat16"),
                               "bfloat16", probe=GPU_NO_TE)
    assert gpu["layer_spec"]["fallback"] is True
    assert any("Transformer Engine unavailable" in w for w in startup_record.warnings(gpu))


def test_train_check_prints_the_record_for_this_environment(toy, tmp_path):
    proc = launch(toy, 1, tmp_path / "run", STEPS + ["logging.tensorboard=true", "--check"])
    _ok(proc)
    cfg = _cfg(toy, tmp_path / "run", "logging.tensorboard=true")
    want = startup_record.format_record(startup_record.build(cfg, "float32"))
    assert want in proc.stdout
    assert "startup: tensorboard = " in proc.stdout and not (tmp_path / "run").exists()
