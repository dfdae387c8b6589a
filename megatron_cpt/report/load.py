"""Read a study folder (``study.json`` + ``runs/<size>/<cell>/eval``) into dataclasses.

Everything downstream works on these in-memory objects, so tests can build studies without
disk and the analysis never touches file formats. Nothing here raises on a partial study:
what is absent is recorded in ``Study.missing`` (and ``Study.notes``) for the report, and an
eval file that cannot be read in ``Study.skipped`` (the CLI names those on stderr; ``--strict``
refuses them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_cpt.errors import UsageError
from megatron_cpt.run_folder import EVAL_DIR, RunFolder

GENERAL = "general"
CONTROL_PREFIX = "control_"


def score_metric(exam: str) -> str:
    """The accuracy the report selects and compares on: ``acc`` for MCF exams (the letters all
    have one character, so ``acc_norm`` is the same), ``acc_norm`` for CF exams (``<exam>_cf``:
    per-character normalisation, as OLMES scores CF; raw sums would favour short answers)."""
    return "acc_norm" if exam.endswith("_cf") else "acc"


def ppl_metric(exam: str) -> str:
    """The answer perplexity the report shows: of the letter for MCF; per token of the answer
    text for CF (``answer_ppl_tok``, native backend), since the whole text's perplexity grows
    with its length and is not comparable across questions."""
    return "answer_ppl_tok" if exam.endswith("_cf") else "answer_ppl"


@dataclass
class Point:
    """One scored checkpoint (iteration 0 = the base model)."""

    iteration: int
    tokens: float
    flops: float
    exams: dict[str, dict[str, dict[str, float]]]  # exam -> split -> {acc, acc_norm, answer_ppl, n}
    valid: dict[str, float]  # validation set name -> mean loss


@dataclass
class Run:
    """One cell's training run with its scored points, sorted by compute."""

    size: str
    cell: str  # general | <domain> | control_<domain>
    kind: str  # general | domain | control
    domain: str | None  # None for the general cell
    run_dir: Path
    params: float | None = None
    points: list[Point] = field(default_factory=list)
    general_fraction: float | None = None  # share of general data in the blend (replay cells)
    # task (e.g. mcpt_legal_val) -> [n_points, n_questions] of 1.0 / 0.0 / NaN (not scored),
    # columns aligned with Study.question_ids[task]
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.size}/{self.cell}"

    @property
    def flops(self) -> np.ndarray:
        return np.array([p.flops for p in self.points], dtype=float)

    @property
    def tokens(self) -> np.ndarray:
        return np.array([p.tokens for p in self.points], dtype=float)

    @property
    def iterations(self) -> list[int]:
        return [p.iteration for p in self.points]

    def exam(self, exam: str, split: str, metric: str | None = None) -> np.ndarray:
        """``metric`` (default: the exam's score, see ``score_metric``) of ``exam``/``split``
        per point; NaN where not scored."""
        metric = metric or score_metric(exam)
        out = []
        for p in self.points:
            v = p.exams.get(exam, {}).get(split, {}).get(metric)
            out.append(float(v) if isinstance(v, (int, float)) else np.nan)
        return np.array(out, dtype=float)

    def valid(self, name: str) -> np.ndarray:
        return np.array([p.valid.get(name, np.nan) for p in self.points], dtype=float)


@dataclass
class Study:
    name: str
    root: Path
    runs: dict[str, Run]  # "size/cell" -> Run (only runs whose folder exists)
    sizes: dict[str, float | None]  # size -> parameters (None: unknown), smallest first
    domains: list[str]
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    question_ids: dict[str, list[str]] = field(default_factory=dict)
    controls: list[str] = field(default_factory=list)  # domains with a control_<domain> cell
    primary: dict = field(default_factory=dict)  # study.json primary_formulation setting
    chance: dict[str, float] = field(default_factory=dict)  # task -> mean 1 / choices
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable eval file -> why
    recommend: dict = field(default_factory=dict)  # study.json recommend: {general_loss_increase}

    def run(self, size: str, cell: str) -> Run | None:
        return self.runs.get(f"{size}/{cell}")


REPLAY = re.compile(r"^(?P<domain>.+)_replay(?P<pct>\d+(?:p\d+)?)$")


def kind_of(cell: str) -> tuple[str, str | None]:
    if cell == GENERAL:
        return "general", None
    if cell.startswith(CONTROL_PREFIX):
        return "control", cell[len(CONTROL_PREFIX):]
    if m := REPLAY.match(cell):
        return "replay", m.group("domain")
    return "domain", cell


def general_fraction(cell: str, kind: str) -> float | None:
    """Share of general data in a cell's training blend: 1 general, 0 domain, the declared
    fraction of a replay cell (read from its name, ``legal_replay25`` -> 0.25); None: control
    (general data, size-matched to a domain: not on the mixture axis)."""
    if kind == "replay" and (m := REPLAY.match(cell)):
        return float(m.group("pct").replace("p", ".")) / 100
    return {"general": 1.0, "domain": 0.0}.get(kind)


def size_key(size: str, params: float | None) -> tuple:
    """Order sizes by parameters, else by the number in the name (``500m`` < ``1.5b``)."""
    if params:
        return (0, float(params), size)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)", size.lower())
    if m is None:  # no number in the name: after every sized one, by name
        return (1, 0.0, size)
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    return (0, float(m.group(1)) * scale, size)


def _params_from_config(run_dir: Path, notes: list[str]) -> float | None:
    """Parameters of the run's pretrained checkpoint (``model.pretrained`` in config.yaml)."""
    run = RunFolder(run_dir)
    if not run.config_path.is_file():
        return None
    try:
        cfg = run.config_dict()
        pretrained = (cfg.get("model") or {}).get("pretrained")
        if not pretrained:
            return None
        path = Path(pretrained)
        path = path if path.is_absolute() else run_dir / path
        from megatron_cpt.checkpoint import store

        return float(store.read_model_config(path).num_parameters())
    except Exception as exc:  # noqa: BLE001 - unknown params only skip the fits
        notes.append(f"{run_dir}: parameters unknown ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''})")
        return None


def _read_points(run_dir: Path, notes: list[str], skipped: dict[str, str]
                 ) -> tuple[list[Point], dict[int, Path]]:
    points, questions = [], {}
    run = RunFolder(run_dir)
    for file_it, f in run.eval_results().items():
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"{f}: unreadable ({exc}); skipped")
            skipped[str(f)] = str(exc)
            continue
        it = int(rec.get("iteration", file_it))
        valid = {k: float(v["loss"]) for k, v in (rec.get("valid") or {}).items()
                 if isinstance(v, dict) and isinstance(v.get("loss"), (int, float))}
        points.append(Point(it, float(rec.get("tokens") or 0.0), float(rec.get("flops") or 0.0),
                            rec.get("exams") or {}, valid))
        qf = run.eval_questions(file_it)
        if qf.is_file():
            questions[it] = qf
    points.sort(key=lambda p: (p.flops, p.iteration))
    return points, questions


def _read_correct(qfiles: dict[int, Path], splits: tuple[str, ...],
                  choices: dict | None = None) -> dict[int, dict[str, dict]]:
    """iteration -> task -> {question id: 1.0/0.0}; a question is correct when
    argmax(logliks) == answer (first index on ties, as the lm-eval task does), the
    log-likelihoods divided by the choices' characters where the record has ``chars`` (CF,
    matching ``score_metric``). Fills
    ``choices`` with task -> {question id: number of choices}."""
    out: dict[int, dict[str, dict]] = {}
    for it, path in qfiles.items():
        per_task: dict[str, dict] = {}
        with path.open() as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                task = rec.get("task", "")
                if not task.endswith(tuple(f"_{s}" for s in splits)):
                    continue
                lls = rec.get("logliks") or []
                if not lls:
                    continue
                if rec.get("chars"):
                    lls = [ll / c for ll, c in zip(lls, rec["chars"])]
                per_task.setdefault(task, {})[str(rec["id"])] = float(
                    int(np.argmax(lls)) == int(rec["answer"]))
                if choices is not None:
                    choices.setdefault(task, {})[str(rec["id"])] = len(lls)
        out[it] = per_task
    return out


def _cells_from_json(root: Path, spec: dict) -> list[dict]:
    cells = []
    for c in spec.get("cells") or []:
        size, cell = str(c["size"]), str(c["cell"])
        kind, dom = kind_of(cell)
        kind = c.get("kind", kind)
        cells.append({"size": size, "cell": cell, "kind": kind,
                      "domain": c.get("domain", dom) if kind != "general" else None,
                      "params": c.get("params"),
                      "general_fraction": c.get("general_fraction", general_fraction(cell, kind)),
                      "run_dir": root / c.get("run_dir", f"runs/{size}/{cell}")})
    return cells


def _discover(root: Path) -> tuple[dict, list[dict], list[str]]:
    """study.json (when readable) and its cells, else the cells found under runs/."""
    spec: dict = {}
    notes: list[str] = []
    if (root / "study.json").is_file():
        try:
            spec = json.loads((root / "study.json").read_text())
        except ValueError as exc:
            notes.append(f"study.json unreadable ({exc}); cells discovered from runs/")
    if spec.get("cells"):
        cells = _cells_from_json(root, spec)
    else:
        cells = []
        for d in sorted((root / "runs").glob("*/*")):
            if d.is_dir():
                kind, dom = kind_of(d.name)
                cells.append({"size": d.parent.name, "cell": d.name, "kind": kind,
                              "domain": dom, "params": None, "run_dir": d,
                              "general_fraction": general_fraction(d.name, kind)})
    if not any(Path(c["run_dir"]).is_dir() for c in cells):
        raise UsageError(f"{root} has no runs (expected runs/<size>/<cell>/ folders"
                         f"{' or the run_dir of study.json cells' if spec.get('cells') else ''})")
    return spec, cells, notes


def study_runs(root: Path) -> tuple[str, list[Path]]:
    """The study's name (as :func:`load_study` names it) and its run folders, without reading
    any evaluation: what ``report --log-to`` checks its settings against before the report."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"study folder {root} does not exist")
    spec, cells, _ = _discover(root)
    return str(spec.get("name") or root.name), [Path(c["run_dir"]) for c in cells]


def _read_runs(cells: list[dict], size_params: dict, missing: list[str], notes: list[str],
               skipped: dict[str, str]) -> tuple[dict[str, Run], dict[str, dict[int, Path]]]:
    """Each cell's run with its scored points; fills ``size_params`` from the runs' configs."""
    runs: dict[str, Run] = {}
    qfiles: dict[str, dict[int, Path]] = {}
    for c in cells:
        size_params.setdefault(c["size"], None)
        rd = Path(c["run_dir"])
        key = f"{c['size']}/{c['cell']}"
        if not rd.is_dir():
            missing.append(f"{key}: run folder {rd} not found")
            continue
        params = c["params"] or size_params.get(c["size"])
        if params is None:
            params = _params_from_config(rd, notes)
        if params is not None and size_params.get(c["size"]) is None:
            size_params[c["size"]] = float(params)
        points, qf = _read_points(rd, notes, skipped)
        if not points:
            missing.append(f"{key}: no evaluations (no {EVAL_DIR}/<iteration>.json)")
        elif all(p.iteration == 0 for p in points):
            missing.append(f"{key}: only the base model (iteration 0) is scored")
        if points and len(qf) < len(points):
            notes.append(f"{key}: per-question records missing for "
                         f"{len(points) - len(qf)} of {len(points)} scored points "
                         "(those points are left out of bootstrap replicates)")
        runs[key] = Run(c["size"], c["cell"], c["kind"], c["domain"], rd,
                        float(params) if params else None, points, c.get("general_fraction"))
        qfiles[key] = qf
    return runs, qfiles


def _align_correct(runs: dict[str, Run], qfiles: dict[str, dict[int, Path]],
                   splits: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Per-question correctness aligned on one id list per task, shared by every run.
    Returns the id lists and each task's chance accuracy (mean 1 / choices)."""
    n_choices: dict[str, dict] = {}
    correct = {key: _read_correct(qf, splits, n_choices) for key, qf in qfiles.items()}
    ids: dict[str, set] = {}
    for per_it in correct.values():
        for per_task in per_it.values():
            for task, recs in per_task.items():
                ids.setdefault(task, set()).update(recs)
    question_ids = {t: sorted(v) for t, v in sorted(ids.items())}
    for key, run in runs.items():
        for task, tids in question_ids.items():
            col = {q: j for j, q in enumerate(tids)}
            mat = np.full((len(run.points), len(tids)), np.nan)
            seen = False
            for i, p in enumerate(run.points):
                recs = correct[key].get(p.iteration, {}).get(task)
                if recs:
                    seen = True
                    for q, v in recs.items():
                        mat[i, col[q]] = v
            if seen:
                run.correct[task] = mat
    chance = {t: float(np.mean([1.0 / k for k in per_q.values()]))
              for t, per_q in n_choices.items()}
    return question_ids, chance


def load_study(root: Path, splits: tuple[str, ...] = ("val",)) -> Study:
    """Read ``root``. Raises UsageError only when it does not exist or holds no runs at all.
    Per-question records are read for the exam ``splits`` the bootstrap resamples."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"study folder {root} does not exist")
    spec, cells, notes = _discover(root)
    missing: list[str] = []
    size_params: dict[str, float | None] = {}
    for size, v in (spec.get("sizes") or {}).items():
        size_params[str(size)] = (v or {}).get("params") if isinstance(v, dict) else None
    skipped: dict[str, str] = {}
    runs, qfiles = _read_runs(cells, size_params, missing, notes, skipped)

    domains = list(spec.get("domains") or [])
    for c in cells:
        if c["domain"] and c["domain"] not in domains:
            domains.append(c["domain"])
    controls = set(spec.get("controls") or []) | {
        c["domain"] for c in cells if c["kind"] == "control"}
    sizes = dict(sorted(size_params.items(), key=lambda kv: size_key(kv[0], kv[1])))
    declared = {f"{c['size']}/{c['cell']}" for c in cells}
    for size in sizes:
        expected = [GENERAL] + domains + [f"{CONTROL_PREFIX}{d}" for d in domains if d in controls]
        for cell in expected:
            if f"{size}/{cell}" not in declared:
                missing.append(f"{size}/{cell}: cell not in the study")
        if sizes[size] is None:
            notes.append(f"size {size}: parameters unknown (no study.json params, no readable "
                         "model.pretrained); left out of fits across sizes")
    question_ids, chance = _align_correct(runs, qfiles, splits)
    return Study(str(spec.get("name") or root.name), root, runs, sizes, domains, missing,
                 notes, question_ids, sorted(controls), spec.get("primary_formulation") or {},
                 chance, skipped, dict(spec.get("recommend") or {}))
