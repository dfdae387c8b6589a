"""``eval run``: score the base model and every checkpoint of a training run.

For each scored checkpoint it writes ``RUN/eval/<iteration>.json`` (iteration, tokens, FLOPs,
per exam and split: acc, acc_norm, answer_ppl, n; per validation prefix: loss and perplexity)
and ``RUN/eval/<iteration>.questions.jsonl`` (per-question log-likelihoods). The base model
(the run's ``model.pretrained``) is iteration 0. Checkpoints with a result are skipped, so
the command is safe to rerun after preemption.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_cpt.checkpoint import store
from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training.tracking import EvalTracking


@dataclass(frozen=True)
class ScoredPoint:
    iteration: int
    ckpt: Path
    tokens: float
    flops: float


def _resolve(run_dir: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (run_dir / p).resolve()


def read_run(run_dir: Path):
    """The run's ``TrainConfig`` (UsageError when ``run_dir`` is not a run folder)."""
    return RunFolder(run_dir).train_config()


def scored_points(run_dir: Path, selection: str = "all") -> list[ScoredPoint]:
    """The base model (iteration 0) and the run's committed checkpoints, by ``selection``:
    ``all``, ``latest`` or a comma-separated list of iterations."""
    run_dir = Path(run_dir)
    cfg = read_run(run_dir)
    points = []
    pretrained = cfg.model.pretrained
    if pretrained and store.is_checkpoint(_resolve(run_dir, pretrained)):
        points.append(ScoredPoint(0, _resolve(run_dir, pretrained), 0.0, 0.0))
    for ckpt in sorted(RunFolder(run_dir).checkpoints.glob("iter_*")):
        if not store.is_checkpoint(ckpt):
            continue
        meta = store.read_metadata(ckpt)
        points.append(ScoredPoint(int(meta["iteration"]), ckpt, float(meta.get("tokens", 0)),
                                  float(meta.get("flops", 0))))
    if selection == "all":
        return points
    if selection == "latest":
        return points[-1:]
    try:
        wanted = {int(x) for x in selection.split(",")}
    except ValueError as exc:
        raise UsageError(f"--checkpoints must be all, latest or iterations like 0,100 "
                         f"(got {selection!r})") from exc
    missing = wanted - {p.iteration for p in points}
    if missing:
        raise UsageError(f"no checkpoint for iterations {sorted(missing)} in {run_dir}; "
                         f"available: {[p.iteration for p in points]}")
    return [p for p in points if p.iteration in wanted]


def window_nll(logits, windows):
    """``[summed next-token loss, tokens]`` of ``windows`` ``[n, seq + 1]`` under ``logits``
    ``[n, seq, vocab]``, on the logits' device (the targets are moved there)."""
    import torch
    import torch.nn.functional as F

    targets = windows[:, 1:].reshape(-1).to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
    return torch.stack([nll.double(), nll.new_tensor(targets.numel(), dtype=torch.float64)])


def _read_windows(prefix: Path, seq_length: int, max_sequences: int):
    """The first ``max_sequences`` windows of ``seq_length + 1`` tokens of a prefix (documents
    concatenated, as in training), ``[n, seq_length + 1]`` on the CPU."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    need = max_sequences * (seq_length + 1)
    pieces, have = [], 0
    for i in range(len(ds)):
        pieces.append(np.asarray(ds[i], dtype=np.int64))
        have += len(pieces[-1])
        if have >= need:
            break
    flat = np.concatenate(pieces)
    n = min(max_sequences, len(flat) // (seq_length + 1))
    if n == 0:
        raise UsageError(f"validation prefix {prefix} has fewer than {seq_length + 1} tokens")
    return torch.from_numpy(flat[: n * (seq_length + 1)].reshape(n, seq_length + 1))


def validation_losses(model, model_cfg, prefixes: dict[str, Path], seq_length: int,
                      max_sequences: int = 16, batch: int = 4) -> dict[str, dict]:
    """Mean next-token loss of the model on the first ``max_sequences`` windows of each
    validation prefix. Collective; result on all ranks (the last pipeline stage broadcasts
    its sums through :func:`broadcast_values`, on the device the group's backend takes)."""
    from megatron.core import parallel_state

    from megatron_cpt.models.forward import forward_logits
    from megatron_cpt.runtime import broadcast_values

    out = {}
    for name, prefix in prefixes.items():
        windows = _read_windows(prefix, seq_length, max_sequences)
        total, count = 0.0, 0
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            logits = forward_logits(model, chunk[:, :-1], vocab_size=model_cfg.vocab_size)
            sums = window_nll(logits, chunk).tolist() if logits is not None else [0.0, 0.0]
            sums = broadcast_values(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
            total, count = total + sums[0], count + int(sums[1])
        mean = total / count
        out[name] = {"loss": mean, "ppl": math.exp(mean), "tokens": count}
    return out


def evaluate_run(run_dir: Path, tasks_dir: Path, tasks: list[str], selection: str = "all",
                 tp: int = 1, pp: int = 1, batch_size: int = 16, limit: int | None = None,
                 valid_sequences: int = 16) -> list[int]:
    """Score every selected point without a result yet. Collective over TP*PP ranks.
    Returns the iterations scored by this call."""
    import torch.distributed as dist
    from tqdm import tqdm

    from eval.scoring import evaluate_checkpoint, task_manager, write_json

    run_dir, run = Path(run_dir), RunFolder(run_dir)
    cfg = read_run(run_dir)
    points = [p for p in scored_points(run_dir, selection)
              if not run.eval_result(p.iteration).is_file()]
    prefixes = {v.name or Path(v.prefix).name: _resolve(run_dir, v.prefix) for v in cfg.data.valid}
    run.eval_dir.mkdir(exist_ok=True)
    scored = []
    manager = task_manager(tasks_dir, tasks) if points else None  # built once per run
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tracked = EvalTracking(run, warn=_warn) if points and rank0 else None
    for point in tqdm(points, desc="checkpoints", unit="ckpt", disable=not rank0):
        result = evaluate_checkpoint(point.ckpt, tasks_dir, tasks, tp=tp, pp=pp,
                                     batch_size=batch_size, limit=limit, keep_model=True,
                                     manager=manager)
        model, model_cfg, summary = result["model"], result["model_cfg"], result["summary"]
        valid = validation_losses(model, model_cfg, prefixes, cfg.data.seq_length, valid_sequences)
        if dist.get_rank() == 0:
            exams: dict[str, dict] = {}
            for task, metrics in summary["metrics"].items():
                exam, split = task.removeprefix("mcpt_").rsplit("_", 1)
                exams.setdefault(exam, {})[split] = metrics
            record = {"iteration": point.iteration, "tokens": point.tokens, "flops": point.flops,
                      "checkpoint": str(point.ckpt), "exams": exams, "valid": valid}
            with run.eval_questions(point.iteration).open("w") as f:
                for task, recs in summary["samples"].items():
                    for rec in recs:
                        f.write(json.dumps({"task": task, **rec}) + "\n")
            write_json(run.eval_result(point.iteration), record)  # last: marks it done
            if tracked is not None:
                tracked.log(record)
        dist.barrier()
        scored.append(point.iteration)
    if tracked is not None:
        tracked.close()
    return scored


def _warn(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)
