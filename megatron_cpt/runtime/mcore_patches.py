"""Every change this project makes to Megatron-core's private state, with a version guard.

Patches of private attributes (``module._name``) silently stop working, or break, when
Megatron-core changes them, so each patch here first calls :func:`require_tested_mcore`:
on a version outside :data:`TESTED_MCORE` it **refuses** (RuntimeError naming the installed
and tested versions) rather than warning, because a no-longer-applied patch shows up much
later as a hung save or a wrong-device crash, far from its cause. Set
``MEGATRON_CPT_ALLOW_UNTESTED_MCORE=1`` to run anyway (a warning is printed) while
validating a new version; add it to ``TESTED_MCORE`` once the suite passes on it.

The CPU redirects live in :mod:`megatron_cpt.runtime.cpu_backend` (same guard).
"""
from __future__ import annotations

import os
import warnings

TESTED_MCORE = ("0.16.1",)
ALLOW_ENV = "MEGATRON_CPT_ALLOW_UNTESTED_MCORE"

_WRITER_MANAGER = None


def mcore_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def require_tested_mcore(patch: str) -> None:
    """Refuse to apply ``patch`` on a megatron-core version it was not tested with."""
    installed = mcore_version()
    if installed in TESTED_MCORE:
        return
    message = (f"{patch} patches megatron-core internals tested only with {', '.join(TESTED_MCORE)}, "
               f"but {installed} is installed")
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{message}; running anyway ({ALLOW_ENV}=1)", stacklevel=2)
        return
    raise RuntimeError(f"{message}; install megatron-core=={TESTED_MCORE[-1]} or set {ALLOW_ENV}=1 "
                       "to try this version")


def die_with_parent(parent: int) -> None:
    """End this helper when the trainer that started it dies, even by SIGKILL: Linux's
    parent-death signal, and a parent-pid watch thread where prctl is unavailable."""
    import signal
    import threading
    import time

    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _writer_helper_init(parent: int) -> None:
    """Initializer of the writer queue's server process: ignore the stop signals (SIGINT too:
    Ctrl-C and torchrun's agent signal the trainer's whole process group), die with the
    trainer."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent)


def signal_proof_writer_queue() -> None:
    """Megatron-core's checkpoint writer reports results through a multiprocessing Manager
    (a spawned server process) that it creates on the first save, in the private
    ``filesystem_async._results_queue``. SLURM delivers SIGTERM (preemption, ``scontrol
    requeue``) and ``--signal=USR1`` to every process of the job step (Ctrl-C and torchrun's
    agent send SIGINT to the process group), so that server died on
    the very signal that asked for the save and the save failed with BrokenPipeError. Start
    the server ourselves with those signals ignored; the trainer's own processes keep
    handling them (flag -> agreed stop -> save). Since it ignores them, it ends itself when
    the trainer dies (``die_with_parent``), or a killed trainer would leave it behind.
    Idempotent."""
    global _WRITER_MANAGER
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _WRITER_MANAGER is not None or filesystem_async._results_queue is not None:
        return
    require_tested_mcore("signal_proof_writer_queue")
    _WRITER_MANAGER = SyncManager(ctx=get_context("spawn"))
    _WRITER_MANAGER.start(initializer=_writer_helper_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = _WRITER_MANAGER.Queue()
