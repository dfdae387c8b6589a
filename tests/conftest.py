"""Shared fixtures: tiny Qwen2 models and tokenizers made locally (nothing from the hub)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def run_cli(*args: str, check: bool = True, nproc: int = 1, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``megatron-cpt ARGS`` as a user would (under torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", "megatron_cpt", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_cpt", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(script: Path, *args: str, nproc: int, timeout: int = 900) -> None:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_variants():
    """Architectures covering the conversion traps: tied/untied, kv heads 1 and 2,
    a vocabulary (1000 rows) that Megatron pads to 1024."""
    from megatron_cpt.models import ModelConfig

    base = ModelConfig.load("tiny-a")
    return {
        "tied_kv1": dataclasses.replace(base, name="tied_kv1", num_layers=2, num_query_groups=1,
                                        vocab_size=1000, tie_word_embeddings=True),
        "untied_kv2": dataclasses.replace(base, name="untied_kv2", num_layers=2, num_query_groups=2,
                                          vocab_size=1000, tie_word_embeddings=False),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    from megatron_cpt.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    from megatron_cpt.tiny import make_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_model(root / name, cfg, seed=i, tokenizer_dir=tiny_tokenizer)
            for i, (name, cfg) in enumerate(tiny_variants().items())}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_hf) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for name, hf in tiny_hf.items():
        run_cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Tokenizer, converted tiny-a checkpoint and tokenized train/valid prefixes."""
    from megatron_cpt.training.toy import make_toy

    return make_toy(tmp_path_factory.getbasetemp() / "toy")


SLURM_CLUSTER = REPO / "slurm" / "local" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the one-node cluster; fail, never skip, when it cannot start."""
    try:
        proc = subprocess.run(["bash", str(SLURM_CLUSTER), "start"], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("local SLURM cluster: `slurm/local/cluster.sh start` took over 15 minutes")
    if proc.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start: {proc.stderr.strip()[-1500:]}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    return conf


@pytest.fixture(scope="session")
def slurm_cluster_2n():
    """Start (or reuse) the two-node cluster (one network namespace and hostname per node,
    slurm/local/cluster.sh --nodes 2); fail, never skip, when it cannot start. Its SLURM_CONF
    is returned, not exported: the one-node cluster's tests keep theirs. A cluster this
    fixture started is stopped (namespaces, bridge and all) at the end of the session."""
    cmd = ["bash", str(SLURM_CLUSTER)]
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    was_up = subprocess.run(cmd + ["status", "--nodes", "2"], capture_output=True, env=env,
                            timeout=60).returncode == 0
    try:
        proc = subprocess.run(cmd + ["start", "--nodes", "2"], capture_output=True, text=True,
                              env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("two-node SLURM cluster: `cluster.sh start --nodes 2` took over 15 minutes")
    if proc.returncode != 0:
        pytest.fail(f"two-node SLURM cluster did not start: {proc.stderr.strip()[-1500:]}")
    yield proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    if not was_up:
        subprocess.run(cmd + ["stop", "--nodes", "2"], env=env, timeout=120)
