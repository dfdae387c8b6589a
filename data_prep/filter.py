"""``megatron-cpt prep filter``: classify, decontaminate and split a web corpus into the study's corpora.

Outputs under ``output`` (JSONL, one object per document: the input record plus ``id``,
``domain_probs`` and ``n_tokens``):

* ``<domain>/data.jsonl`` — documents with P(domain) >= the domain's threshold;
* ``general/data.jsonl`` — the unfiltered stream (optionally a uniform random subsample
  reaching ``general.token_target`` tokens);
* ``control_<domain>/data.jsonl`` — a uniform random sample of the unfiltered stream with the
  same token count as ``<domain>`` (overshoot smaller than one document);
* ``filter_report.json`` — documents/tokens in, per output and per threshold, drops per
  reason, and every decontaminated document with the exam item it matched.

Before that, in this order and each switchable: exact + MinHash deduplication (a first pass over
the whole corpus, ``data_prep.dedup``), language identification (``data_prep.language``) and
datatrove's Gopher / C4 rules (``data_prep.quality``), run per document by ``data_prep.gate``.
``prep_report.{json,md}`` and ``funnel.png`` (``data_prep.report``) summarize the run.

Contaminated documents are removed before classification, so from every output. Work is
split into datatrove tasks per input unit; the merge is sequential and seeded, so outputs
are identical whatever the number of tasks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import numpy as np

from data_prep import report as run_report
from data_prep.dedup import DedupConfig, load_decisions
from data_prep.executor import ExecutorConfig, UnitStep, run_units
from data_prep.io import DEFAULT_UNIT_BYTES, DropCounter, RecordReader, expand_inputs, line_offsets, plan_units
from data_prep.language import LanguageConfig
from data_prep.quality import QualityConfig
from megatron_cpt.config_loader import YamlDoc, build, read_yaml
from megatron_cpt.config_ranges import ranged, unbounded
from megatron_cpt.errors import UsageError

DEFAULT_SWEEP = (0.3, 0.5, 0.7, 0.9)
_FLAGS = {"kind": "executor"}  # executor keys whose `prep filter` option has another name


@dataclasses.dataclass
class FilterConfig:
    inputs: list[str]
    output: str
    classifier: str
    thresholds: dict[str, float]
    text_field: str = "text"
    id_field: str = "id"
    threshold_sweep: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_SWEEP))
    exam_files: list[str] = dataclasses.field(default_factory=list)
    ngram: int = 13
    tokenizer: str | None = None  # count tokens with this tokenizer (EOD included); None: words
    general_token_target: int | None = None
    controls: bool = True
    seed: int = 0
    unit_bytes: int = DEFAULT_UNIT_BYTES
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict | None = None,
                  executor: dict | None = None) -> "FilterConfig":
        """Read a filter YAML (see configs/data/sample.yaml); ``overrides`` replace top-level
        keys and ``executor`` executor keys (both from the CLI) before anything is validated."""
        if not os.path.isfile(path):
            raise UsageError(f"config {path!r} not found: pass --config configs/data/<name>.yaml")
        doc = read_yaml(path, "filter config")
        if not isinstance(doc.data, dict):
            raise doc.error((), "a filter config must be a mapping")
        for key, value in (overrides or {}).items():
            doc.override((key,), value, f"command line `--{key} {value}`")
        if executor:
            ex = doc.data.get("executor") or {}
            doc.data["executor"] = {"kind": ex} if isinstance(ex, str) else ex
            for key, value in executor.items():
                doc.override(("executor", key), value, f"command line `--{_FLAGS.get(key, key)} {value}`")
        return cls.from_dict(doc.data, doc)

    @classmethod
    def from_dict(cls, raw: dict, doc: YamlDoc | None = None) -> "FilterConfig":
        raw = dict(raw)
        if isinstance(raw.get("inputs"), str):
            raw["inputs"] = [raw["inputs"]]
        if isinstance(raw.get("executor"), str):
            raw["executor"] = {"kind": raw["executor"]}
        f = build(_FilterFile, raw, doc)
        doc = doc or YamlDoc(raw)
        for key in ("inputs", "output", "classifier", "domains"):
            if not getattr(f, key):
                raise doc.error((), f"no `{key}:` entry: add it (see configs/data/sample.yaml)")
        thresholds = {}
        for d, v in f.domains.items():
            t = v.get("threshold") if isinstance(v, dict) else v
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
                raise doc.error(("domains", d), f"threshold for {d!r} is {t!r}; use a probability in [0, 1]")
            thresholds[str(d)] = float(t)
        ex = f.executor
        if f.workers is not None:
            ex = dataclasses.replace(ex, workers=f.workers)  # re-validated in __post_init__
        stages = {"dedup": DedupConfig.from_raw(f.dedup, doc.where(("dedup",))),
                  "language": LanguageConfig.from_raw(f.language, doc.where(("language",))),
                  "quality": QualityConfig.from_raw(f.quality, doc.where(("quality",)))}
        return cls(inputs=f.inputs, output=f.output, classifier=f.classifier, thresholds=thresholds,
                   text_field=f.text_field, id_field=f.id_field, threshold_sweep=f.threshold_sweep,
                   exam_files=f.decontamination.exam_files, ngram=f.decontamination.ngram,
                   tokenizer=f.token_count.tokenizer, general_token_target=f.general.token_target,
                   controls=f.control.enabled, seed=f.seed, unit_bytes=f.unit_bytes, executor=ex,
                   **stages)


@dataclasses.dataclass
class _Decontamination:
    exam_files: list[str] = dataclasses.field(default_factory=list)
    ngram: int = ranged(13, 1)


@dataclasses.dataclass
class _TokenCount:
    tokenizer: str | None = None


@dataclasses.dataclass
class _General:
    token_target: int | None = ranged(None, 1)


@dataclasses.dataclass
class _Control:
    enabled: bool = True


@dataclasses.dataclass
class _FilterFile:
    """A filter YAML as written; FilterConfig.from_dict flattens it."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    output: str = ""
    classifier: str = ""
    domains: dict[str, Any] = dataclasses.field(default_factory=dict)  # name: threshold | {threshold: t}
    name: str = ""
    text_field: str = "text"
    id_field: str = "id"
    threshold_sweep: list[float] = ranged(lo=0, hi=1, default_factory=lambda: list(DEFAULT_SWEEP))
    decontamination: _Decontamination = dataclasses.field(default_factory=_Decontamination)
    token_count: _TokenCount = dataclasses.field(default_factory=_TokenCount)
    general: _General = dataclasses.field(default_factory=_General)
    control: _Control = dataclasses.field(default_factory=_Control)
    seed: int = ranged(0, 0)
    unit_bytes: int = ranged(DEFAULT_UNIT_BYTES, 1)
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    # checked by their own modules (data_prep/dedup.py, language.py, quality.py)
    dedup: Any = None
    language: Any = None
    quality: Any = None
    workers: int | None = ranged(None, -1)   # shorthand for executor.workers
    tasks: int | None = unbounded(None)      # ignored: tasks = number of input units (set by unit_bytes)


class FilterStep(UnitStep):
    name = "classify+decontaminate"

    def __init__(self, units, work_dir, cfg: FilterConfig, classifier, exam_index, tokenizer, progress=False):
        super().__init__(units, work_dir)
        self.progress = progress
        self.cfg = cfg
        self.classifier = classifier
        self.exam_index = exam_index
        self.tokenizer = tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t.split()) for t in texts]
        return [len(ids) + 1 for ids in self.tokenizer.encode_batch(texts)]  # + EOD

    def process(self, unit, rank: int) -> None:
        from data_prep.gate import Gate

        cfg = self.cfg
        gate = Gate(load_decisions(self.work_dir), rank, cfg.language, cfg.quality, cfg.text_field)
        drops = DropCounter()
        reader = RecordReader(cfg.text_field, cfg.id_field, keep_raw=True)
        base = self.shard_path(rank)
        domains = list(cfg.thresholds)
        removed, tokens, probs, clean_bytes = [], [], [], [0]
        outs = {d: open(f"{base}.{d}.jsonl", "w", encoding="utf-8") for d in domains}
        all_out = open(f"{base}.all.jsonl", "w", encoding="utf-8")
        batch: list = []

        def flush():
            clean = []
            hits = gate.timed("decontaminate", batch, lambda: [self.exam_index.match(r.text) if self.exam_index
                                                               else None for r in batch])
            for rec, hit in zip(batch, hits):
                if hit:
                    drops.add("contaminated", unit.path, rec.line, f"{rec.id} ~ {hit[0]}")
                    removed.append({"id": rec.id, "exam_item": hit[0], "ngram": hit[1],
                                    "file": unit.path, "line": rec.line,
                                    **self.exam_index.item_info.get(hit[0], {})})
                    gate.dropped_bytes["contaminated"] = gate.dropped_bytes.get("contaminated", 0) + rec.nbytes
                else:
                    clean.append(rec)
            ps = gate.timed("classify", clean, lambda: self.classifier.probs_batch([r.text for r in clean]))
            ns = gate.timed("count_tokens", clean, lambda: self.count_tokens([r.text for r in clean]))
            for rec, p, n in zip(clean, ps, ns):
                obj = dict(rec.raw)
                obj[cfg.id_field] = rec.id
                obj["domain_probs"] = p
                obj["n_tokens"] = n
                line = json.dumps(obj, ensure_ascii=False) + "\n"
                all_out.write(line)
                for d in domains:
                    if p.get(d, 0.0) >= cfg.thresholds[d]:
                        outs[d].write(line)
                tokens.append(n)
                clean_bytes[0] += rec.nbytes
                probs.append([p.get(d, 0.0) for d in domains])
            batch.clear()

        from tqdm import tqdm

        with tqdm(desc=f"filter task {rank}", unit=" docs", disable=not self.progress, position=rank % 8,
                  leave=False, mininterval=1.0) as bar:
            for rec in reader.read(unit, drops):
                verdict = gate.check(rec)
                if verdict:
                    drops.add(verdict[0], unit.path, rec.line, verdict[1])
                    continue
                batch.append(rec)
                if len(batch) >= 512:
                    bar.update(len(batch))
                    flush()
            bar.update(len(batch))
            flush()
        for fh in [*outs.values(), all_out]:
            fh.close()
        np.savez(f"{base}.meta.npz", tokens=np.asarray(tokens, dtype=np.int64),
                 probs=np.asarray(probs, dtype=np.float32).reshape(len(tokens), len(domains)))
        with open(f"{base}.json", "w") as fh:
            json.dump({"unit": unit.to_dict(), "lines": reader.lines, "documents": len(tokens),
                       "dropped": drops.to_dict(), "removed": removed, "gate": gate.stats(),
                       "clean_bytes": clean_bytes[0]}, fh)


def _sample_to_tokens(tokens: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random documents (without replacement) until their tokens reach ``target``.

    Returns a boolean mask. The sum exceeds ``target`` by less than the last document drawn.
    """
    mask = np.zeros(len(tokens), dtype=bool)
    if target <= 0 or len(tokens) == 0:
        return mask
    order = rng.permutation(len(tokens))
    csum = np.cumsum(tokens[order])
    k = int(np.searchsorted(csum, target, side="left")) + 1
    mask[order[:min(k, len(order))]] = True
    return mask


class _FilterMerge:
    def __init__(self, cfg: FilterConfig, units, work_dir, files, classifier_labels, started, progress=True):
        self.__dict__.update(cfg=cfg, units=units, work_dir=work_dir, files=files,
                             classifier_labels=classifier_labels, started=started, progress=progress)

    def _concat(self, parts: list[str], dst: str, mask: np.ndarray | None = None) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        i = 0
        with open(dst, "w", encoding="utf-8") as out:
            for p in parts:
                with open(p, encoding="utf-8") as fh:
                    if mask is None:
                        shutil.copyfileobj(fh, out, 1 << 22)
                        continue
                    for line in fh:
                        if mask[i]:
                            out.write(line)
                        i += 1

    def __call__(self):
        from tqdm import tqdm

        cfg = self.cfg
        domains = list(cfg.thresholds)
        shards = [os.path.join(self.work_dir, "shards", f"{r:05d}") for r in range(len(self.units))]
        stats = []
        for s in shards:
            with open(s + ".json") as fh:
                stats.append(json.load(fh))
        drops = DropCounter()
        removed = []
        for st, off in zip(stats, line_offsets(self.units, [st["lines"] for st in stats])):
            drops.merge(st["dropped"], off)
            for r in st["removed"]:
                r = dict(r)
                r["line"] += off.get(r["file"], 0)
                removed.append(r)
        metas = [np.load(s + ".meta.npz") for s in shards]
        tokens = np.concatenate([m["tokens"] for m in metas]) if metas else np.zeros(0, np.int64)
        probs = np.concatenate([m["probs"] for m in metas]) if metas else np.zeros((0, len(domains)), np.float32)
        docs_in = sum(st["lines"] for st in stats)
        out = os.path.abspath(cfg.output)
        outputs: dict[str, dict] = {}
        steps = [*domains, "general"] + ([f"control_{d}" for d in domains] if cfg.controls else [])
        bar = tqdm(total=len(steps), desc="write outputs", disable=not self.progress, leave=False)
        all_parts = [s + ".all.jsonl" for s in shards]
        for j, d in enumerate(domains):
            sel = probs[:, j] >= cfg.thresholds[d]
            self._concat([f"{s}.{d}.jsonl" for s in shards], os.path.join(out, d, "data.jsonl"))
            outputs[d] = {"documents": int(sel.sum()), "tokens": int(tokens[sel].sum()),
                          "threshold": cfg.thresholds[d]}
            bar.update()
        gen_mask = None
        if cfg.general_token_target:
            gen_mask = _sample_to_tokens(tokens, int(cfg.general_token_target),
                                         np.random.default_rng([cfg.seed, 0]))
        self._concat(all_parts, os.path.join(out, "general", "data.jsonl"), gen_mask)
        g = gen_mask if gen_mask is not None else np.ones(len(tokens), dtype=bool)
        outputs["general"] = {"documents": int(g.sum()), "tokens": int(tokens[g].sum()),
                              "token_target": cfg.general_token_target}
        bar.update()
        if cfg.controls:
            for j, d in enumerate(domains):
                target = outputs[d]["tokens"]
                mask = _sample_to_tokens(tokens, target, np.random.default_rng([cfg.seed, 1 + j]))
                self._concat(all_parts, os.path.join(out, f"control_{d}", "data.jsonl"), mask)
                outputs[f"control_{d}"] = {"documents": int(mask.sum()), "tokens": int(tokens[mask].sum()),
                                           "token_target": target, "matches": d}
                bar.update()
        bar.close()
        sweep = sorted(set(cfg.threshold_sweep) | set(cfg.thresholds.values()))
        per_threshold = {d: [{"threshold": t, "documents": int((probs[:, j] >= t).sum()),
                              "tokens": int(tokens[probs[:, j] >= t].sum())} for t in sweep]
                         for j, d in enumerate(domains)}
        report = {
            "documents_in": docs_in,
            "documents_clean": int(len(tokens)),
            "tokens_clean": int(tokens.sum()),
            "token_unit": "tokenizer (EOD included)" if cfg.tokenizer else "whitespace words",
            "dropped": drops.to_dict()["counts"],
            "dropped_examples": drops.to_dict()["examples"],
            "outputs": outputs,
            "per_threshold": per_threshold,
            "decontamination": {"exam_files": cfg.exam_files, "ngram": cfg.ngram,
                                "removed": removed},
            "classifier": {"path": os.path.abspath(cfg.classifier), "labels": list(self.classifier_labels)},
            "inputs": self.files,
            "config": _jsonable(dataclasses.asdict(cfg)),
            "seconds": round(time.time() - self.started, 3),
        }
        if docs_in != len(tokens) + drops.total:
            raise RuntimeError("document accounting mismatch in filter (this is a bug)")
        report.update(run_report.pipeline_section(cfg, stats, load_decisions(self.work_dir)))
        with open(os.path.join(out, "filter_report.json"), "w") as fh:
            json.dump(report, fh, indent=2)
        run_report.write(out, report)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


class _FilterStage:
    """Picklable: the classify+decontaminate pass and its merge (locally, or submitted to SLURM)."""

    def __init__(self, step, n_tasks, executor, logs, merge):
        self.step, self.n_tasks, self.executor, self.logs, self.merge = step, n_tasks, executor, logs, merge

    def __call__(self) -> bool:
        # run by the dedup merge job on SLURM (an array task): datatrove would take this
        # submission for a task of its own while SLURM_ARRAY_TASK_ID is set
        saved = {k: os.environ.pop(k) for k in ("SLURM_ARRAY_TASK_ID", "RUN_OFFSET") if k in os.environ}
        try:
            return run_units(self.step, self.n_tasks, self.executor, self.logs, merge_fn=self.merge)
        finally:
            os.environ.update(saved)


def run_filter(cfg: FilterConfig, progress: bool = True) -> dict | None:
    from data_prep.classifier import DomainClassifier
    from data_prep.decontam import ExamIndex
    from data_prep.text_tokenizer import TextTokenizer

    started = time.time()
    files = expand_inputs(cfg.inputs)
    clf = DomainClassifier(cfg.classifier, require=tuple(cfg.thresholds))
    clf.model  # load now: an unreadable model fails before any work  # noqa: B018
    index = ExamIndex(cfg.exam_files, cfg.ngram) if cfg.exam_files else None
    tok = TextTokenizer(cfg.tokenizer) if cfg.tokenizer else None
    units = plan_units(files, cfg.unit_bytes)
    out = os.path.abspath(cfg.output)
    work_dir = os.path.join(out, ".work")
    if os.path.isdir(work_dir):
        shutil.rmtree(work_dir)
    os.makedirs(work_dir)
    step = FilterStep(units, work_dir, cfg, clf, index, tok, progress=progress)
    merge = _FilterMerge(cfg, units, work_dir, files, clf.labels, started, progress)
    stage = _FilterStage(step, len(units), cfg.executor, os.path.join(out, "logs"), merge)
    if cfg.dedup.enabled:  # dedup pass first; its merge (a SLURM job there) starts the filter pass
        from data_prep.dedup import DedupMerge, SignatureStep

        sigs = SignatureStep(units, work_dir, cfg.dedup, cfg.text_field, cfg.id_field)
        done = run_units(sigs, len(units), cfg.executor, os.path.join(out, "logs", "dedup"),
                         merge_fn=DedupMerge(cfg.dedup, len(units), work_dir, then=stage))
    else:
        done = stage()
    if not done:
        return None
    with open(os.path.join(out, "filter_report.json")) as fh:
        return json.load(fh)


def report_table(report: dict) -> str:
    from data_prep.manifest import format_table

    rows = [{"output": "input", "documents": report["documents_in"], "tokens": report["tokens_clean"],
             "note": f"{sum(report['dropped'].values())} dropped (tokens: clean documents)"}]
    for name, o in report["outputs"].items():
        note = (f"P>={o['threshold']}" if "threshold" in o else
                f"target {o['token_target']}" if o.get("token_target") else "all clean documents")
        rows.append({"output": name, "documents": o["documents"], "tokens": o["tokens"], "note": note})
    lines = [format_table(rows), ""]
    sweep_rows = []
    for d, items in report["per_threshold"].items():
        for it in items:
            sweep_rows.append({"domain": d, "threshold": it["threshold"], "documents": it["documents"],
                               "tokens": it["tokens"]})
    lines += [format_table(sweep_rows), ""]
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k}={v}" for k, v in report["dropped"].items()))
    for r in report["decontamination"]["removed"][:20]:
        lines.append(f"decontaminated: {r['id']} matched exam item {r['exam_item']} ({r['file']}:{r['line']})")
    lines.append(f"token unit: {report['token_unit']}")
    return "\n".join(lines)
