"""Per-rank health and the hang watchdog's pieces, without a cluster (the SLURM runs that
slow and hang a real rank are in tests/test_slurm.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from megatron_cpt.training.health import RankHealth

REPO = Path(__file__).resolve().parents[1]


def test_straggler_event_needs_a_streak_and_fires_once_per_streak():
    health = RankHealth(factor=1.5, intervals=3, device=torch.device("cpu"))
    slow = [0.10, 0.10, 0.10, 0.40]          # rank 3 at 4x the median
    even = [0.10, 0.10, 0.10, 0.11]
    seen = [health._stragglers(w) for w in (slow, slow, even, slow, slow, slow, slow, slow)]
    fired = [i for i, found in enumerate(seen) if found]
    assert fired == [5], seen               # the streak broken at step 2; 3, 4, 5 make one
    rank, details = seen[5][0]
    assert rank == 3 and "median 100 ms" in details and "latest 400 ms" in details


def test_collective_trace_records_the_last_call_and_uninstalls(tmp_path):
    """A real (one-rank gloo) all_reduce through torch.distributed: the trace names it and
    its caller; uninstall gives torch its functions back; P2POps (PP > 1) still build."""
    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from megatron_cpt.runtime.collectives import CollectiveTrace
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % PORT, rank=0,
                                world_size=1)
        original = dist.all_reduce
        trace = CollectiveTrace().install()
        assert dist.all_reduce is not original
        # pipeline parallelism builds P2POps from dist.isend / dist.irecv, checked by identity
        dist.P2POp(dist.isend, torch.ones(1), 0)
        dist.P2POp(dist.irecv, torch.ones(1), 0)
        dist.all_reduce(torch.ones(2))
        print(trace.describe())
        trace.uninstall()
        assert dist.all_reduce is original
        dist.destroy_process_group()
    """).replace("PORT", str(_free_port()))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("#1 torch.distributed.all_reduce from <string>:") and \
        line.endswith("returned"), line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
