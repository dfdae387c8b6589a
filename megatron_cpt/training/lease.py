"""One writer per run folder: ``RUN/lease.json`` (host, SLURM job, pid, heartbeat, token).

Rank 0 takes the lease before anything is written to the run folder and every rank learns
the outcome (one broadcast). A second launch while the holder lives is refused (exit 2,
naming the holder). A dead holder's lease is taken over, with an event: its pid is gone on
this host, its SLURM job is ours (a requeued job's earlier instance has ended), or its
heartbeat is older than :data:`STALE_S` (another host, a frozen node).

A :class:`Guard` thread per rank keeps the run honest after a fault: rank 0 refreshes the
heartbeat every :data:`HEARTBEAT_S`; every rank stops itself (exit :data:`LOST_EXIT`) when the
lease names another launch, and under torchrun when its agent died (torchrun's workers live
in their own sessions, so a ``kill -9`` of the agent would otherwise leave them training and
saving next to the relaunch). The lease is removed when a launch ends normally.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import EXIT_LEASE_LOST, RunFolder, write_json_atomic

HEARTBEAT_S = 5.0
STALE_S = 120.0   # default; MCPT_LEASE_STALE_S overrides it (stale_s())
LOST_EXIT = EXIT_LEASE_LOST  # never retried: the launch that took over owns the run


def _read(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_s() -> float:
    """How old a heartbeat may be before its holder counts as dead: :data:`STALE_S`, or
    ``MCPT_LEASE_STALE_S`` (a cluster whose file system lags more, or a test)."""
    return float(os.environ.get("MCPT_LEASE_STALE_S", STALE_S))


def holder_dead(holder: dict, now: float | None = None) -> str | None:
    """Why ``holder`` no longer writes (None while it may still be alive)."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return f"pid {holder.get('pid')} is gone"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("job") == job and holder.get("pid") != os.getpid():
        return f"SLURM job {job} was restarted"
    age = now - float(holder.get("heartbeat", 0))
    if age > stale_s():
        return f"heartbeat {age:.0f} s old (limit {stale_s():.0f} s)"
    return None


def describe(holder: dict) -> str:
    job = f" job {holder['job']}" if holder.get("job") else ""
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"host {holder.get('host')}{job} pid {holder.get('pid')} (heartbeat {age:.0f} s ago)"


def _create(path, record: dict) -> bool:
    """Write the lease only if none exists (O_EXCL: one of two racing launches wins)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(record) + "\n")
    return True


def _in_use(run: RunFolder, holder: dict) -> UsageError:
    return UsageError(f"run folder {run.path} is in use by {describe(holder)}; stop that "
                      f"launch, or wait {stale_s():.0f} s after it died, then relaunch")


def check_free(run: RunFolder) -> None:
    """Preflight (reads only): refuse a run folder whose lease holder is alive."""
    holder = _read(run.lease_path)
    if holder is not None and holder_dead(holder) is None:
        raise _in_use(run, holder)


def acquire(run: RunFolder) -> tuple[dict, str | None]:
    """Take the lease (rank 0); returns (our record, what we took over from or None).
    Raises UsageError naming the holder when a live launch holds it."""
    run.path.mkdir(parents=True, exist_ok=True)
    now = time.time()
    mine = {"host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
            "pid": os.getpid(), "token": uuid.uuid4().hex, "started": now, "heartbeat": now}
    took_over = None
    for _ in range(5):
        if _create(run.lease_path, mine):
            return mine, took_over
        holder = _read(run.lease_path)
        if holder is None:  # being replaced right now, or unreadable: look again
            time.sleep(0.2)
            continue
        why = holder_dead(holder)
        if why is None:
            raise _in_use(run, holder)
        try:  # only one of two racing launches renames the dead lease away
            os.rename(run.lease_path, run.lease_path.with_name(f"{run.lease_path.name}.{mine['token']}"))
        except FileNotFoundError:
            continue
        run.lease_path.with_name(f"{run.lease_path.name}.{mine['token']}").unlink(missing_ok=True)
        took_over = f"took over the lease of {describe(holder)}: {why}"
    raise UsageError(f"could not take the lease {run.lease_path} (another launch keeps taking "
                     "it); make sure only one launch uses this run folder")


def _taken(run: RunFolder, lease: dict | None, token: str) -> str | None:
    if lease is not None and lease.get("token") != token:
        return f"another launch took the lease of {run.path}: {describe(lease)}"
    return None


def lost(run: RunFolder, token: str) -> str | None:
    """Why the launch holding ``token`` no longer owns ``run`` (None while it does)."""
    return _taken(run, _read(run.lease_path), token)


class Guard:
    """Per-rank watchdog thread: heartbeat (holder), lost lease, dead torchrun agent."""

    def __init__(self, run: RunFolder, token: str, holder: bool):
        self.run, self.token, self.holder = run, token, holder
        self.agent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self._stop = threading.Event()
        self._lease_read = 0.0
        self._verified = time.time()
        self._thread = threading.Thread(target=self._loop, name="run-lease", daemon=True)

    def start(self) -> "Guard":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S if self.agent is None else 1.0):
            problem = self.check()
            if problem:
                print(f"[run lease] {problem}: this process stops (exit {LOST_EXIT})", flush=True)
                os._exit(LOST_EXIT)

    def check(self) -> str | None:
        """What makes this process an orphan writer, or None (and refresh the heartbeat)."""
        if self.agent is not None and os.getppid() != self.agent:
            return f"its torchrun agent (pid {self.agent}) died"
        if time.time() - self._lease_read < HEARTBEAT_S:
            return None
        self._lease_read = time.time()
        lease = _read(self.run.lease_path)
        if problem := _taken(self.run, lease, self.token):
            return problem
        if self.holder and lease is not None:
            try:  # a file-system hiccup must not end the thread: the next beat retries
                write_json_atomic(self.run.lease_path, {**lease, "heartbeat": time.time()})
            except OSError:
                pass
        return None

    def verify(self) -> None:
        """The main thread's check before it writes to the run folder (metrics): after a pause
        longer than a heartbeat (a frozen process or node) this thread and the guard thread wake
        together, and this one must not write a record before the lease is read again."""
        now = time.time()
        if now - self._verified < HEARTBEAT_S:
            return
        self._verified = now
        if problem := lost(self.run, self.token):
            print(f"[run lease] {problem}: this process stops (exit {LOST_EXIT})", flush=True)
            os._exit(LOST_EXIT)

    def release(self) -> None:
        """Stop watching; the holder removes the lease if it is still ours."""
        self._stop.set()
        if self.holder:
            lease = _read(self.run.lease_path)
            if lease is not None and lease.get("token") == self.token:
                self.run.lease_path.unlink(missing_ok=True)


def take(run: RunFolder) -> tuple[Guard, str | None]:
    """Collective: rank 0 takes the lease, every rank learns it and starts its guard.
    Returns the guard and the takeover note (rank 0) for the event log."""
    import torch.distributed as dist

    rank = dist.get_rank()
    outcome = [None]
    if rank == 0:
        try:
            mine, took_over = acquire(run)
            outcome = [{"token": mine["token"], "took_over": took_over}]
        except UsageError as exc:
            outcome = [{"error": str(exc)}]
    dist.broadcast_object_list(outcome, src=0)
    if "error" in outcome[0]:
        raise UsageError(outcome[0]["error"])
    guard = Guard(run, outcome[0]["token"], holder=rank == 0).start()
    return guard, outcome[0]["took_over"] if rank == 0 else None
