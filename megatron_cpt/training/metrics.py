"""Metrics: ``RUN/metrics.jsonl`` (append-only), TensorBoard when importable, a progress line.

Record kinds (field ``kind``):
  * ``train``: iteration, tokens, flops, loss, lr, grad_norm, step_time_s, tokens_per_s,
    tflops_per_gpu, mfu
  * ``valid``: iteration, tokens, flops, prefix (its name), loss
  * ``event``: iteration, event (resume, checkpoint, stop, nonfinite, done,
    tracking_disabled...), details
Only global rank 0 writes; it also sends each record to the experiment trackers the config
turns on (:mod:`.tracking`: W&B, MLflow). On resume, records of iterations after the checkpoint are kept
(the file is a log); readers take the last record per (kind, iteration, prefix).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megatron_cpt.run_folder import RunFolder
from megatron_cpt.training import tracking


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        run = RunFolder(run_dir)
        self.run, self.path = run, run.metrics_path
        self.tracking: tracking.Tracking | None = None
        self.before_write = None  # the lease guard's verify: no record from a superseded launch
        # what earlier launches logged, read before this launch appends (tracking: each step once)
        self._floor = tracking.logged_floor(run.metrics()) if enabled else -1
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(run.tensorboard_dir))
            except Exception as exc:  # tensorboard not installed: jsonl only, said out loud
                self._tb = None
                event(f"WARNING: TensorBoard off ({type(exc).__name__}: {exc}); metrics.jsonl only")

    def start_tracking(self, logging_cfg, iteration: int) -> None:
        """The trackers of ``logging.wandb`` / ``logging.mlflow`` (rank 0; after the resume
        records, which earlier launches' steps cover)."""
        if self.enabled and tracking.enabled(logging_cfg):
            self.tracking = tracking.Tracking(logging_cfg, self.run, self._floor, iteration,
                                              note=self._append, warn=event)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.before_write is not None:
            self.before_write()
        self._append(record)
        if self.tracking is not None:
            self.tracking.log(record)
        if self._tb is not None and record.get("kind") in ("train", "valid"):
            it = record["iteration"]
            if record["kind"] == "train":
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu"):
                    if record.get(k) is not None:
                        self._tb.add_scalar(f"train/{k}", record[k], it)
            else:
                self._tb.add_scalar(f"valid/{record['prefix']}/loss", record["loss"], it)

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._file.flush()

    def progress(self, r: dict, total: int) -> None:
        if not self.enabled:
            return
        gn = r.get("grad_norm")
        print(f"iter {r['iteration']:>7}/{total} | tokens {r['tokens']:.3e} | loss {r['loss']:.5f} "
              f"| lr {r['lr']:.3e} | grad_norm {gn if gn is None else round(gn, 4)} "
              f"| {r['step_time_s'] * 1000:.1f} ms | {r['tokens_per_s']:.0f} tok/s "
              f"| {r['tflops_per_gpu']:.3f} TFLOP/s/gpu | mfu {r['mfu']:.4f}", flush=True)

    def close(self, exit_code: int = 0) -> None:
        if self.tracking is not None:
            self.tracking.close(exit_code)
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def event(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
