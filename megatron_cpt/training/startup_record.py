"""The startup record: every setting that decides a run's speed, what it resolved to here and
why. Printed once by rank 0, stored under ``startup`` in ``run.json``, and printed by
``megatron-cpt train --check`` so a user can run the check inside the cluster's container
and see, before submitting, whether Transformer Engine, the fusions and TensorBoard are on.
Fallbacks (TE missing or broken, TensorBoard missing) are warnings here, never silent.
"""
from __future__ import annotations

from megatron_cpt.models import fusions as fusions_mod
from megatron_cpt.runtime.cuda_connections import ConnectionSetting, decide
from megatron_cpt.training.config import TrainConfig
from megatron_cpt.training.gc_policy import GCPolicy


def tensorboard_status(enabled: bool) -> dict:
    if not enabled:
        return {"on": False, "why": "logging.tensorboard=false"}
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as exc:  # the tensorboard package is optional
        first = (str(exc).splitlines() or [""])[0][:160]
        return {"on": False, "why": f"torch.utils.tensorboard does not import ({first}); "
                                    "metrics.jsonl only (pip install tensorboard)"}
    return {"on": True, "why": "torch.utils.tensorboard imports"}


def _layer_spec(cfg: TrainConfig, probe: fusions_mod.KernelProbe) -> tuple[dict, dict]:
    asked = cfg.model.attention_backend
    backend = asked or ("te" if probe.te else "sdpa")
    if asked:
        why = f"model.attention_backend={asked}"
    elif probe.te:
        why = probe.te_why
    else:
        why = f"{probe.te_why}; local spec with torch SDPA"
    spec = {"value": "te" if backend == "te" else "local", "why": why,
            "fallback": bool(probe.cuda and not probe.te)}
    return spec, {"value": backend, "why": why}


def _parallel(cfg: TrainConfig) -> dict:
    p = cfg.parallel
    sp = p.sequence_parallel and p.tp > 1
    return {
        "sequence_parallel": {"on": sp, "why": "parallel.sequence_parallel with TP>1" if sp else
                              ("needs TP>1" if p.sequence_parallel else "parallel.sequence_parallel=false")},
        "distributed_optimizer": {"on": p.distributed_optimizer, "why": "parallel.distributed_optimizer"},
        "overlap_grad_reduce": {"on": p.overlap_grad_reduce, "why": "parallel.overlap_grad_reduce"},
        "overlap_param_gather": {"on": p.overlap_param_gather and p.distributed_optimizer,
                                 "why": "parallel.overlap_param_gather"},
    }


def build(cfg: TrainConfig, dtype: str, probe: fusions_mod.KernelProbe | None = None,
          connections: ConnectionSetting | None = None) -> dict:
    """The record for ``cfg`` in this environment (``probe`` / ``connections`` injectable)."""
    probe = probe or fusions_mod.KernelProbe.detect()
    spec, attention = _layer_spec(cfg, probe)
    fus = fusions_mod.resolve(cfg.model, dtype, probe, attention["value"])
    pr = cfg.precision
    conn = connections or decide(cfg.parallel.tp, cfg.parallel.sequence_parallel)
    return {
        "device": "cuda" if probe.cuda else "cpu",
        "dtype": dtype,
        "layer_spec": spec,
        "attention_backend": attention,
        "fusions": {name: {"on": f.on, "why": f.why, **({"impl": f.impl} if f.impl else {})}
                    for name, f in fus.items()},
        "fp8": {"on": bool(pr.fp8), "format": pr.fp8, "recipe": pr.fp8_recipe if pr.fp8 else None,
                "why": f"precision.fp8={pr.fp8}, fp8_recipe={pr.fp8_recipe}" if pr.fp8
                else "precision.fp8=null"},
        **_parallel(cfg),
        "cuda_device_max_connections": conn.to_dict(),
        "gc": GCPolicy(cfg.train.gc_interval).describe(),
        "tensorboard": tensorboard_status(cfg.logging.tensorboard),
    }


def _state(entry: dict) -> str:
    if "on" in entry:
        return "on" if entry["on"] else "off"
    return str(entry.get("value", entry.get("mode")))


def warnings(record: dict) -> list[str]:
    """Fallbacks a user must see: TE missing on a GPU, TensorBoard asked for but missing."""
    out = []
    if record["layer_spec"]["fallback"]:
        out.append(f"WARNING: Transformer Engine unavailable on a GPU ({record['layer_spec']['why']}): "
                   "local layer spec, no FP8, no TE fusions")
    tb = record["tensorboard"]
    if not tb["on"] and tb["why"] != "logging.tensorboard=false":
        out.append(f"WARNING: TensorBoard off: {tb['why']}")
    return out


def format_record(record: dict) -> str:
    """One line per setting: ``startup: name = state (why)``."""
    lines = [f"startup: device = {record['device']}, dtype = {record['dtype']}"]
    for key in ("layer_spec", "attention_backend", "fp8", "sequence_parallel",
                "distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
        lines.append(f"startup: {key} = {_state(record[key])} ({record[key]['why']})")
    for name, f in record["fusions"].items():
        impl = f" [{f['impl']}]" if f.get("impl") else ""
        lines.append(f"startup: {name} = {_state(f)}{impl} ({f['why']})")
    c = record["cuda_device_max_connections"]
    lines.append(f"startup: CUDA_DEVICE_MAX_CONNECTIONS = {c['value'] or 'unset'} "
                 f"[{c['source']}] ({c['why']})")
    g = record["gc"]
    lines.append(f"startup: gc = {g['mode']} ({g['why']})")
    lines.append(f"startup: tensorboard = {_state(record['tensorboard'])} ({record['tensorboard']['why']})")
    return "\n".join(lines + warnings(record))
