"""Web-scale data preparation: dedup, language, quality rules, split, the run report, equality
with megatron-core's IndexedDatasetBuilder, and dedup + filter + tokenize on a real SLURM."""
from __future__ import annotations

import json
import os
import random
import subprocess
import time

import numpy as np
import pytest
import yaml

from test_data_prep import EOD, SEED, WEB, classifier, run_cli, sha, train_bpe, write_jsonl  # noqa: F401

PT = [
    "O tribunal decidiu que o contrato de compra e venda era nulo, porque faltava a escritura pública "
    "exigida pela lei para imóveis. As partes devem devolver o que receberam e o vendedor responde "
    "pelos prejuízos causados ao comprador de boa-fé.",
    "A paciente chegou ao hospital com febre alta, dor de cabeça e manchas vermelhas na pele. O médico "
    "pediu exames de sangue e recomendou repouso, muita água e acompanhamento diário até a melhora.",
    "O balanço patrimonial da empresa mostra um aumento das dívidas de curto prazo. O contador sugeriu "
    "rever o fluxo de caixa e adiar os investimentos até que as receitas do trimestre se recuperem.",
    "Na reunião de condomínio, os moradores aprovaram a reforma da fachada e a troca dos elevadores. "
    "As obras começam no mês que vem e devem durar cerca de seis meses, segundo o síndico.",
]
ES = ["El tribunal supremo confirmó la sentencia y condenó a la empresa a pagar una indemnización a los "
      "trabajadores despedidos sin causa justificada durante el último año."]
DE = ["Das Gericht hat entschieden, dass der Vermieter die Kaution innerhalb von sechs Monaten nach dem "
      "Ende des Mietverhältnisses zurückzahlen muss, wenn keine Schäden vorliegen."]


def _web_docs(n=120):
    docs = []
    for line in open(WEB, encoding="utf-8"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip() \
                and not str(obj.get("id", "")).startswith("web-leak"):
            docs.append(obj)
    return docs[:n]


def _config(tmp_path, clf_dir, inputs, out, **extra):
    cfg = {"inputs": inputs, "output": out, "classifier": clf_dir,
           "domains": {"legal": 0.5, "medical": 0.5, "accounting": 0.5},
           "executor": {"kind": "local", "workers": 1}, **extra}
    path = tmp_path / f"cfg_{os.path.basename(out)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ids(path):
    return [json.loads(x)["id"] for x in open(path, encoding="utf-8")]


def _edit(text: str, rng: random.Random, n: int) -> str:
    """Replace ``n`` words of ``text`` (an edited copy, as mirrors and boilerplate variants are)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "changed"
    return " ".join(words)


# ------------------------------------------------------------------------------------ dedup
def test_dedup_removes_planted_exact_and_near_duplicates(tmp_path, classifier):  # noqa: F811
    docs = [d for d in _web_docs(200) if len(d["text"].split()) >= 60][:60]
    rng = random.Random(0)
    planted = [{"id": "exact-of-3", "text": docs[3]["text"]},
               {"id": "exact-of-3-again", "text": docs[3]["text"]},
               {"id": "near-of-7", "text": _edit(docs[7]["text"], rng, 1)},
               {"id": "near-of-12", "text": _edit(docs[12]["text"], rng, 2)},
               {"id": "near-of-near-12", "text": _edit(docs[12]["text"], rng, 1)}]
    rows = docs[:30] + planted[:3] + docs[30:] + planted[3:]
    write_jsonl(tmp_path / "a.jsonl", rows[:40])
    write_jsonl(tmp_path / "b.jsonl", rows[40:])
    out = str(tmp_path / "out")
    cfg = _config(tmp_path, classifier[0], [str(tmp_path / "*.jsonl")], out, dedup={"exact": True, "near": True})
    assert run_cli(["filter", "--config", cfg]) == 0
    rep = json.load(open(os.path.join(out, "prep_report.json")))
    assert rep["dropped"] == {"duplicate_exact": 2, "near_duplicate": 3}
    assert _ids(os.path.join(out, "general", "data.jsonl")) == [d["id"] for d in docs]  # distinct docs kept
    clusters = {c["kept"]: sorted(r["id"] for r in c["removed"]) for c in rep["dedup"]["clusters"]["examples"]}
    assert clusters == {docs[3]["id"]: ["exact-of-3", "exact-of-3-again"], docs[7]["id"]: ["near-of-7"],
                        docs[12]["id"]: ["near-of-12", "near-of-near-12"]}
    dedup_row = next(r for r in rep["funnel"] if r["stage"] == "dedup")
    assert (dedup_row["documents_in"], dedup_row["dropped"]) == (len(rows), 5)
    assert rep["documents_in"] == rep["documents_clean"] + sum(rep["dropped"].values())


def test_dedup_decision_is_first_occurrence_and_exact_before_near():
    from data_prep.dedup import decide

    content = np.array([b"a", b"b", b"a", b"c", b"d"], dtype="S16")
    bands = np.array([[1, 2], [3, 4], [1, 2], [9, 4], [7, 8]], dtype=np.uint64)  # c shares a band with b
    reason, keeper = decide(content, bands, np.array([True] * 5), near=True, exact=True)
    assert list(reason) == ["", "", "duplicate_exact", "near_duplicate", ""]
    assert list(keeper) == [0, 1, 0, 1, 4]
    reason, _ = decide(content, bands, np.array([True] * 5), near=False, exact=True)
    assert list(reason) == ["", "", "duplicate_exact", "", ""]
    empty = decide(np.zeros(0, "S16"), np.zeros((0, 2), np.uint64), np.zeros(0, bool), near=True, exact=True)
    assert [len(x) for x in empty] == [0, 0]  # an empty corpus (every record dropped while reading)
    reason, _ = decide(content[:2], bands[[0, 0]], np.array([True, False]), near=True, exact=True)
    assert list(reason) == ["", ""]  # a document too short for MinHash is deduplicated exactly only


# --------------------------------------------------------------------------------- language
def test_language_filter_keeps_only_the_configured_language(tmp_path, classifier):  # noqa: F811
    en = _web_docs(20)
    rows = ([{"id": f"pt-{i}", "text": t} for i, t in enumerate(PT)] + en
            + [{"id": "es-0", "text": ES[0]}, {"id": "de-0", "text": DE[0]}])
    random.Random(1).shuffle(rows)
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = str(tmp_path / "out")
    cfg = _config(tmp_path, classifier[0], [str(tmp_path / "mixed.jsonl")], out,
                  language={"code": "pt", "threshold": 0.5})
    assert run_cli(["filter", "--config", cfg]) == 0
    rep = json.load(open(os.path.join(out, "prep_report.json")))
    assert sorted(_ids(os.path.join(out, "general", "data.jsonl"))) == [f"pt-{i}" for i in range(len(PT))]
    assert rep["languages"] == {"en": len(en), "pt": len(PT), "es": 1, "de": 1}
    assert rep["dropped"] == {"language": len(en) + 2}
    assert sum(rep["languages"].values()) == rep["documents_in"] == rep["documents_clean"] + rep["dropped"]["language"]
    assert "p=" in rep["dropped_examples"]["language"][0]["detail"]


def test_bad_stage_config_exits_2(tmp_path, classifier, capsys):  # noqa: F811
    for extra, needle in (({"language": "xx-klingon"}, "py3langid"), ({"quality": {"c4": {"nope": 1}}}, "quality.c4"),
                          ({"dedup": {"near": True, "bands": 3}}, "dedup")):
        cfg = _config(tmp_path, classifier[0], [WEB], str(tmp_path / "o"), **extra)
        assert run_cli(["filter", "--config", cfg]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------- quality
QUALITY_CASES = {
    "gopher_repetition": "The court will hear the case of the tenant and the owner on Monday morning.\n" * 40,
    "gopher_quality": "Short note, see attached file.",
    "c4": ("The committee met on Tuesday to review the annual budget for the public library. Members agreed "
           "that the children's section needs new shelves and more books in several languages. Lorem ipsum "
           "dolor sit amet was left in the draft by mistake. The final plan will be voted next month."),
}

# thresholds for short planted documents (datatrove's n-gram rules need longer texts)
RULE_OPTS = {"gopher_repetition": {"dup_line_frac": 0.3, "top_n_grams": [], "dup_n_grams": []},
             "gopher_quality": {"min_doc_words": 20}, "c4": {"min_num_sentences": 1}}


def test_each_quality_rule_drops_its_planted_case_with_its_reason(tmp_path, classifier):  # noqa: F811
    good = [d for d in _web_docs(200) if len(d["text"].split()) >= 60][:10]
    rows = good + [{"id": f"bad-{rule}", "text": text} for rule, text in QUALITY_CASES.items()]
    write_jsonl(tmp_path / "q.jsonl", rows)
    out = str(tmp_path / "out")
    assert run_cli(["filter", "--config", _config(tmp_path, classifier[0], [str(tmp_path / "q.jsonl")], out,
                                                   quality=RULE_OPTS)]) == 0
    rep = json.load(open(os.path.join(out, "prep_report.json")))
    assert rep["dropped"] == {rule: 1 for rule in QUALITY_CASES}
    for rule in QUALITY_CASES:
        assert rep["dropped_examples"][rule][0]["detail"].startswith(f"bad-{rule}:")
    assert _ids(os.path.join(out, "general", "data.jsonl")) == [d["id"] for d in good]
    assert [r["stage"] for r in rep["funnel"]] == ["read", "gopher_repetition", "gopher_quality", "c4", "decontaminate"]


@pytest.mark.parametrize("rule", sorted(QUALITY_CASES))
def test_each_quality_rule_is_switchable(rule):
    from datatrove.data import Document

    from data_prep.quality import QualityConfig, check

    for name, text in QUALITY_CASES.items():
        only = QualityConfig.from_raw({rule: RULE_OPTS[rule]}, "test")
        hit = check(only.build(), Document(text=text, id=name))
        assert (hit is not None and hit[0] == rule) == (name == rule), (rule, name, hit)


# ------------------------------------------------------------------------------------ split
def test_split_is_deterministic_disjoint_and_complete(tmp_path, capsys):
    rows = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(500)] + ["{broken", {"text": "  "}]
    write_jsonl(tmp_path / "all.jsonl", rows)
    shuffled = rows[:500]
    random.Random(0).shuffle(shuffled)
    write_jsonl(tmp_path / "s1.jsonl", shuffled[:200])
    write_jsonl(tmp_path / "s2.jsonl", shuffled[200:])
    frac = "train=0.8,valid=0.1,test=0.1"
    assert run_cli(["split", "--input", str(tmp_path / "all.jsonl"), "--output", str(tmp_path / "a"),
                    "--fractions", frac]) == 0
    assert run_cli(["split", "--input", str(tmp_path / "s*.jsonl"), "--output", str(tmp_path / "b"),
                    "--fractions", frac]) == 0
    a = {n: _ids(tmp_path / "a" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    b = {n: _ids(tmp_path / "b" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    assert {n: sorted(v) for n, v in a.items()} == {n: sorted(v) for n, v in b.items()}  # order/file independent
    every = [i for v in a.values() for i in v]
    assert sorted(every) == sorted(f"d{i}" for i in range(500)) and len(set(every)) == 500  # disjoint, complete
    assert 340 < len(a["train"]) < 460 and a["train"] == sorted(a["train"], key=lambda x: int(x[1:]))
    summary = json.load(open(tmp_path / "a" / "split.json"))
    assert summary["dropped"] == {"empty_text": 1, "malformed_json": 1} and summary["documents_in"] == 502
    # a sub-corpus split with the same fractions puts every document in the same split
    write_jsonl(tmp_path / "sub.jsonl", rows[:100])
    assert run_cli(["split", "--input", str(tmp_path / "sub.jsonl"), "--output", str(tmp_path / "c"),
                    "--fractions", frac]) == 0
    assert set(_ids(tmp_path / "c" / "valid.jsonl")) == {i for i in a["valid"] if int(i[1:]) < 100}
    # exact counts; the rest to train
    assert run_cli(["split", "--input", str(tmp_path / "all.jsonl"), "--output", str(tmp_path / "d"),
                    "--counts", "valid=25,test=10"]) == 0
    d = {n: _ids(tmp_path / "d" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    assert (len(d["valid"]), len(d["test"]), len(d["train"])) == (25, 10, 465)
    for bad in (["--fractions", "train=0.5,valid=0.1"], ["--counts", "valid=600"], ["--fractions", "train"]):
        assert run_cli(["split", "--input", str(tmp_path / "all.jsonl"), "--output", str(tmp_path / "e"), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------- equality with megatron-core
def test_tokenize_is_byte_identical_to_megatron_indexed_dataset_builder(tmp_path):
    """Same token ids through megatron-core's own writer (the one Megatron-LM's
    tools/preprocess_data.py uses) give the same bytes; empty and whitespace-only documents are
    dropped and counted by `prep tokenize` (see docs/data_prep.md for what Megatron-LM does)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from data_prep.text_tokenizer import TextTokenizer

    texts = [json.loads(line)["text"] for line in open(SEED, encoding="utf-8")][:150]
    tok_dir = train_bpe(str(tmp_path / "bpe"), texts)
    docs = texts[:60] + ["", "   ", "\n\t \n", "é", "a\u00a0b"] + texts[60:]
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"x{i}", "text": t} for i, t in enumerate(docs)])
    prefix = str(tmp_path / "ours")
    assert run_cli(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", tok_dir,
                    "--output-prefix", prefix, "--workers", "2", "--unit-mb", "0.01"]) == 0
    tok = TextTokenizer(tok_dir)
    kept = [t for t in docs if t.strip()]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=tok.dtype)
    for ids in tok.encode_batch(kept):
        builder.add_document(np.array(ids + [tok.eod_id], dtype=tok.dtype), [len(ids) + 1])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert sha(prefix + ".bin") == sha(str(tmp_path / "ref.bin"))
    assert sha(prefix + ".idx") == sha(str(tmp_path / "ref.idx"))
    manifest = json.load(open(prefix + ".manifest.json"))
    assert manifest["dropped"] == {"empty_text": 3} and manifest["documents"] == len(kept)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(kept) and list(ds[len(kept) - 1][-1:]) == [tok.eod_id]
    # Megatron-LM's encoder (tools/preprocess_data.py, --append-eod) on the same documents: an
    # empty text gives add_document([], []) -- a document with no sequence -- and whitespace is
    # tokenized and kept with its EOD; both only pad the data with non-text
    mlm = IndexedDatasetBuilder(str(tmp_path / "mlm.bin"), dtype=tok.dtype)
    for ids in tok.encode_batch(docs):
        mlm.add_document(np.array(ids + [tok.eod_id] if ids else [], dtype=tok.dtype), [len(ids) + 1] if ids else [])
    mlm.finalize(str(tmp_path / "mlm.idx"))
    theirs = IndexedDataset(str(tmp_path / "mlm"))
    assert len(theirs) == len(docs) - 1 and len(theirs.document_indices) == len(docs) + 1


# ------------------------------------------------------------------------- report and sample
def test_sample_report_funnel_adds_up(tmp_path, classifier, monkeypatch):  # noqa: F811
    from test_data_prep import REPO

    with open(os.path.join(REPO, "configs", "data", "sample_full.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    monkeypatch.chdir(REPO)  # the config names its files relative to the repository root
    cfg.update(output=str(tmp_path / "out"), classifier=classifier[0])
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["filter", "--config", str(tmp_path / "full.yaml")]) == 0
    out = tmp_path / "out"
    rep = json.loads((out / "prep_report.json").read_text())
    for row in rep["funnel"]:
        assert row["documents_in"] == row["documents_out"] + row["dropped"] == row["documents_out"] + sum(
            row["reasons"].values())
    assert rep["funnel"][-1]["documents_out"] == rep["documents_clean"]
    # the mirrored crawl: 3 exact + 3 edited copies and 3 pages in other languages
    assert {k: rep["dropped"][k] for k in ("duplicate_exact", "near_duplicate", "language")} == {
        "duplicate_exact": 3, "near_duplicate": 3, "language": 3}
    assert rep["languages"]["pt"] == 2 and rep["dedup"]["clusters"]["count"] == 6
    assert rep["throughput"]["language"]["documents_per_s_per_core"] > 0
    md = (out / "prep_report.md").read_text()
    assert "## Funnel" in md and "gopher_repetition" in md and (out / "funnel.png").stat().st_size > 1000


def test_report_counts_decontamination_hits_per_exam_and_split(tmp_path, classifier, monkeypatch):  # noqa: F811
    from test_data_prep import REPO

    monkeypatch.chdir(REPO)
    with open(os.path.join(REPO, "configs", "data", "sample.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    exam = tmp_path / "exam_dev.jsonl"  # the sample's exam items, marked as a dev split
    exam.write_text("".join(json.dumps({**json.loads(x), "split": "dev"}) + "\n"
                            for x in open(os.path.join(REPO, "data_prep", "samples", "exam_sample.jsonl"))))
    cfg.update(output=str(tmp_path / "out"), classifier=classifier[0])
    cfg["decontamination"]["exam_files"] = ["eval/exams/legal.jsonl", str(exam)]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["filter", "--config", str(tmp_path / "s.yaml")]) == 0
    rep = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert rep["decontamination_hits"] == [{"exam": "exam_dev.jsonl", "split": "dev", "documents_removed": 2}]
    assert "| exam_dev.jsonl | dev | 2 |" in (tmp_path / "out" / "prep_report.md").read_text()


# ---------------------------------------------------------------------------------- SLURM
def _wait_for(paths, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(os.path.exists(p) for p in paths):
            return
        time.sleep(2)
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    pytest.fail(f"SLURM jobs did not write {paths} within {timeout}s; queue: {queue}")


def test_dedup_filter_tokenize_on_real_slurm_equal_local(tmp_path, classifier, slurm_cluster):  # noqa: F811
    docs = _web_docs(90)
    rng = random.Random(2)
    rows = docs + [{"id": "dup", "text": docs[5]["text"]}, {"id": "near", "text": _edit(docs[9]["text"], rng, 1)}]
    write_jsonl(tmp_path / "w1.jsonl", rows[:50])
    write_jsonl(tmp_path / "w2.jsonl", rows[50:])
    tok_dir = train_bpe(str(tmp_path / "bpe"), [d["text"] for d in docs])
    stages = {"dedup": {"exact": True, "near": True}, "language": "en", "quality": {"c4": {"min_num_sentences": 1}},
              "unit_bytes": 30000}
    inputs = [str(tmp_path / "w*.jsonl")]
    local, remote = str(tmp_path / "local"), str(tmp_path / "slurm")
    assert run_cli(["filter", "--config", _config(tmp_path, classifier[0], inputs, local, **stages)]) == 0
    slurm_ex = {"kind": "slurm", "workers": 2, "partition": "debug", "cpus_per_task": 1, "time": "00:10:00"}
    assert run_cli(["filter", "--config", _config(tmp_path, classifier[0], inputs, remote, executor=slurm_ex,
                                                   **stages)]) == 0
    _wait_for([os.path.join(remote, "prep_report.json")])
    rep = json.load(open(os.path.join(local, "prep_report.json")))
    assert rep["dropped"]["duplicate_exact"] == 1 and rep["dropped"]["near_duplicate"] == 1
    for name in ("general", "legal", "medical", "accounting", "control_legal"):
        assert sha(os.path.join(remote, name, "data.jsonl")) == sha(os.path.join(local, name, "data.jsonl")), name
    general = os.path.join(local, "general", "data.jsonl")
    assert run_cli(["tokenize", "--input", general, "--tokenizer", tok_dir, "--output-prefix",
                    str(tmp_path / "tl"), "--unit-mb", "0.02"]) == 0
    assert run_cli(["tokenize", "--input", os.path.join(remote, "general", "data.jsonl"), "--tokenizer", tok_dir,
                    "--output-prefix", str(tmp_path / "ts"), "--unit-mb", "0.02", "--executor", "slurm",
                    "--slurm-partition", "debug", "--slurm-cpus", "1", "--slurm-time", "00:10:00"]) == 0
    _wait_for([str(tmp_path / "ts.manifest.json")])
    for ext in (".bin", ".idx"):
        assert sha(str(tmp_path / "tl") + ext) == sha(str(tmp_path / "ts") + ext)
