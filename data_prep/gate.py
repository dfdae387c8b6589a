"""The per-document stages that run before decontamination and classification.

Order: deduplication (decided beforehand over the whole corpus, see ``data_prep.dedup``),
language identification, then each enabled quality rule. The first stage that rejects a
document names its drop reason. ``Gate`` also keeps what the report needs: documents and
UTF-8 bytes into each stage, per-language counts, and CPU seconds per stage (documents/s
per core = documents / seconds, as every task runs on one core).
"""
from __future__ import annotations

import time

from data_prep import language as lid
from data_prep import quality


class Gate:
    def __init__(self, dedup_decisions: dict | None, rank: int, lang_cfg: lid.LanguageConfig,
                 quality_cfg: quality.QualityConfig, text_field: str):
        self.dups = (dedup_decisions or {}).get("per_unit", {}).get(str(rank), {})
        self.dedup_on = dedup_decisions is not None
        self.lang_cfg = lang_cfg
        self.lang_on = lang_cfg.code is not None
        self.rules = quality_cfg.build()
        self.text_field = text_field
        self.index = 0  # readable records seen in this unit (the dedup pass numbers them alike)
        self.languages: dict[str, int] = {}
        self.stages: dict[str, dict] = {}
        self.dropped_bytes: dict[str, int] = {}

    def _stage(self, name: str, nbytes: int, seconds: float, documents: int = 1) -> None:
        s = self.stages.setdefault(name, {"documents": 0, "bytes": 0, "seconds": 0.0})
        s["documents"] += documents
        s["bytes"] += nbytes
        s["seconds"] += seconds

    def timed(self, name: str, recs: list, fn):
        """``fn()`` timed as stage ``name`` over ``recs`` (for the batched stages after the gate)."""
        t = time.process_time()
        out = fn()
        self._stage(name, sum(r.nbytes for r in recs), time.process_time() - t, len(recs))
        return out

    def check(self, rec) -> tuple[str, str] | None:
        """(drop reason, detail) for ``rec``, or None to keep it (its text may be rewritten by C4)."""
        i, self.index = self.index, self.index + 1
        verdict = self._run(rec, i)
        if verdict:
            self.dropped_bytes[verdict[0]] = self.dropped_bytes.get(verdict[0], 0) + rec.nbytes
        return verdict

    def _run(self, rec, i: int) -> tuple[str, str] | None:
        if self.dedup_on:
            self._stage("dedup", rec.nbytes, 0.0)  # timed in the signature pass
            dup = self.dups.get(str(i))
            if dup:
                return dup[0], f"{rec.id} ~ {dup[1]}"
        if self.lang_on:
            t = time.process_time()
            ok, lang, prob = lid.keep(self.lang_cfg, rec.text)
            self._stage("language", rec.nbytes, time.process_time() - t)
            self.languages[lang] = self.languages.get(lang, 0) + 1
            if not ok:
                return "language", f"{rec.id}: {lang} p={prob:.2f}"
        return self._quality(rec)

    def _quality(self, rec) -> tuple[str, str] | None:
        if not self.rules:
            return None
        from datatrove.data import Document

        doc = Document(text=rec.text, id=rec.id)
        for name, flt in self.rules:
            t = time.process_time()
            hit = quality.check([(name, flt)], doc)
            self._stage(name, rec.nbytes, time.process_time() - t)
            if hit:
                return hit[0], f"{rec.id}: {hit[1]}"
        if doc.text != rec.text:  # C4 removed lines
            rec.text = doc.text
            rec.nbytes = len(doc.text.encode("utf-8"))
            if rec.raw is not None:
                rec.raw[self.text_field] = doc.text
        return None

    def stats(self) -> dict:
        return {"languages": self.languages, "stages": self.stages, "dropped_bytes": self.dropped_bytes}
