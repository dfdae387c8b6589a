"""Experiment trackers (Weights & Biases, MLflow): the records ``metrics.jsonl`` gets, fanned
out to the trackers ``logging.wandb`` / ``logging.mlflow`` turn on (rank 0 only).

Why here and not in each caller: one place decides what a tracker sees, so every backend gets
the same records with ``iteration`` as the step (``tokens`` and ``flops`` as extra keys).

* **One tracked run per run folder.** Its id (:func:`run_id`) is derived from the folder once
  and kept in ``run.json`` (``tracking_run_id``); every launch of the cell resumes that run
  (W&B ``id=..., resume="allow"``; MLflow: the run tagged ``megatron_cpt.run_id``).
* **Each step once.** A relaunch resumes from a checkpoint and redoes, or re-announces,
  iterations that earlier launches already logged; W&B refuses steps that go back. So a
  launch sends only records whose iteration is past the last one ``metrics.jsonl`` held when
  it started (:func:`logged_floor`); those records stay in ``metrics.jsonl``.
* **Never a reason to fail training.** A tracker that cannot start or raises later is turned
  off with one warning and a ``tracking_disabled`` event in ``metrics.jsonl``.

``report --log-to`` (report/tracking.py) opens the same backends for the study's report run
and adds a table, files and summary numbers (``log_table``, ``log_files``, ``log_summary``).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_cpt.run_folder import RunFolder

RUN_ID_KEY = "tracking_run_id"   # in run.json
MLFLOW_RUN_TAG = "megatron_cpt.run_id"
SKIP_FIELDS = ("kind", "iteration", "time", "prefix", "event", "details", "rank")


def run_id(run: RunFolder) -> str:
    """The tracked run's id: the one ``run.json`` holds, else a new one from the folder's
    name and path (plus the time, so a wiped folder restarted at the same path starts a new
    run instead of resuming one whose steps would go back)."""
    info = run.run_info() or {}
    if info.get(RUN_ID_KEY):
        return info[RUN_ID_KEY]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", run.path.name)[:40] or "run"
    digest = hashlib.sha256(f"{run.path.resolve()}|{time.time_ns()}".encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def enabled(logging_cfg) -> bool:
    return bool(logging_cfg.wandb.project or logging_cfg.mlflow.tracking_uri)


def logged_floor(records: list[dict]) -> int:
    """The last iteration an earlier launch logged (-1: none): this launch sends only later ones."""
    its = [r["iteration"] for r in records if isinstance(r.get("iteration"), int)]
    return max(its, default=-1)


def values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker keys: ``train/loss``, ``valid/<prefix>/loss``,
    ``event/<name>`` (1.0), plus ``tokens`` and ``flops``."""
    kind = record.get("kind")
    out: dict[str, float] = {}
    for key in ("tokens", "flops"):
        if isinstance(record.get(key), (int, float)):
            out[key] = float(record[key])
    if kind == "event":
        out[f"event/{record.get('event')}"] = 1.0
        return out
    prefix = f"valid/{record.get('prefix')}" if kind == "valid" else kind
    for key, value in record.items():
        if key in SKIP_FIELDS or key in ("tokens", "flops"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as dotted keys (MLflow params are flat strings)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(tree)[:6000]}


@dataclass
class RunInfo:
    """What a backend needs to open (or resume) the tracked run."""

    run_id: str
    name: str
    group: str | None
    tags: dict[str, str]
    config: dict              # {"config": config.yaml, "run": run.json}
    run_dir: Path


class WandbBackend:
    name = "wandb"

    def __init__(self, cfg, info: RunInfo, params: bool = True):
        import wandb

        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(info.run_dir)}
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or info.group,
            mode=cfg.mode, id=info.run_id, resume="allow", name=info.name,
            tags=[f"{k}:{v}" for k, v in info.tags.items()],
            config={**info.config, "tags": info.tags}, reinit="create_new",
            settings=wandb.Settings(console="off", init_timeout=120, silent=True), **kwargs)
        if params:
            self.run.config.update(info.config, allow_val_change=True)  # a resume: this launch's

    def log(self, step: int, vals: dict[str, float]) -> None:
        self.run.log(vals, step=step)

    def log_eval(self, step: int, vals: dict[str, float]) -> None:
        """Scores of a checkpoint training went past: on their own axis ``eval/iteration``
        (W&B drops steps that go back)."""
        self.run.define_metric("eval/iteration")
        self.run.define_metric("eval/*", step_metric="eval/iteration")
        self.run.log({**vals, "eval/iteration": step})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A W&B Table (sortable in the UI), logged at the run's next step."""
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_files(self, name: str, kind: str, paths: list[Path]) -> None:
        """``paths`` as one artifact ``name`` (a re-run: its next version)."""
        art = self._wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=kind)
        for path in paths:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def log_summary(self, vals: dict[str, float]) -> None:
        """Numbers of the run as a whole: the run summary, not a step of its history."""
        self.run.summary.update(vals)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class MlflowBackend:
    name = "mlflow"

    def __init__(self, cfg, info: RunInfo, params: bool = True):
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking_uri
        if uri.startswith("file:") or ":" not in uri:  # the local file store: asked for by name
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server: fail fast
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = find_mlflow_run(client, cfg.experiment, info.run_id)
        self._resumed_status = None  # eval run: leave the training run's status as it was
        if self.run_id is None:
            exp_id = experiment_id(client, cfg.experiment)
            self.run_id = client.create_run(exp_id, run_name=info.name, tags={
                MLFLOW_RUN_TAG: info.run_id, **info.tags,
                **({"group": info.group} if info.group else {})}).info.run_id
        else:
            if not params:
                self._resumed_status = client.get_run(self.run_id).info.status
            client.update_run(self.run_id, status="RUNNING")
        if params:
            self._log_params(info)

    def _log_params(self, info: RunInfo) -> None:
        """Params are write-once in MLflow: new keys only; each launch's config and run.json
        also as artifacts (``launches/<time>/``)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = flatten(info.config)
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.client.log_dict(self.run_id, info.config, f"launches/{stamp}/run.json")

    def log(self, step: int, vals: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in vals.items()])

    log_eval = log  # MLflow takes any step

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """``<key>.json`` in the layout ``log_table`` writes (columns + data), replaced on a
        re-run (``log_table`` itself would append the rows again)."""
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows}, f"{key}.json")

    def log_files(self, name: str, kind: str, paths: list[Path]) -> None:
        """At the run's artifact root (``name`` / ``kind`` name W&B's artifact only)."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def log_summary(self, vals: dict[str, float]) -> None:
        """MLflow has no summary apart from metrics: step 0."""
        self.log(0, vals)

    def close(self, exit_code: int) -> None:
        status = self._resumed_status or ("FINISHED" if exit_code == 0 else "KILLED")
        self.client.set_terminated(self.run_id, status)


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name``, created if missing. A grid starts its cells at
    once: when another cell created it between our lookup and our create, use theirs."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_ALREADY_EXISTS (a racing cell)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_mlflow_run(client, experiment: str, rid: str) -> str | None:
    """The MLflow run of tracked run ``rid`` (tagged ``megatron_cpt.run_id``), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{rid}'", max_results=1)
    return found[0].info.run_id if found else None


BACKENDS = {"wandb": WandbBackend, "mlflow": MlflowBackend}


class Tracking:
    """The trackers of one launch (rank 0). ``note`` writes an event record to metrics.jsonl
    only (how a tracker that failed is recorded without asking that tracker)."""

    def __init__(self, logging_cfg, run: RunFolder, floor: int, start: int,
                 note: Callable[[dict], None], warn: Callable[[str], None]):
        self.floor, self._note, self._warn = floor, note, warn
        self.backends: list = []
        self._last = start  # the iteration a tracking_disabled event is recorded at
        if not enabled(logging_cfg):
            return
        info = run_info(run, logging_cfg)
        for name, section, on in (("wandb", logging_cfg.wandb, logging_cfg.wandb.project),
                                  ("mlflow", logging_cfg.mlflow, logging_cfg.mlflow.tracking_uri)):
            if not on:
                continue
            try:
                self.backends.append(BACKENDS[name](section, info))
            except BaseException as exc:  # noqa: BLE001 - an import error, a dead server...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._disable(name, "could not start", exc)

    def log(self, record: dict) -> None:
        it = record.get("iteration")
        if not self.backends or not isinstance(it, int) or it <= self.floor:
            return
        vals = values(record)
        if not vals:
            return
        for backend in list(self.backends):
            try:
                backend.log(it, vals)
            except Exception as exc:  # noqa: BLE001 - a lost connection must not stop training
                self.backends.remove(backend)
                self._disable(backend.name, "failed", exc, it)
        self._last = it

    def close(self, exit_code: int = 0) -> None:
        for backend in self.backends:
            try:
                backend.close(exit_code)
            except Exception as exc:  # noqa: BLE001
                self._warn(f"WARNING: {backend.name} tracking did not close cleanly "
                           f"({type(exc).__name__}: {exc})")
        self.backends = []

    def _disable(self, name: str, what: str, exc: BaseException, it: int | None = None) -> None:
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self._warn(f"WARNING: {name} tracking {what} ({why[:300]}); tracking off for this "
                   "launch, training goes on (metrics.jsonl has every record)")
        self._note({"kind": "event", "iteration": self._last if it is None else it,
                    "event": "tracking_disabled", "details": f"{name}: {what}: {why[:300]}"})


def eval_values(result: dict) -> dict[str, float]:
    """An ``eval run`` result (RUN/eval/<iteration>.json) as tracker keys:
    ``eval/<exam>/<split>/<metric>`` and ``eval/valid/<prefix>/<metric>``."""
    out: dict[str, float] = {}
    for exam, splits in (result.get("exams") or {}).items():
        for split, metrics in splits.items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"eval/{exam}/{split}/{k}"] = float(v)
    for prefix, metrics in (result.get("valid") or {}).items():
        for k, v in (metrics.items() if isinstance(metrics, dict) else [("loss", metrics)]):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"eval/valid/{prefix}/{k}"] = float(v)
    return out


class EvalTracking:
    """``eval run``'s scores into the training run's tracked run (when the run's config turns a
    tracker on), each at its checkpoint's iteration. A tracker that fails: one warning."""

    def __init__(self, run: RunFolder, warn: Callable[[str], None]):
        self._warn, self.backends = warn, []
        cfg = run.train_config() if run.config_path.is_file() else None
        if cfg is None or not enabled(cfg.logging) or not (run.run_info() or {}).get(RUN_ID_KEY):
            return
        info = run_info(run, cfg.logging)
        for name, section, on in (("wandb", cfg.logging.wandb, cfg.logging.wandb.project),
                                  ("mlflow", cfg.logging.mlflow, cfg.logging.mlflow.tracking_uri)):
            if on:
                try:
                    self.backends.append(BACKENDS[name](section, info, params=False))
                except Exception as exc:  # noqa: BLE001
                    warn(f"WARNING: {name} tracking could not start ({type(exc).__name__}: "
                         f"{exc}); scores are in RUN/eval only")

    def log(self, result: dict) -> None:
        vals = eval_values(result)
        for backend in list(self.backends):
            try:
                backend.log_eval(int(result["iteration"]), vals)
            except Exception as exc:  # noqa: BLE001
                self.backends.remove(backend)
                self._warn(f"WARNING: {backend.name} tracking failed ({type(exc).__name__}: "
                           f"{exc}); scores are in RUN/eval only")

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close(0)
            except Exception:  # noqa: BLE001 - scores are on disk already
                pass
        self.backends = []


def run_info(run: RunFolder, logging_cfg) -> RunInfo:
    """The tracked run of ``run``: its id, name, group, tags and config (config.yaml + run.json)."""
    info, tags = run.run_info() or {}, dict(logging_cfg.tags)
    name = f"{tags['size']}/{tags['cell']}" if "size" in tags and "cell" in tags else run.path.name
    return RunInfo(run_id=info.get(RUN_ID_KEY) or run_id(run), name=name,
                   group=logging_cfg.wandb.group, tags=tags,
                   config={"config": run.config_dict() if run.config_path.is_file() else {},
                           "run": info}, run_dir=run.path)
