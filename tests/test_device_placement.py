"""Device placement on GPUs, checked on a CPU-only machine (issue 24, item 3).

NCCL takes CUDA tensors only ("No backend type associated with device type cpu"), and tensors
compared or indexed together must share a device; gloo-tested code sees neither. Two stand-ins
make both visible without a GPU:

- an *accelerator-only* process group: one rank, a backend registered for the ``meta`` device
  only (torch's fake process group underneath, so collectives move no data). It refuses a CPU
  tensor with NCCL's own error, and ``collective_device()`` answers ``meta`` for it as it
  answers ``cuda`` for NCCL. Meta tensors hold no data, so a correct code path gets past the
  collective and stops where it reads the result (:func:`_past_the_collective`);
- ``meta`` tensors standing in for the CUDA logits: an operation that mixes them with a CPU
  tensor fails as it does with CUDA ones.
"""
from __future__ import annotations

import ast
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_cpt.runtime import broadcast_values, collective_device, compute_device
from megatron_cpt.runtime.device import device_for_backend
from megatron_cpt.runtime.timing import CudaEventTimer, HostTimer, work_timer
from megatron_cpt.training.health import RankHealth

REPO = Path(__file__).resolve().parents[1]
STAND_IN = "accel_only_test"  # a backend that, like NCCL, takes accelerator tensors only
NCCL_REFUSAL = "No backend type associated with device type cpu"


def _benchmark(name: str):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def accelerator_only_group():
    """The default process group, one rank, on a backend that takes ``meta`` tensors only."""
    from torch.testing._internal.distributed.fake_pg import _create_fake_pg

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this process: a test left it")
    if STAND_IN not in dist.Backend.backend_capability:
        dist.Backend.register_backend(STAND_IN, _create_fake_pg, extended_api=True,
                                      devices=["meta"])
    dist.init_process_group(STAND_IN, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def gloo_group():
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this process: a test left it")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _past_the_collective(fn) -> None:
    """``fn`` handed its tensors to the stand-in group's collective (no NCCL refusal) and
    stopped where it read the data-less meta result."""
    with pytest.raises((RuntimeError, NotImplementedError)) as err:
        fn()
    assert NCCL_REFUSAL not in str(err.value), "a CPU tensor was handed to an NCCL-like collective"
    assert "meta" in str(err.value), err.value


# --- the one place that decides ------------------------------------------------------------

def test_collective_device_follows_the_backend():
    assert device_for_backend("nccl") == torch.device("cuda")
    assert device_for_backend("NCCL") == torch.device("cuda")
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")  # CPU tensors taken
    assert device_for_backend("cuda:nccl") == torch.device("cuda")
    with pytest.raises(ValueError, match="no device types"):
        device_for_backend("smoke-signals")


def test_stand_in_group_refuses_cpu_tensors_as_nccl_does(accelerator_only_group):
    assert collective_device() == torch.device("meta")
    with pytest.raises(RuntimeError, match=NCCL_REFUSAL):
        dist.all_reduce(torch.zeros(1))
    dist.all_reduce(torch.zeros(1, device="meta"))


def test_value_helpers_reduce_and_broadcast_on_gloo(gloo_group):
    from megatron_cpt.runtime import all_reduce_values

    assert collective_device() == torch.device("cpu")
    assert all_reduce_values([1.5, 2.0], op=dist.ReduceOp.MAX) == [1.5, 2.0]
    assert all_reduce_values([7], dtype=torch.int64) == [7]
    assert broadcast_values([3.0, 4.0], src=0) == [3.0, 4.0]
    assert compute_device() == torch.device("cpu")  # no CUDA here: the trainer's CPU


# --- item 1: benchmarks' collectives ---------------------------------------------------------

def test_throughput_reduces_the_step_time_on_the_collective_device(accelerator_only_group):
    throughput = _benchmark("throughput")
    _past_the_collective(
        lambda: throughput._median_step_seconds(lambda: None, 0, 1, torch.device("cpu")))


def test_optimizer_format_counts_parameters_on_the_collective_device(accelerator_only_group):
    _past_the_collective(lambda: _benchmark("optimizer_format").torch_all_reduce_sum(7))


# --- item 2: convert verify --------------------------------------------------------------------

def test_verify_compares_on_the_megatron_logits_device():
    from megatron_cpt.checkpoint import verify

    logits, ref = torch.empty(2, 5, 11, device="meta"), torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    gap, rel = verify.logit_gaps(logits, ref)
    assert gap.device.type == rel.device.type == "meta"
    assert verify.next_token_nll(logits, tokens).device.type == "meta"
    # and the figures themselves, where there is data
    cpu = ref + 0.5
    gap, rel = verify.logit_gaps(cpu, ref)
    assert gap.item() == pytest.approx(0.5) and rel.item() == pytest.approx(0.5 / ref.abs().max())
    expected = F.cross_entropy(ref[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert verify.next_token_loss(ref, tokens) == pytest.approx(expected.item())


def test_verify_agrees_on_ok_through_the_collective_device(accelerator_only_group):
    from megatron_cpt.checkpoint import verify

    _past_the_collective(lambda: verify.agree_ok(True))


# --- item 3: the native eval backend ---------------------------------------------------------

def test_native_backend_gathers_with_targets_on_the_logprobs_device():
    from eval.native import span_scores

    spans = [(1, [3, 4]), (0, [2])]
    ll, greedy = span_scores(torch.empty(2, 4, 6, device="meta"), spans)
    assert ll.device.type == greedy.device.type == "meta" and ll.shape == (2,)
    logprobs = F.log_softmax(torch.randn(2, 4, 6), dim=-1)
    ll, greedy = span_scores(logprobs, spans)
    assert ll.tolist() == pytest.approx([(logprobs[0, 1, 3] + logprobs[0, 2, 4]).item(),
                                         logprobs[1, 0, 2].item()])
    assert greedy.tolist() == [bool(logprobs[0, 1].argmax() == 3 and logprobs[0, 2].argmax() == 4),
                               bool(logprobs[1, 0].argmax() == 2)]


# --- item 4: eval run's validation loss --------------------------------------------------------

def test_validation_loss_targets_follow_the_logits():
    from eval.run import window_nll

    windows = torch.randint(0, 9, (2, 6))
    assert window_nll(torch.empty(2, 5, 9, device="meta"), windows).device.type == "meta"
    logits = torch.randn(2, 5, 9)
    total, count = window_nll(logits, windows).tolist()
    expected = F.cross_entropy(logits.reshape(-1, 9), windows[:, 1:].reshape(-1), reduction="sum")
    assert total == pytest.approx(expected.item()) and count == 10


def test_validation_loss_broadcast_uses_the_collective_device(accelerator_only_group):
    _past_the_collective(lambda: broadcast_values([1.0, 2.0], src=0))


# --- item 6: straggler timing ----------------------------------------------------------------

def test_work_is_timed_with_cuda_events_on_cuda_and_the_host_clock_on_cpu():
    assert isinstance(work_timer(torch.device("cuda", 0)), CudaEventTimer)
    assert isinstance(work_timer(torch.device("cpu")), HostTimer)
    assert isinstance(RankHealth(2.0, 3, torch.device("cuda")).timer, CudaEventTimer)
    health = RankHealth(2.0, 3, torch.device("cpu"))
    assert health.work_s is None
    health.start_step()
    time.sleep(0.02)
    health.work_done()
    assert 0.02 <= health.work_s < 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cuda_health_reaches_for_a_cuda_event_not_the_host_clock():
    """On a CPU-only torch, starting a CUDA rank's step must try to record a CUDA event (and
    fail here); timing it with the host clock would measure kernel launches on a GPU."""
    with pytest.raises((RuntimeError, AssertionError)):
        RankHealth(2.0, 3, torch.device("cuda")).start_step()


def test_health_table_is_on_the_collective_device(accelerator_only_group):
    health = RankHealth(2.0, 3, torch.device("cpu"))
    _past_the_collective(lambda: health.gather(0.1))


# --- every collective and every model build, by inspection ----------------------------------

TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                      "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
                      "all_to_all", "send", "recv"}
# files nobody may edit in this change, whose collectives use the trainer's compute device
# (which init_distributed makes the collective device: NCCL exactly when it is CUDA)
COMPUTE_DEVICE_OK = {"megatron_cpt/training/loop.py", "megatron_cpt/training/nonfinite.py"}


def _sources() -> list[Path]:
    return sorted(p for d in ("megatron_cpt", "eval", "data_prep", "benchmarks")
                  for p in (REPO / d).rglob("*.py"))


def _collective_calls(tree: ast.AST):
    """(function, call) for every ``dist.X(...)`` / ``torch.distributed.X(...)`` tensor call."""
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for call in ast.walk(fn):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr in TENSOR_COLLECTIVES
                    and ast.unparse(call.func.value) in ("dist", "torch.distributed")):
                yield fn, call


def _placed_by(fn: ast.AST, name: str) -> str | None:
    """The ``device=`` argument of the call that assigned ``name`` in ``fn``."""
    for node in ast.walk(fn):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)):
            for kw in node.value.keywords:
                if kw.arg == "device":
                    return ast.unparse(kw.value)
    return None


def test_every_tensor_handed_to_a_collective_is_placed_by_collective_device():
    bad = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for fn, call in _collective_calls(ast.parse(path.read_text())):
            arg = call.args[0] if call.args else None
            device = _placed_by(fn, arg.id) if isinstance(arg, ast.Name) else None
            ok = device is not None and (device.startswith("collective_device(")
                                         or rel in COMPUTE_DEVICE_OK)
            if not ok:
                bad.append(f"{rel}:{call.lineno} {ast.unparse(call)} (device={device})")
    assert not bad, "tensors for collectives must come from collective_device():\n" + \
        "\n".join(bad)


def test_no_model_is_built_for_a_hard_coded_cpu():
    """build_gpt_model moves the model to CUDA wherever CUDA exists, so a caller that says
    the CPU gets the CPU's layer spec (no Transformer Engine) on a GPU: say compute_device()."""
    builders = {"build_training_state", "_build", "build_gpt_model"}
    bad = []
    for path in _sources():
        for call in ast.walk(ast.parse(path.read_text())):
            if (isinstance(call, ast.Call) and ast.unparse(call.func).split(".")[-1] in builders
                    and any("torch.device('cpu')" in ast.unparse(a) for a in call.args)):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not bad, bad
