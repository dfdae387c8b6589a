"""The background (async) write of one checkpoint: its dist-checkpoint writes as one forked
process that dies with its trainer."""
from __future__ import annotations

import os

from megatron_cpt.runtime import mcore_patches
from megatron_cpt.training import fault_hooks


def _in_writer(fn, iteration: int, parent: int):
    """The async write as it runs in its forked process: it dies with the trainer (a killed
    rank leaves no writer behind to fill a folder the relaunch reuses); test delay here."""
    def run(*args, **kwargs):
        mcore_patches.die_with_parent(parent)
        fault_hooks.delay_if_planned("slow_save", iteration)
        return fn(*args, **kwargs)
    return run


def _one_request(requests: list, commit, iteration: int):
    """The async writes of one checkpoint as one background process, one after the other.
    Megatron-core's writers report their results through one global queue, so two writes in
    flight at once swap results (each ``.metadata`` then indexes the other's files). The host
    copy (``preload_fn``) happens here, in the loop; the finalizations run in write order,
    then ``commit``."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for r in requests:
        args = list(r.async_fn_args)
        if r.preload_fn is not None:
            args[1] = r.preload_fn()
        if r.async_fn is not None:
            calls.append((r.async_fn, args, r.async_fn_kwargs))

    def write_all() -> None:
        for fn, args, kwargs in calls:
            fn(*args, **kwargs)
    finalize = [f for r in requests for f in r.finalize_fns] + [commit]
    return AsyncRequest(_in_writer(write_all, iteration, os.getpid()), (), finalize)
