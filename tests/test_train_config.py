"""Trainer configuration, budget, plan and every pre-flight validation error (in process:
each error must exit 2 with one line before any distributed init or tensor)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_cpt.cli import main
from megatron_cpt.errors import UsageError
from megatron_cpt.models.qwen2 import ModelConfig
from megatron_cpt.training import budget
from megatron_cpt.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"
EXAMPLE_7B = ROOT / "configs" / "train" / "qwen2.5-7b-tp2-fp8.yaml"


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    from megatron_cpt.training.toy import make_toy

    return make_toy(tmp_path_factory.getbasetemp() / "toy")


def _train(toy, tmp_path, *extra, world=1, monkeypatch=None, capsys=None, force=False):
    from megatron_cpt.training.toy import toy_overrides

    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = ["train", "--check", "--config", str(CONFIG), *toy_overrides(toy, tmp_path / "run"),
            *extra] + (["--force"] if force else [])
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_config_overrides_types_and_unknown_keys(tmp_path):
    cfg = TrainConfig.load(CONFIG, ["optimizer.lr=1e-4", "parallel.tp=2", "budget.iterations=7"])
    assert cfg.optimizer.lr == 1e-4 and cfg.parallel.tp == 2 and cfg.budget.iterations == 7
    assert Path(cfg.run_dir).is_absolute()
    with pytest.raises(UsageError, match="unknown key"):
        TrainConfig.load(CONFIG, ["optimizer.lrr=1"])
    with pytest.raises(UsageError, match="must be int"):
        TrainConfig.load(CONFIG, ["parallel.tp=two"])
    with pytest.raises(UsageError, match="exactly one of budget"):
        TrainConfig.load(CONFIG, ["budget.tokens=1e6"])
    a = TrainConfig.load(CONFIG, ["logging.interval=5", "checkpoint.keep_last=9"])
    b = TrainConfig.load(CONFIG, [])
    assert a.result_hash() == b.result_hash()  # logging / retention do not change results
    assert TrainConfig.load(CONFIG, ["optimizer.lr=1e-4"]).result_hash() != b.result_hash()
    # the non-finite policy acts only on a failed step: not part of the hash; bad values refused
    assert TrainConfig.load(CONFIG, ["train.on_nonfinite=skip"]).result_hash() == b.result_hash()
    with pytest.raises(UsageError, match="train.on_nonfinite 'retry' unknown; choose stop or skip"):
        TrainConfig.load(CONFIG, ["train.on_nonfinite=retry"])
    # the optimizer format is a checkpoint setting (not hashed); TP/PP are, but a run folder
    # accepts a config that differs only in them (preflight compares cfg.with_layout(old))
    fmt = TrainConfig.load(CONFIG, ["checkpoint.optimizer_format=fully_reshardable"])
    assert fmt.result_hash() == b.result_hash()
    with pytest.raises(UsageError, match="checkpoint.optimizer_format 'full' unknown; choose "
                                         "dp_reshardable or fully_reshardable"):
        TrainConfig.load(CONFIG, ["checkpoint.optimizer_format=full"])
    tp2 = TrainConfig.load(CONFIG, ["parallel.tp=2", "parallel.pp=2"])
    assert tp2.result_hash() != b.result_hash()
    assert tp2.with_layout({"tp": 1, "pp": 1, "sequence_parallel": False}).result_hash() == \
        b.result_hash() and tp2.parallel.tp == 2
    lr = TrainConfig.load(CONFIG, ["parallel.tp=2", "optimizer.lr=1e-4"])
    assert lr.with_layout({"tp": 1}).result_hash() != b.result_hash()


def test_flops_per_token_formula():
    from megatron_cpt.models.qwen2 import CONFIG_DIR

    m = ModelConfig.load(CONFIG_DIR / "qwen2.5-7b.yaml")
    s = 4096
    fpt = budget.flops_per_token(m, s)
    L, h, H, G, f, V = 28, 3584, 28, 4, 18944, 152064
    expected = 12 * L * h * h * (1 + G / H + s / h + 1.5 * f / h) + 6 * h * V
    assert fpt == pytest.approx(expected)
    n_nonemb = m.num_parameters(include_embeddings=False)
    attention = 12 * L * h * s
    # 6N (non-embedding weights, biases/norms ignored) + attention + logits
    assert fpt == pytest.approx(6 * n_nonemb + attention + 6 * h * V, rel=1e-3)
    b = budget.compute_budget(m, s, 512, tokens=2e9, checkpoint_every_tokens=2.5e8)
    assert b.iterations == int(2e9 // (512 * s)) and b.checkpoint_iterations[-1] == b.iterations
    b2 = budget.compute_budget(m, s, 512, flops=b.flops)
    assert b2.iterations == b.iterations


def test_plan_run_and_study(capsys):
    assert main(["plan", "--config", str(EXAMPLE_7B), "--model", "qwen2.5-7b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["iterations"] > 0 and rows[0]["gpu_hours"] > 0
    study = str(ROOT / "configs" / "study.yaml")
    assert main(["plan", "--study", study, "--sizes", "7b", "--domains", "medical"]) == 0
    planned = capsys.readouterr().out
    assert "7b/medical" in planned and "total:" in planned
    # one planner: `launch grid --dry-run` prints the very same table
    assert main(["launch", "grid", "--study", study, "--sizes", "7b", "--domains", "medical",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out == planned
    assert main(["plan", "--study", study, "--sizes", "7b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["cell"] for r in rows} >= {"general", "medical"}
    assert all(r["gpu_hours"] > 0 for r in rows)


def test_check_passes_on_valid_config(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    from megatron_cpt.training.toy import toy_overrides

    assert main(["train", "--check", "--config", str(CONFIG),
                 *toy_overrides(toy, tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ok: fresh start from model.pretrained" in out and "30 iterations" in out


def _bad_prefix(toy, tmp_path, name, mutate):
    src = toy["prefixes"]["legal_train"]
    dst = tmp_path / name
    for ext in (".bin", ".idx", ".manifest.json"):
        shutil.copy(src + ext, str(dst) + ext)
    man = json.loads(Path(str(dst) + ".manifest.json").read_text())
    mutate(dst, man)
    Path(str(dst) + ".manifest.json").write_text(json.dumps(man))
    return str(dst)


def _tamper_bin(dst, man):
    with open(str(dst) + ".bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x07\x07")


CASES = {
    "world": (dict(world=3, extra=["parallel.tp=2"]), "does not divide the world size 3"),
    "heads": (dict(world=3, extra=["parallel.tp=3"]), "attention heads"),
    "kv_heads": (dict(world=4, extra=["parallel.tp=4"]), "kv heads"),
    "layers": (dict(world=3, extra=["parallel.pp=3"]), "layers"),
    "batch": (dict(extra=["batch.micro_batch_size=3"]), "global_batch_size 8 != micro_batch_size 3"),
    "budget": (dict(extra=["budget.iterations=null", "budget.tokens=100"]), "buys 0 iterations"),
    "fp8": (dict(extra=["precision.fp8=hybrid", "precision.dtype=bfloat16"]), "Transformer Engine"),
    "hang_above_collective": (dict(extra=["train.hang_timeout_min=20"]),
                              "train.hang_timeout_min (20) must be below train.collective_timeout_min"),
    "collective_timeout": (dict(extra=["train.collective_timeout_min=0"]),
                           "train.collective_timeout_min must be > 0"),
    "straggler_factor": (dict(extra=["logging.straggler_factor=1"]),
                         "logging.straggler_factor must be > 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_error_exit_2(case, toy, tmp_path, monkeypatch, capsys):
    kw, message = CASES[case]
    rc, err = _train(toy, tmp_path, *kw.get("extra", []), world=kw.get("world", 1),
                     monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_data_prefix_errors_exit_2(toy, tmp_path, monkeypatch, capsys):
    def run(prefix, where="train"):
        key = "data.train" if where == "train" else "data.valid"
        return _train(toy, tmp_path, f"{key}=[{{prefix: {prefix}, name: x}}]",
                      monkeypatch=monkeypatch, capsys=capsys)

    rc, err = run(tmp_path / "missing")
    assert rc == 2 and "missing.manifest.json is missing" in err
    rc, err = run(_bad_prefix(toy, tmp_path, "tampered", _tamper_bin))
    assert rc == 2 and "does not match the sha256 in its manifest" in err
    rc, err = run(_bad_prefix(toy, tmp_path, "short", lambda d, m: m.update(bin_bytes=1)))
    assert rc == 2 and "bytes but its manifest says 1" in err
    other = _bad_prefix(toy, tmp_path, "othertok",
                        lambda d, m: m["tokenizer"].update(sha256="0" * 64))
    rc, err = run(other)
    assert rc == 2 and "(sha256 000000000000" in err
    # a validation prefix too small for one sequence: the validation split would be empty
    from data_prep.manifest import write_prefix

    tiny = tmp_path / "tiny_valid"
    write_prefix(tiny, [[5, 6, 7, toy["eod"]]], toy["tokenizer"], toy["eod"], 1024)
    rc, err = run(tiny, where="valid")
    assert rc == 2 and "validation split would be empty" in err


def test_run_dir_of_another_config_exit_2_unless_force(toy, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config_hash": "feedfacefeedface"}))
    rc, err = _train(toy, tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and "created by a different config" in err
    rc, _ = _train(toy, tmp_path, monkeypatch=monkeypatch, capsys=capsys, force=True)
    assert rc == 0


def test_stop_flag_signals_and_walltime(monkeypatch):
    import os
    import signal
    import time

    from megatron_cpt.training import signals

    assert signals.parse_slurm_duration("1-02:03:04") == 86400 + 7384
    assert signals.parse_slurm_duration("05:06") == 306
    assert signals.parse_slurm_duration("UNLIMITED") is None
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    flag = signals.StopFlag(exit_before_walltime_min=10).install()
    try:
        assert flag.deadline is None and flag.local_code() == 0.0
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.received == signal.SIGUSR1 and flag.local_code() == 1.0
    finally:
        flag.uninstall()
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 300))  # 5 min left
    assert signals.StopFlag(exit_before_walltime_min=10).local_code() == 1.0
    assert signals.StopFlag(exit_before_walltime_min=1).local_code() == 0.0


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize("style", ["cosine", "linear", "WSD", "constant"])
def test_schedule_shapes(style):
    from megatron_cpt.training.loop import make_scheduler

    cfg = TrainConfig.load(CONFIG, [f"schedule.decay_style={style}", "schedule.warmup_fraction=0.1",
                                    "schedule.wsd_decay_fraction=0.2", "optimizer.lr=1.0",
                                    "optimizer.min_lr=0.1"])
    opt = _FakeOptimizer()
    sched = make_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])  # the rate step i uses
        sched.step(increment=1)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)  # linear warmup over 10 steps
    if style == "constant":
        assert lrs[99] == pytest.approx(1.0)
    elif style == "WSD":
        assert lrs[79] == pytest.approx(1.0) and lrs[99] < 0.2  # stable, then the last 20 decay
    else:
        assert lrs[99] < 0.12 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _resume_ckpt(folder) -> None:
    import json

    for sub in ("weights", "optimizer", "trainer"):
        (folder / sub).mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"format": "megatron-cpt/1", "kind": "resume"}))


def test_retention_keeps_last_k_and_evaluation_grid(tmp_path):
    """The last k stay resume checkpoints; older ones on the grid keep their weights only."""
    import json

    from megatron_cpt.training.checkpointing import _retain, iter_name

    for it in (10, 20, 30, 40, 50, 60):
        _resume_ckpt(tmp_path / iter_name(it))
    _retain(tmp_path, 60, keep_last=2, keep_iterations={20, 40})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        iter_name(i) for i in (20, 40, 50, 60)]
    kind = lambda it: json.loads((tmp_path / iter_name(it) / "metadata.json").read_text())["kind"]  # noqa: E731
    assert [kind(i) for i in (20, 40, 50, 60)] == ["evaluation"] * 2 + ["resume"] * 2
    assert sorted(p.name for p in (tmp_path / iter_name(40)).iterdir()) == ["metadata.json", "weights"]
    assert (tmp_path / iter_name(60) / "optimizer").is_dir()
    # after --resume-from 20 the folders after the one just saved (30) neither count as kept
    # nor push out a good one
    _resume_ckpt(tmp_path / iter_name(30))
    _retain(tmp_path, 30, keep_last=2, keep_iterations=set())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        iter_name(i) for i in (20, 30, 40, 50, 60)]


def test_fault_hooks_read_only_their_own_point(monkeypatch):
    from megatron_cpt.training import fault_hooks

    monkeypatch.delenv(fault_hooks.FAULT_ENV, raising=False)
    assert fault_hooks.planned("nan_loss") is None
    monkeypatch.setenv(fault_hooks.FAULT_ENV, "nan_loss@7")
    assert fault_hooks.planned("nan_loss") == 7 and fault_hooks.planned("crash_in_save") is None
    fault_hooks.crash_if_planned("crash_in_save", 7)  # another point: returns
    monkeypatch.setenv(fault_hooks.FAULT_ENV, "nan_loss@x")
    assert fault_hooks.planned("nan_loss") is None
    monkeypatch.setenv(fault_hooks.FAULT_ENV, "slow_save@20,slow_steps@21")  # several at once
    assert fault_hooks.planned("slow_save") == 20 and fault_hooks.planned("slow_steps") == 21


def test_spike_watch_flags_a_loss_far_above_the_recent_mean():
    from megatron_cpt.training.nonfinite import SpikeWatch

    assert SpikeWatch(None).spike(1e9) is None  # off by default
    watch = SpikeWatch(3.0, window=50)
    assert [watch.spike(2.0) for _ in range(10)] == [None] * 10
    assert watch.spike(5.9) is None          # below 3 x 2.0
    mean = watch.spike(100.0)
    assert mean == pytest.approx((20 + 5.9) / 11)
    assert watch.spike(2.0) is None and len(watch.recent) == 12  # the spike stayed out
    with pytest.raises(UsageError, match="train.spike_factor must be > 1, got 0.5"):
        TrainConfig.load(CONFIG, ["train.spike_factor=0.5"])
