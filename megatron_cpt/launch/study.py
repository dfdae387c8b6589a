"""The study grid: sizes x corpora, resolved into cells with their run folder, data,
checkpoint, resources and trainer overrides.

One YAML (``configs/study.yaml``) is the single source for the committed sbatch scripts,
the submitit grid, ``launch status`` and the report. Paths in it resolve against its folder;
``MCPT_STUDY_DIR``, ``MCPT_DATA_ROOT`` and ``MCPT_CKPT_ROOT`` override the three roots (the
same variables the sbatch scripts read), so a cluster can relocate everything without edits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_cpt.config_loader import build, read_yaml
from megatron_cpt.config_ranges import ranged
from megatron_cpt.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_ROOTS = {"study_dir": "MCPT_STUDY_DIR", "data_root": "MCPT_DATA_ROOT",
             "checkpoint_root": "MCPT_CKPT_ROOT"}


@dataclass
class SizeSpec:
    """One model size: architecture, model parallelism and what one training job asks for."""

    name: str
    model: str                     # configs/models/<model>.yaml; also the checkpoint folder name
    tp: int = ranged(1, 1)
    pp: int = ranged(1, 1)
    nodes: int = ranged(1, 1)
    tasks_per_node: int | None = ranged(None, 1)  # default: resources.gpus_per_node (one task per GPU)
    time: str = "1-00:00:00"
    signal_s: int = ranged(300, 0)           # SIGUSR1 this long before the limit: time to save a checkpoint
    overrides: list[str] = field(default_factory=list)   # extra trainer overrides for this size


@dataclass
class Resources:
    gpus_per_node: int = ranged(8, 0)        # 0: CPU-only cluster (tests, demo)
    gpu_memory_gb: float | None = ranged(None, 0, lo_open=True) # GiB per GPU: the memory planner refuses cells that
                                        # do not fit (None: not checked)
    tasks_per_node: int = ranged(8, 1)
    cpus_per_task: int = ranged(12, 1)
    mem: str | None = None         # e.g. "0" (all of the node) or "2G"; None: cluster default
    partition: str | None = None   # SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS override these
    account: str | None = None
    qos: str | None = None
    max_requeues: int = ranged(20, 0)        # a cell that needs more is broken, not unlucky
    max_failures: int = ranged(3, 0)         # crashes (not 2/3/42) retried per job; then it ends FAILED


@dataclass
class EvalSpec:
    enabled: bool = True
    exams: list[str] = field(default_factory=list)
    num_fewshot: int = ranged(5, 0)
    batch_size: int = ranged(16, 1)
    limit: int | None = ranged(None, 1)      # questions per task (None: all)
    valid_sequences: int = ranged(16, 1)     # sequences per validation prefix (perplexity / forgetting)
    # Exam formulation SGER is computed on (both are always scored and reported): mcf (the
    # lettered options, arXiv 2501.02068), cf (cloze: the choice texts), or auto = cf for
    # sizes below cf_below_params or where the base model's MCF val accuracy is at chance
    # (docs/report.md), else mcf.
    primary_formulation: str = "auto"
    cf_below_params: float = ranged(2.0e9, 0)
    time: str = "04:00:00"
    gpus: int = ranged(1, 0)                 # evaluation runs at TP1 on one GPU (14B bf16 fits in 80 GB)
    cpus: int = ranged(8, 1)
    mem: str | None = None


@dataclass
class _StudyFile:
    """The keys of a study YAML as written (paths unresolved); StudyConfig.load resolves them."""

    train_config: str = ""
    sizes: dict[str, Any] = field(default_factory=dict)  # each built as a SizeSpec
    domains: list[str] = field(default_factory=list)
    name: str = ""
    study_dir: str = "runs/study"
    data_root: str = "data/tokenized"
    checkpoint_root: str = "checkpoints"
    general: bool = True
    controls: list[str] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    eval: EvalSpec = field(default_factory=EvalSpec)
    replay: Any = None          # [fractions] or {fractions, domains, sizes}: see ReplaySpec
    recommend: dict[str, Any] = field(default_factory=dict)  # {general_loss_increase: 0.05}


@dataclass
class ReplaySpec:
    """Replay cells: each a domain run whose training blend holds ``fraction`` general data
    (by samples, hence tokens: every sample is one sequence). 0 is the domain cell itself and
    1 the general cell, so fractions lie strictly between. Empty ``domains`` / ``sizes``: all."""

    fractions: list[float] = ranged(lo=0, hi=1, lo_open=True, hi_open=True, default_factory=list)
    domains: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)


def replay_corpus(domain: str, fraction: float) -> str:
    """``legal`` at 0.25 -> ``legal_replay25`` (percent; a fractional percent as ``0p5``)."""
    return f"{domain}_replay{f'{fraction * 100:.6g}'.replace('.', 'p')}"


@dataclass
class StudyConfig:
    name: str
    path: Path                     # the YAML it was read from
    train_config: Path
    study_dir: Path
    data_root: Path
    checkpoint_root: Path
    domains: list[str]
    general: bool
    controls: list[str]
    budget: dict
    sizes: dict[str, SizeSpec]
    resources: Resources
    eval: EvalSpec
    replay: ReplaySpec = field(default_factory=ReplaySpec)
    recommend: dict = field(default_factory=dict)

    @property
    def corpora(self) -> list[str]:
        """Training corpora = cell names: general, each domain, control_<domain>, then the
        replay cells <domain>_replay<pct>."""
        return (["general"] if self.general else []) + list(self.domains) + \
            [f"control_{d}" for d in self.controls] + list(self.replay_cells)

    @property
    def replay_cells(self) -> dict[str, tuple[str, float]]:
        """corpus name -> (domain, general fraction) of every declared replay cell."""
        doms = self.replay.domains or self.domains
        return {replay_corpus(d, f): (d, f) for d in doms for f in self.replay.fractions}

    def has_cell(self, size: str, corpus: str) -> bool:
        """Replay cells exist only at ``replay.sizes`` (all sizes when empty)."""
        return corpus not in self.replay_cells or not self.replay.sizes \
            or size in self.replay.sizes

    @property
    def valid_names(self) -> list[str]:
        return ["general"] + [d for d in self.domains if d != "general"]

    @classmethod
    def load(cls, path: str | Path, use_env: bool = True) -> "StudyConfig":
        """Read and check a study YAML. ``use_env=False`` ignores the MCPT_* root overrides
        (rendering committed scripts must not depend on the caller's environment)."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"study file {path} not found; pass --study configs/study.yaml")
        doc = read_yaml(path, "study")
        raw = build(_StudyFile, doc.data, doc)
        for key in ("train_config", "sizes", "domains"):
            if not getattr(raw, key):
                raise doc.error((key,), f"`{key}:` is required")
        base = path.resolve().parent

        def res(value: str | None, env: str | None = None) -> Path:
            if env and use_env and os.environ.get(env):
                value = os.environ[env]
            p = Path(os.path.expandvars(str(value)))
            return p if p.is_absolute() else (base / p).resolve()

        sizes = {}
        for name, spec in raw.sizes.items():
            if not isinstance(spec, (dict, type(None))):
                raise doc.error(("sizes", name), f"sizes.{name} must be a mapping, got {spec!r}")
            spec = {"name": str(name), "model": str(name), **(spec or {})}
            sizes[str(name)] = build(SizeSpec, spec, doc, ("sizes", name))
        if bad := [c for c in raw.controls if c not in raw.domains]:
            raise doc.error(("controls",), f"controls {bad} are not in domains {raw.domains}")
        if raw.eval.primary_formulation not in ("auto", "mcf", "cf"):
            raise doc.error(("eval", "primary_formulation"), "must be auto, mcf or cf, got "
                            f"{raw.eval.primary_formulation!r}")
        replay = _replay_spec(raw.replay, raw, doc)
        if (inc := raw.recommend.get("general_loss_increase")) is not None and not (
                isinstance(inc, (int, float)) and not isinstance(inc, bool) and inc > 0):
            raise doc.error(("recommend", "general_loss_increase"),
                            f"must be a number > 0 (nats over the base model), got {inc!r}")
        study = cls(
            name=raw.name or path.stem, path=path.resolve(), train_config=res(raw.train_config),
            study_dir=res(raw.study_dir, ENV_ROOTS["study_dir"]),
            data_root=res(raw.data_root, ENV_ROOTS["data_root"]),
            checkpoint_root=res(raw.checkpoint_root, ENV_ROOTS["checkpoint_root"]),
            domains=raw.domains, general=raw.general, controls=raw.controls, budget=raw.budget,
            sizes=sizes, resources=raw.resources, eval=raw.eval, replay=replay,
            recommend=dict(raw.recommend),
        )
        study.eval.exams = [str(res(e)) for e in study.eval.exams]
        if not study.train_config.is_file():
            raise doc.error(("train_config",), f"train_config {study.train_config} not found")
        return study

    def cells(self, sizes: list[str] | None = None, corpora: list[str] | None = None) -> list["Cell"]:
        """The selected cells; unknown names are a usage error (exit 2)."""
        for asked, known, what in ((sizes, list(self.sizes), "size"),
                                   (corpora, self.corpora, "domain")):
            for a in asked or []:
                if a not in known:
                    raise UsageError(f"unknown {what} '{a}' (this study has: {', '.join(known)})")
        return [Cell(self, self.sizes[s], c) for s in (sizes or self.sizes)
                for c in self.corpora if (not corpora or c in corpora) and self.has_cell(s, c)]


def _replay_spec(value, raw: _StudyFile, doc) -> ReplaySpec:
    """``replay: [0.05, 0.25]`` or ``replay: {fractions: [...], domains: [...], sizes: [...]}``."""
    if value is None:
        return ReplaySpec()
    if isinstance(value, list):
        value = {"fractions": value}
    if not isinstance(value, dict):
        raise doc.error(("replay",), "must be a list of general fractions or a mapping "
                        f"{{fractions, domains, sizes}}, got {value!r}")
    spec = build(ReplaySpec, value, doc, ("replay",))
    if not spec.fractions:
        raise doc.error(("replay", "fractions"), "needs at least one fraction")
    for f in spec.fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise doc.error(("replay", "fractions"), f"fractions lie strictly between 0 (the "
                            f"domain cell) and 1 (the general cell), got {f!r}")
    spec.fractions = sorted({float(f) for f in spec.fractions})
    if bad := [d for d in spec.domains if d not in raw.domains]:
        raise doc.error(("replay", "domains"), f"{bad} are not in domains {raw.domains}")
    # a copy of the study cut down to fewer sizes keeps its replay declaration: sizes it no
    # longer has just have no replay cells (`plan` lists the cells that remain)
    known = {str(k) for k in raw.sizes}
    sizes = [str(z) for z in spec.sizes]
    spec.sizes = [z for z in sizes if z in known]
    if sizes and not spec.sizes:
        spec.fractions = []  # none of its sizes left: no replay cells (not "all sizes")
    if spec.fractions and not raw.general:
        raise doc.error(("replay",), "replay cells blend in the general corpus: set general: true")
    return spec


def _number(value) -> str:
    """2e10 -> '20000000000' (YAML 1.1 reads '2e+10' as a string)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quoted(text: str) -> str:
    """A YAML single-quoted string (safe inside the sbatch scripts' double-quoted overrides)."""
    return "'" + str(text).replace("'", "''") + "'"


@dataclass
class Cell:
    """One size x corpus run of the study."""

    study: StudyConfig
    size: SizeSpec
    corpus: str                    # general | <domain> | control_<domain> | <domain>_replay<pct>

    @property
    def name(self) -> str:
        return f"{self.size.name}/{self.corpus}"

    @property
    def kind(self) -> str:
        if self.corpus == "general":
            return "general"
        if self.corpus in self.study.replay_cells:
            return "replay"
        return "control" if self.corpus.startswith("control_") else "domain"

    @property
    def domain(self) -> str | None:
        if self.corpus in self.study.replay_cells:
            return self.study.replay_cells[self.corpus][0]
        return None if self.corpus == "general" else self.corpus.removeprefix("control_")

    @property
    def general_fraction(self) -> float | None:
        """Share of general samples in the training blend (0 domain, 1 general; None for a
        control: general data size-matched to a domain, not on the mixture axis)."""
        if self.corpus in self.study.replay_cells:
            return self.study.replay_cells[self.corpus][1]
        return {"general": 1.0, "domain": 0.0}.get(self.kind)

    @property
    def run_dir(self) -> Path:
        return self.study.study_dir / "runs" / self.size.name / self.corpus

    @property
    def pretrained(self) -> Path:
        return self.study.checkpoint_root / self.size.model

    def train_prefix(self, data_root: Path | str | None = None) -> str:
        corpus = self.domain if self.kind == "replay" else self.corpus
        return f"{data_root or self.study.data_root}/{corpus}_train"

    def train_blend(self, data_root: Path | str | None = None) -> list[tuple[str, float]]:
        """(prefix, weight) of the training data: one prefix, or for a replay cell the domain
        and general prefixes weighted 1 - r and r (Megatron's BlendedDataset draws samples
        in exactly that ratio, up to one sample at every prefix of the run)."""
        if self.kind != "replay":
            return [(self.train_prefix(data_root), 1.0)]
        r = self.general_fraction
        return [(self.train_prefix(data_root), round(1.0 - r, 10)),
                (f"{data_root or self.study.data_root}/general_train", r)]

    def valid_prefixes(self, data_root: Path | str | None = None) -> dict[str, str]:
        root = data_root or self.study.data_root
        return {n: f"{root}/{n}_valid" for n in self.study.valid_names}

    @property
    def tasks_per_node(self) -> int:
        res = self.study.resources
        return self.size.tasks_per_node or (res.gpus_per_node or res.tasks_per_node)

    @property
    def world_size(self) -> int:
        return self.size.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.size.nodes * self.study.resources.gpus_per_node

    def trainer_overrides(self, run_dir: str | None = None, pretrained: str | None = None,
                          data_root: str | None = None) -> list[str]:
        """Dotted overrides that turn the study's base training config into this cell's run.
        The arguments let the sbatch renderer put shell variables in place of paths."""
        valid = ", ".join(f"{{name: {n}, prefix: {p}}}"
                          for n, p in self.valid_prefixes(data_root).items())
        train = ", ".join(f"{{prefix: {p}, weight: {w}}}" for p, w in self.train_blend(data_root))
        return [f"run_dir={run_dir or self.run_dir}",
                f"model.pretrained={pretrained or self.pretrained}",
                f"data.train=[{train}]",
                f"data.valid=[{valid}]",
                f"parallel.tp={self.size.tp}", f"parallel.pp={self.size.pp}",
                *[f"budget.{k}={_number(v)}" for k, v in self.study.budget.items()],
                *self.tracking_overrides(), *self.size.overrides]

    def tracking_overrides(self) -> list[str]:
        """The study view in W&B / MLflow (used when the base config turns a tracker on): one
        group / experiment named after the study, each run tagged with its size, domain and
        kind."""
        tags = {"study": self.study.name, "size": self.size.name, "domain": self.domain or "general",
                "kind": self.kind, "cell": self.corpus}
        inline = ", ".join(f"{k}: {_quoted(v)}" for k, v in tags.items())
        return [f"logging.wandb.group={_quoted(self.study.name)}",
                f"logging.mlflow.experiment={_quoted(self.study.name)}",
                f"logging.tags={{{inline}}}"]

    def train_config(self):
        from megatron_cpt.training.config import TrainConfig

        return TrainConfig.load(self.study.train_config, self.trainer_overrides(),
                                origin=f"{self.study.path.name} cell {self.size.name}/{self.corpus}")

    def describe(self) -> dict:
        return {"size": self.size.name, "cell": self.corpus, "kind": self.kind,
                "domain": self.domain, "general_fraction": self.general_fraction,
                "model": self.size.model,
                "run_dir": str(self.run_dir.relative_to(self.study.study_dir)),
                "tp": self.size.tp, "pp": self.size.pp, "nodes": self.size.nodes,
                "tasks": self.world_size, "gpus": self.gpus}


def check_resources(cell: Cell) -> None:
    """A resource request that cannot hold the size's TP x PP (or its batch) is refused."""
    from megatron_cpt.models.qwen2 import ModelConfig

    size, res = cell.size, cell.study.resources
    model = ModelConfig.load(size.model)
    model.check_parallel(size.tp, size.pp)
    mp = size.tp * size.pp
    where = f"size {size.name}"
    if res.gpus_per_node and cell.tasks_per_node != res.gpus_per_node:
        raise UsageError(f"{where}: {cell.tasks_per_node} tasks per node on {res.gpus_per_node}-GPU "
                         "nodes; the trainer runs one task per GPU")
    if res.gpus_per_node and size.tp > res.gpus_per_node:
        raise UsageError(f"{where}: TP={size.tp} spans more than one {res.gpus_per_node}-GPU node; "
                         "keep TP within a node (raise PP instead)")
    if cell.world_size % mp:
        raise UsageError(f"{where}: {size.nodes} node(s) x {cell.tasks_per_node} tasks = "
                         f"{cell.world_size} ranks is not a multiple of TP x PP = {mp}; change "
                         "nodes or tasks_per_node")
    cfg = cell.train_config()
    dp = cell.world_size // mp
    per_step = cfg.batch.micro_batch_size * dp
    if cfg.batch.global_batch_size % per_step:
        raise UsageError(f"{where}: global batch {cfg.batch.global_batch_size} is not a multiple "
                         f"of micro batch {cfg.batch.micro_batch_size} x DP {dp}; change nodes "
                         "or batch.global_batch_size")


def input_problem(cell: Cell) -> str | None:
    """:func:`check_inputs`' verdict as text (None: ready); ``launch grid --dry-run`` shows it."""
    try:
        check_inputs(cell)
    except UsageError as exc:
        return str(exc)
    return None


def check_inputs(cell: Cell) -> None:
    """Everything a cell reads must exist before anything is submitted."""
    from megatron_cpt.checkpoint import store

    if not store.is_checkpoint(cell.pretrained):
        raise UsageError(f"{cell.name}: pretrained checkpoint {cell.pretrained} not found; convert "
                         f"it (`megatron-cpt convert hf-to-mcore --out {cell.pretrained}`) or set "
                         "checkpoint_root / MCPT_CKPT_ROOT")
    for prefix in [*(p for p, _ in cell.train_blend()), *cell.valid_prefixes().values()]:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise UsageError(f"{cell.name}: data prefix {prefix} has no {'/'.join(missing)}; "
                             "tokenize it (`megatron-cpt prep tokenize`) or set data_root / "
                             "MCPT_DATA_ROOT")


def write_study_json(study: StudyConfig, cells: list[Cell]) -> Path:
    """STUDY/study.json: what the report needs to know about every cell (merged with cells
    written by earlier launches of other sizes or corpora)."""
    import json

    from megatron_cpt.models.qwen2 import ModelConfig

    out = study.study_dir / "study.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    by_name = {f"{c['size']}/{c['cell']}": c for c in old.get("cells", [])}
    sizes = dict(old.get("sizes", {}))
    for cell in cells:
        params = ModelConfig.load(cell.size.model).num_parameters()
        by_name[cell.name] = {**cell.describe(), "params": params}
        sizes[cell.size.name] = {"model": cell.size.model, "params": params}
    doc = {"name": study.name, "config": str(study.path), "domains": study.domains,
           "controls": study.controls, "budget": study.budget, "sizes": sizes,
           "recommend": study.recommend,
           "primary_formulation": {"mode": study.eval.primary_formulation,
                                   "cf_below_params": study.eval.cf_below_params},
           "cells": sorted(by_name.values(), key=lambda c: (c["size"], c["cell"]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return out
