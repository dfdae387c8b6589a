"""The CPU backend: each redirect works, undoes cleanly, and is never active with CUDA."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.fixture()
def backend():
    if torch.cuda.is_available():
        pytest.skip("the CPU backend is only for machines without CUDA")
    from megatron_cpt.runtime import cpu_backend

    cpu_backend.activate()
    yield cpu_backend
    cpu_backend.deactivate()


def test_current_device_is_cpu(backend):
    assert torch.cuda.current_device() == "cpu"
    assert torch.arange(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_cuda_calls_are_noops(backend):
    t = torch.ones(2)
    assert t.cuda() is t
    torch.cuda.synchronize()


def test_explicit_cuda_factories_land_on_cpu(backend):
    assert torch.tensor([1.0], dtype=torch.float, device="cuda").device.type == "cpu"
    assert torch.zeros(1, dtype=torch.int, device="cuda").device.type == "cpu"
    assert torch.ones(2, 2).to("cuda").device.type == "cpu"
    # what transformer/utils.py builds for causal masks
    from megatron.core.transformer.utils import get_default_causal_mask

    assert get_default_causal_mask(4).device.type == "cpu"


def test_type_reports_cuda_names(backend):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversion still works


def test_rng_tracker_is_backed_by_the_cpu_generator(backend):
    from megatron.core import parallel_state, tensor_parallel

    # model_parallel_cuda_manual_seed needs model-parallel ranks; fake a 1-process world
    orig = (parallel_state.get_tensor_model_parallel_rank,
            parallel_state.get_expert_model_parallel_rank,
            parallel_state.get_expert_tensor_parallel_rank)
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("get_tensor_model_parallel_rank", "get_expert_model_parallel_rank",
                 "get_expert_tensor_parallel_rank"):
        setattr(mrandom, name, lambda: 0)
    try:
        def draw():
            tensor_parallel.model_parallel_cuda_manual_seed(123)
            tracker = tensor_parallel.get_cuda_rng_tracker()
            before = torch.rand(1)
            with tracker.fork():
                forked = torch.rand(3)
            after = torch.rand(1)
            return before, forked, after

        a, b = draw(), draw()
        for x, y in zip(a, b):
            assert torch.equal(x, y)  # reproducible from the seed
        assert not torch.equal(a[0], a[2])
    finally:
        (mrandom.get_tensor_model_parallel_rank, mrandom.get_expert_model_parallel_rank,
         mrandom.get_expert_tensor_parallel_rank) = orig


def test_deactivate_restores_everything():
    if torch.cuda.is_available():
        pytest.skip("the CPU backend is only for machines without CUDA")
    from megatron_cpt.runtime import cpu_backend

    before = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
    cpu_backend.activate()
    assert cpu_backend.is_active()
    cpu_backend.deactivate()
    assert not cpu_backend.is_active()
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type) == before
    assert torch.ones(1).type() == "torch.FloatTensor"


GPU_MOCK = r"""
import sys
from unittest import mock
import torch
torch.cuda.is_available = lambda: True
torch.cuda.set_device = mock.MagicMock()
original = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
from megatron_cpt.runtime import setup_device
device = setup_device()
assert device.type == "cuda", device
assert "megatron_cpt.runtime.cpu_backend" not in sys.modules, "cpu backend imported on GPU"
assert (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type) == original
torch.cuda.set_device.assert_called_once_with(0)
print("GPU-OK")
"""


def test_cpu_backend_is_never_imported_when_cuda_is_available():
    proc = subprocess.run([sys.executable, "-c", GPU_MOCK], capture_output=True, text=True)
    assert proc.returncode == 0 and "GPU-OK" in proc.stdout, proc.stderr[-3000:]


def test_activate_refuses_with_cuda(monkeypatch):
    from megatron_cpt.runtime import cpu_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError):
        cpu_backend.activate()
    assert not cpu_backend.is_active()


def test_dist_env_from_slurm(monkeypatch):
    from megatron_cpt.runtime.distributed import read_dist_env

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "node001")
    assert env.master_port == 20000 + 4242
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert read_dist_env().rank == 3  # torchrun wins over srun
