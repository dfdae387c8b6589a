"""Run integrity without a training run: the data hash stamp (a prefix is hashed once, a
changed file again) and the run-folder lease's refusal and take-over rules."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_cpt.errors import UsageError


def _read_bytes() -> int:
    """Bytes this process has read through read() so far (Linux /proc accounting)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")


@pytest.fixture()
def prefix(tmp_path, tiny_tokenizer):
    from data_prep.manifest import write_prefix
    from data_prep.text_tokenizer import TextTokenizer

    eod = TextTokenizer(str(tiny_tokenizer)).eod_id
    docs = [[(i * 7 + j) % 500 for j in range(1000)] + [eod] for i in range(1000)]  # ~2 MB
    write_prefix(tmp_path / "data", docs, tiny_tokenizer, eod, 512)
    return str(tmp_path / "data")


def test_hash_stamp_second_check_reads_no_bin_and_a_modified_bin_is_caught(prefix, tiny_tokenizer):
    from data_prep.manifest import STAMP_SUFFIX, verify_prefix

    size = os.path.getsize(prefix + ".bin")
    assert size > 1_000_000
    before = _read_bytes()
    verify_prefix(prefix, tokenizer=str(tiny_tokenizer))
    first = _read_bytes() - before
    assert os.path.isfile(prefix + STAMP_SUFFIX)
    before = _read_bytes()
    t0 = time.perf_counter()
    verify_prefix(prefix, tokenizer=str(tiny_tokenizer))
    second, seconds = _read_bytes() - before, time.perf_counter() - t0
    print(f"verify_prefix read {first:,} bytes (bin {size:,}) first, {second:,} with the stamp "
          f"({seconds * 1e3:.1f} ms)")
    assert first >= size and second < size // 20, (first, second)
    with open(prefix + ".bin", "r+b") as fh:  # same size, one byte changed
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(UsageError, match="does not match the sha256 in its manifest"):
        verify_prefix(prefix, tokenizer=str(tiny_tokenizer))
    stat = os.stat(prefix + ".bin")  # setting the mtime back does not hide it (ctime moves)
    os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))
    with pytest.raises(UsageError, match="does not match the sha256"):
        verify_prefix(prefix, tokenizer=str(tiny_tokenizer))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    from megatron_cpt.run_folder import RunFolder
    from megatron_cpt.training import lease

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = RunFolder(tmp_path / "run")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "job": "77", "pid": live.pid, "token": "x",
                  "started": time.time(), "heartbeat": time.time()}
        run.path.mkdir()
        run.lease_path.write_text(json.dumps(holder))
        with pytest.raises(UsageError, match=rf"run folder {run.path} is in use by host "
                                             rf"{socket.gethostname()} job 77 pid {live.pid}"):
            lease.acquire(run)
        with pytest.raises(UsageError, match="is in use by"):
            lease.check_free(run)
        assert json.loads(run.lease_path.read_text()) == holder  # untouched
    finally:
        live.kill()
        live.wait()
    # dead pid on this host; stale heartbeat on another host; same SLURM job restarted
    for dead, why in [({"host": socket.gethostname(), "pid": _dead_pid()}, "is gone"),
                      ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1e4},
                       "heartbeat"),
                      ({"host": "elsewhere", "pid": 1, "job": "91"}, "was restarted")]:
        monkeypatch.setenv("SLURM_JOB_ID", "91")
        run.lease_path.write_text(json.dumps({"token": "old", "heartbeat": time.time(), **dead}))
        lease.check_free(run)
        mine, took_over = lease.acquire(run)
        assert why in took_over and mine["pid"] == os.getpid(), took_over
        assert json.loads(run.lease_path.read_text())["token"] == mine["token"]
    # a live holder on another host with a fresh heartbeat is refused
    run.lease_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "5", "token": "o",
                                          "heartbeat": time.time()}))
    with pytest.raises(UsageError, match="in use by host elsewhere job 5"):
        lease.acquire(run)


def test_guard_stops_when_the_lease_names_another_launch(tmp_path):
    from megatron_cpt.run_folder import RunFolder
    from megatron_cpt.training import lease

    run = RunFolder(tmp_path / "run")
    mine, _ = lease.acquire(run)
    guard = lease.Guard(run, mine["token"], holder=True)
    assert guard.check() is None
    assert json.loads(run.lease_path.read_text())["heartbeat"] >= mine["heartbeat"]
    run.lease_path.write_text(json.dumps({**mine, "token": "theirs", "pid": 4242}))
    guard._lease_read = 0.0
    assert "another launch took the lease" in guard.check()
    guard.release()
    assert run.lease_path.exists()  # not ours: left alone


@pytest.mark.parametrize("env,hashes", [({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False),
                                        ({"SLURM_PROCID": "1"}, False)])
def test_only_global_rank_0_hashes_the_data(monkeypatch, env, hashes):
    from megatron_cpt.training import preflight

    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert preflight._hashing_rank() is hashes


def test_a_superseded_launch_never_commits(tmp_path):
    """Rank 0 reads the lease again at commit: when another launch took the run folder over
    (this one froze past the staleness), the uncommitted folder is dropped and the process
    exits 5 (never retried) before any rename; `latest` and the committed checkpoints stay the
    new holder's. The cross-node version (a frozen node that comes back) is in test_multinode."""
    from megatron_cpt.run_folder import RunFolder

    run = RunFolder(tmp_path / "run")
    ckpts = run.checkpoints
    (ckpts / ".iter_0000008.tmp").mkdir(parents=True)
    (ckpts / "latest").write_text("iter_0000006")
    run.lease_path.write_text(json.dumps({"host": "mcpt-n1", "job": "9", "pid": 1, "token": "new",
                                          "heartbeat": time.time()}))
    code = ("import sys; from pathlib import Path\n"
            "from megatron_cpt.training.checkpointing.commit import _stop_unless_leased\n"
            "from megatron_cpt.training.checkpointing.save import SaveOptions\n"
            "o = SaveOptions(run_dir=Path(sys.argv[1]), pretrained=Path('.'), keep_last=1,\n"
            "                keep_iterations=set(), lease_token=sys.argv[2])\n"
            "_stop_unless_leased(o, Path(sys.argv[1]) / 'checkpoints' / '.iter_0000008.tmp', 8)\n"
            "print('committed')\n")
    ours = subprocess.run([sys.executable, "-c", code, str(run.path), "new"], capture_output=True,
                          text=True)
    assert ours.returncode == 0 and "committed" in ours.stdout, ours.stderr  # still ours: goes on
    lost = subprocess.run([sys.executable, "-c", code, str(run.path), "old"], capture_output=True,
                          text=True)
    assert lost.returncode == 5, lost.stdout + lost.stderr
    assert "another launch took the lease" in lost.stdout and "checkpoint 8 not committed" in lost.stdout
    assert not (ckpts / ".iter_0000008.tmp").exists()
    assert (ckpts / "latest").read_text() == "iter_0000006"
