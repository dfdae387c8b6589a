"""`train`: --resume-from outside the run folder, a damaged .distcp, Ctrl-C (one process and
under torchrun).

Every row launches the real CLI in its own process (torchrun for the torchrun row) on the tiny
toy model, 10 iterations with a checkpoint every 5. One finished run is trained once per
session (:func:`_trained`) and copied where a row needs committed checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bad_inputs import Ctx, Outcome, Row
from tests.conftest import BIN, REPO

CONFIG = REPO / "configs" / "train" / "tiny-cpu.yaml"
SHORT = ["budget.iterations=10", "checkpoint.every_tokens=2560"]  # checkpoints at 5 and 10


def _argv(ctx: Ctx, run_dir: Path, *extra: str) -> list[str]:
    from megatron_cpt.training.toy import toy_overrides

    return ["train", "--config", str(CONFIG), *toy_overrides(ctx.fixture("toy"), run_dir),
            *SHORT, *extra]


def _cmd(argv: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_cpt", *argv]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m",
            "megatron_cpt", *argv]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _launch(argv: list[str], ctx: Ctx | None = None, nproc: int = 1) -> Outcome:
    """The CLI in a process of its own (files, not pipes: a writer helper may hold a pipe)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(_cmd(argv, nproc), env=_env(), cwd=REPO, stdout=out, stderr=err,
                              timeout=600).returncode
        out.seek(0)
        err.seek(0)
        return Outcome(code=code, err=err.read(), out=out.read())


_TRAINED: dict[str, Path] = {}


def _trained(ctx: Ctx) -> Path:
    """A finished 10-iteration run (iter_0000005, iter_0000010), trained once per session."""
    if "run" not in _TRAINED:
        run_dir = ctx.fixture("tmp_path_factory").getbasetemp() / "rows-train-finished"
        done = _launch(_argv(ctx, run_dir))
        assert done.code == 0, done.err[-3000:]
        _TRAINED["run"] = run_dir
    return _TRAINED["run"]


def _copy_of_trained(ctx: Ctx, name: str) -> Path:
    run_dir = ctx.tmp / name
    shutil.copytree(_trained(ctx), run_dir)
    return run_dir


def _errors(out: Outcome) -> list[str]:
    return [line for line in out.err.splitlines() if "error:" in line]


def _one_error_no_traceback(ctx: Ctx, out: Outcome) -> None:
    """Training prints startup lines on stderr, so the one line is the only ``error:`` one."""
    assert len(_errors(out)) == 1 and "Traceback" not in out.err, out.err[-3000:]


# -- 1. --resume-from names another run's checkpoint ------------------------------------------
def _two_runs(ctx: Ctx) -> tuple[Path, Path]:
    return _copy_of_trained(ctx, "this_run"), _copy_of_trained(ctx, "other_run")


def _resume_from_relative(ctx: Ctx) -> list[str]:
    this, _ = _two_runs(ctx)
    return _argv(ctx, this, "--resume-from", "../../other_run/checkpoints/iter_0000005")


def _resume_from_absolute(ctx: Ctx) -> list[str]:
    this, other = _two_runs(ctx)
    return _argv(ctx, this, "--resume-from", str(other / "checkpoints" / "iter_0000005"))


def _both_runs_but_the_verdict(ctx: Ctx) -> list[Path]:
    """The other run entirely; this run all but exit_status.json, where a refusal records its
    verdict (docs/training.md: nothing changed but exit_status.json)."""
    this = ctx.tmp / "this_run"
    return [ctx.tmp / "other_run", *(p for p in this.iterdir() if p.name != "exit_status.json")]


def _refused_and_recorded(ctx: Ctx, out: Outcome) -> None:
    _one_error_no_traceback(ctx, out)
    this = ctx.tmp / "this_run"
    assert sorted(p.name for p in (this / "checkpoints").iterdir()) == \
        ["iter_0000005", "iter_0000010", "latest"]
    assert (this / "checkpoints" / "latest").read_text().strip() == "iter_0000010"
    status = json.loads((this / "exit_status.json").read_text())
    assert status["code"] == 2 and "model.pretrained" in status["message"], status


_NOT_THIS_RUN = ("is not in this run folder",
                 "--resume-from names a checkpoint of this run folder (iter_0000005, iter_0000010)",
                 "to start from another run's weights, make a new run with model.pretrained: ")


# -- 2. Ctrl-C ----------------------------------------------------------------------------------
def _fresh(ctx: Ctx) -> list[str]:
    return _argv(ctx, ctx.tmp / "run")


def _ctrl_c(argv: list[str], ctx: Ctx, nproc: int, after: int = 3) -> Outcome:
    """Launch in a session of its own, then SIGINT to its whole process group (what Ctrl-C in a
    terminal does) once ``after`` iterations are logged; iterations from ``after`` on take a
    second longer (test fault ``slow_steps``), so the launch is still running."""
    metrics = ctx.tmp / "run" / "metrics.jsonl"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(_cmd(argv, nproc), cwd=REPO, stdout=out, stderr=err,
                                env=_env(MEGATRON_CPT_TEST_FAULT=f"slow_steps@{after}"),
                                start_new_session=True)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (metrics.exists() and sum(
                '"train"' in line for line in metrics.read_text().splitlines()) >= after):
            time.sleep(0.1)
        assert proc.poll() is None, "the launch ended before the signal"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=300)
        out.seek(0)
        err.seek(0)
        outcome = Outcome(code=code, err=err.read(), out=out.read())
    if nproc > 1:  # torchrun's agent reports its own exit; launchers read exit_status.json
        outcome.out += f"\n[agent exit {code}]"
        outcome.code = json.loads((ctx.tmp / "run" / "exit_status.json").read_text())["code"]
    return outcome


def _stopped_then_resumed(nproc: int):
    def check(ctx: Ctx, out: Outcome) -> None:
        run_dir = ctx.tmp / "run"
        assert "KeyboardInterrupt" not in out.err, out.err[-4000:]
        if nproc == 1:
            assert "Traceback" not in out.err, out.err[-4000:]
        else:  # torchrun's agent prints its own SignalException traceback; no worker one
            assert out.err.count("Traceback") == 1 and "SignalException" in out.err, \
                out.err[-4000:]
        status = json.loads((run_dir / "exit_status.json").read_text())
        stopped = status["iteration"]
        assert status["code"] == 42 and status["reason"] == "requeue" and 3 <= stopped < 10, status
        ck = run_dir / "checkpoints"
        assert (ck / "latest").read_text().strip() == f"iter_{stopped:07d}"
        assert (ck / f"iter_{stopped:07d}" / "metadata.json").is_file()
        assert [line for line in out.err.splitlines() if line.startswith("stopping at")] == [
            f"stopping at iteration {stopped} (SIGINT, Ctrl-C); checkpoint iter_{stopped:07d} "
            "committed; exit 42 = requeue (relaunch the same command to resume)"]
        again = _launch(_fresh(ctx), nproc=nproc)  # the very same command
        assert again.code == 0, again.err[-3000:]
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        resumed = [e["iteration"] for e in events if e.get("event") == "resume"]
        assert resumed == [stopped], resumed
        assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0
        assert max(e["iteration"] for e in events if e["kind"] == "train") == 10
    return check


def _pretrained(ctx: Ctx) -> list[Path]:
    return [Path(ctx.fixture("toy")["pretrained"])]


# -- 3. a .distcp damaged in place ------------------------------------------------------------
def _damaged_distcp(ctx: Ctx) -> list[str]:
    run_dir = _copy_of_trained(ctx, "run")
    shard = sorted((run_dir / "checkpoints" / "iter_0000010" / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[1000:1200] = bytes(200)  # same size: only reading it finds the damage
    shard.write_bytes(bytes(data))
    return _argv(ctx, run_dir)


def _damage_recorded(ctx: Ctx, out: Outcome) -> None:
    _one_error_no_traceback(ctx, out)
    status = json.loads((ctx.tmp / "run" / "exit_status.json").read_text())
    assert status["code"] == 2 and status["message"] in _errors(out)[0], status


ROWS = [
    Row("train-resume-from-another-run-relative", _resume_from_relative, _NOT_THIS_RUN,
        unchanged=_both_runs_but_the_verdict, one_line=False, run=_launch,
        check=_refused_and_recorded),
    Row("train-resume-from-another-run-absolute", _resume_from_absolute, _NOT_THIS_RUN,
        unchanged=_both_runs_but_the_verdict, one_line=False, run=_launch,
        check=_refused_and_recorded),
    Row("train-ctrl-c-one-process", _fresh, ("stopping at iteration", "(SIGINT, Ctrl-C)"),
        code=42, unchanged=_pretrained, one_line=False,
        run=lambda argv, ctx: _ctrl_c(argv, ctx, nproc=1), check=_stopped_then_resumed(1)),
    Row("train-ctrl-c-torchrun", _fresh, ("stopping at iteration", "(SIGINT, Ctrl-C)"),
        code=42, unchanged=_pretrained, one_line=False,
        run=lambda argv, ctx: _ctrl_c(argv, ctx, nproc=2), check=_stopped_then_resumed(2)),
    Row("train-damaged-distcp", _damaged_distcp,
        ("iter_0000010/weights/__0_0.distcp cannot be read",
         "the newest complete checkpoint other than iter_0000010 is iter_0000005: relaunch with "
         "--resume-from iter_0000005"),
        unchanged=lambda ctx: [ctx.tmp / "run" / "checkpoints"], one_line=False, run=_launch,
        check=_damage_recorded),
]
