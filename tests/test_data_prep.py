"""Tests for data_prep: tokenization round trip, task invariance, bad inputs, classifier, filter."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_cpt.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data_prep", "samples")
SEED = os.path.join(SAMPLES, "seed_labeled.jsonl")
WEB = os.path.join(SAMPLES, "web_sample.jsonl")
EXAMS = os.path.join(SAMPLES, "exam_sample.jsonl")
from data_prep.text_tokenizer import DEFAULT_EOD as EOD


def _texts(path=SEED):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def train_bpe(out_dir: str, texts, vocab_size: int = 800) -> str:
    from megatron_cpt.tiny import train_tokenizer

    return str(train_tokenizer(out_dir, vocab_size, texts, name="test-bpe"))


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    return train_bpe(str(tmp_path_factory.mktemp("tok") / "bpe"), _texts())


@pytest.fixture(scope="session")
def big_vocab_tok(tmp_path_factory):
    """A word-level tokenizer with 70,000 entries (>= 65,500: Megatron stores int32 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in _texts() for w in t.split()})
    vocab = {EOD: 0, "[UNK]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < 70000:
        vocab[f"zz{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("tok") / "big"
    out.mkdir(exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD}))
    return str(out)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    from data_prep.classifier import train

    out = str(tmp_path_factory.mktemp("clf"))
    metrics = train(SEED, out, seed=0)
    return out, metrics


def write_jsonl(path, rows):
    with open(path, "wb") as fh:
        for r in rows:
            if isinstance(r, bytes):
                fh.write(r + b"\n")
            elif isinstance(r, str):
                fh.write(r.encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(args):
    return main(["prep", *args])


# --------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------
def test_tokenize_round_trip_and_manifest(tmp_path, bpe):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from data_prep.manifest import verify_prefix

    docs = [{"id": i, "text": t} for i, t in enumerate(_texts()[:120])]
    docs.append({"id": "uni", "text": "Ünïcödé — café ✓ 日本語 \n\n tabs\tand  spaces "})
    rows = list(docs)
    rows.insert(5, "{not json")
    rows.insert(9, {"id": "x", "body": "no text"})
    rows.insert(12, {"id": "e", "text": " \n "})
    write_jsonl(tmp_path / "in.jsonl", rows)
    prefix = str(tmp_path / "out" / "ds")
    assert run_cli(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", bpe,
                    "--output-prefix", prefix, "--workers", "1"]) == 0

    ds = IndexedDataset(prefix)
    hf = AutoTokenizer.from_pretrained(bpe)
    eod = hf.convert_tokens_to_ids(EOD)
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == eod
        assert ids == hf(d["text"]).input_ids + [eod]  # same ids as transformers (Megatron-LM's path)
        assert hf.decode(ids) == d["text"] + EOD
    assert ds.index.dtype == np.uint16

    m = verify_prefix(prefix)
    assert m["tokens"] == int(ds.sequence_lengths.sum()) == int(ds.index.sequence_lengths.sum())
    assert m["documents"] == len(docs)
    assert m["documents_in"] == m["documents"] + sum(m["dropped"].values())
    assert m["dropped"] == {"malformed_json": 1, "missing_text_field": 1, "empty_text": 1}
    assert m["dropped_examples"]["malformed_json"][0]["line"] == 6
    assert m["tokenizer"]["eod_id"] == eod and m["tokenizer"]["name"] == "test-bpe"
    assert m["tokenizer"]["vocab_size"] == len(hf)
    assert m["bytes"] == sum(len(d["text"].encode()) for d in docs)
    for key in ("bin_sha256", "idx_sha256", "inputs", "config", "tokens", "bytes", "documents"):
        assert key in m
    assert m["bin_sha256"] == sha(prefix + ".bin") and m["idx_sha256"] == sha(prefix + ".idx")
    assert not os.path.exists(prefix + ".work")


def test_tasks_and_workers_give_byte_identical_output(tmp_path, bpe):
    files = []
    texts = _texts()
    for k in range(2):
        p = tmp_path / f"part{k}.jsonl"
        write_jsonl(p, [{"text": t} for t in texts[k * 150:(k + 1) * 150]])
        files.append(str(p))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(["tokenize", "--input", *files, "--tokenizer", bpe, "--output-prefix", a,
                    "--workers", "1"]) == 0
    # 6 workers = 2 processes x 3 tokenizer threads; plain files cut into many byte-range units
    assert run_cli(["tokenize", "--input", str(tmp_path / "part*.jsonl"), "--tokenizer", bpe,
                    "--output-prefix", b, "--workers", "6", "--unit-mb", "0.03"]) == 0
    mb = json.load(open(b + ".manifest.json"))
    assert mb["config"]["tasks"] > 2 and mb["config"]["processes"] == 2
    assert sha(a + ".bin") == sha(b + ".bin")
    assert sha(a + ".idx") == sha(b + ".idx")


def test_int32_tokens_for_large_vocabulary(tmp_path, big_vocab_tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    texts = _texts()[:20]
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    prefix = str(tmp_path / "big")
    assert run_cli(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", big_vocab_tok,
                    "--output-prefix", prefix]) == 0
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.int32
    tok = Tokenizer.from_file(os.path.join(big_vocab_tok, "tokenizer.json"))
    for i, t in enumerate(texts):
        assert ds[i].tolist() == tok.encode(t).ids + [0]
    assert os.path.getsize(prefix + ".bin") == 4 * int(ds.sequence_lengths.sum())


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = _texts()[:200]
    (tmp_path / "train.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:10]])
    prefix = str(tmp_path / "sp_ds")
    assert run_cli(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path / "sp.model"),
                    "--output-prefix", prefix]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ds = IndexedDataset(prefix)
    for i, t in enumerate(texts[:10]):
        assert ds[i].tolist() == sp.encode(t) + [sp.eos_id()]


def test_bad_inputs_are_counted_with_locations(tmp_path, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    good = [{"text": t} for t in _texts()[:30]]
    plain = [*good[:10], b'{"text": "bad \xff\xfe bytes"}', "", "[1, 2]", {"text": 5}, {"text": None},
             *good[10:20], "{oops", {"text": ""}]
    write_jsonl(tmp_path / "a.jsonl", plain)
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in good[20:25]) + b"{broken\n"
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as fh:
        fh.write(raw)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    # a truncated gzip: the readable lines are used, the rest is counted as read_error
    full = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in good) * 20)
    (tmp_path / "d.jsonl.gz").write_bytes(full[: len(full) // 2])
    pq.write_table(pa.table({"text": [g["text"] for g in good[:4]] + [""], "id": list(range(5))}),
                   tmp_path / "e.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "f.parquet")

    prefix = str(tmp_path / "out")
    assert run_cli(["tokenize", "--input", str(tmp_path / "*.jsonl*"), str(tmp_path / "*.parquet"),
                    "--tokenizer", bpe, "--output-prefix", prefix, "--workers", "2",
                    "--unit-mb", "0.01"]) == 0
    m = json.load(open(prefix + ".manifest.json"))
    d = m["dropped"]
    assert d["invalid_utf8"] == 1 and d["blank_line"] == 1 and d["text_not_string"] == 1
    assert d["missing_text_field"] == 1 + 2  # {"text": null} + the parquet file without a text column
    assert d["malformed_json"] == 2 + 1 + 1  # "[1, 2]", "{oops", and one per compressed file
    assert d["empty_text"] == 2 and d["read_error"] == 1
    ex = m["dropped_examples"]
    assert {"file": str(tmp_path / "a.jsonl"), "line": 11} == {k: ex["invalid_utf8"][0][k] for k in ("file", "line")}
    assert [e["line"] for e in ex["malformed_json"] if e["file"].endswith("a.jsonl")] == [13, 26]
    assert ex["read_error"][0]["file"].endswith("d.jsonl.gz")
    assert m["documents_in"] == m["documents"] + sum(d.values())


@pytest.mark.parametrize("case", ["missing_input", "bad_tokenizer", "no_tokenizer", "bad_eod"])
def test_tokenize_refuses_bad_arguments_with_exit_2(tmp_path, bpe, case, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    tok = bpe
    inp = str(tmp_path / "in.jsonl")
    extra = []
    if case == "missing_input":
        inp = str(tmp_path / "nothing*.jsonl")
    elif case == "bad_tokenizer":
        (tmp_path / "tk").mkdir()
        (tmp_path / "tk" / "tokenizer.json").write_text("{ this is not a tokenizer")
        tok = str(tmp_path / "tk")
    elif case == "no_tokenizer":
        tok = str(tmp_path / "missing_dir")
    else:
        extra = ["--eod-token", "<|not_there|>"]
    rc = run_cli(["tokenize", "--input", inp, "--tokenizer", tok, "--output-prefix", str(tmp_path / "o"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1


def test_cli_subprocess_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_cpt", "prep", "tokenize", "--input",
                        str(tmp_path / "none.jsonl"), "--tokenizer", str(tmp_path), "--output-prefix",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "matches no file" in r.stderr


def test_verify_prefix_detects_changes_and_stats(tmp_path, bpe, capsys):
    from data_prep.manifest import verify_prefix
    from megatron_cpt.errors import UsageError

    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _texts()[:10]])
    prefix = str(tmp_path / "ds")
    assert run_cli(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", bpe,
                    "--output-prefix", prefix]) == 0
    capsys.readouterr()
    assert run_cli(["stats", prefix, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "test-bpe" in out
    assert verify_prefix(prefix, tokenizer=bpe)["documents"] == 10
    other = train_bpe(str(tmp_path / "other_tok"), _texts()[:50], vocab_size=400)
    with pytest.raises(UsageError, match="re-tokenize"):
        verify_prefix(prefix, tokenizer=other)
    data = bytearray(open(prefix + ".bin", "rb").read())
    data[0] ^= 1
    open(prefix + ".bin", "wb").write(bytes(data))
    with pytest.raises(UsageError, match="sha256"):
        verify_prefix(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(UsageError, match="missing"):
        verify_prefix(prefix)
    assert run_cli(["stats", str(tmp_path / "nope")]) == 2


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------
def test_classifier_macro_f1_on_heldout(classifier, tmp_path):
    out, m = classifier
    assert m["macro_f1"] >= 0.85
    assert m["heldout_documents"] == 80  # stratified 20% of 4 x 100
    assert all(v["support"] == 20 for v in m["per_label"].values())
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert set(saved["per_label"]) == {"legal", "medical", "accounting", "other"}
    assert set(saved["per_label"]["legal"]) >= {"precision", "recall", "f1"}
    assert len(saved["confusion_matrix"]["rows_true_cols_pred"]) == 4
    # score: per-domain probabilities for each document
    assert run_cli(["classifier", "score", "--model", out, "--input", WEB,
                    "--output", str(tmp_path / "scored.jsonl")]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "scored.jsonl")]
    assert len(rows) == 602  # 605 lines - 3 bad records
    p = rows[0]["domain_probs"]
    assert set(p) == {"legal", "medical", "accounting", "other"} and abs(sum(p.values()) - 1) < 0.02


def test_classifier_train_refuses_unknown_labels(tmp_path):
    write_jsonl(tmp_path / "l.jsonl", [{"text": "a b c", "label": "legal"}, {"text": "d", "label": "sports"}])
    assert run_cli(["classifier", "train", "--labeled", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "m")]) == 2


# --------------------------------------------------------------------------------------------
# decontamination and filtering
# --------------------------------------------------------------------------------------------
def test_exam_index_matches_question_and_answer(tmp_path):
    from data_prep.decontam import ExamIndex, item_text

    assert item_text({"question": "Q?", "choices": ["x", "y"], "answer": "B"}) == "Q? y"
    assert item_text({"query": "Q?", "answer": "the answer"}) == "Q? the answer"
    write_jsonl(tmp_path / "e.jsonl", [{"id": "long", "question": " ".join(f"w{i}" for i in range(20)),
                                        "answer": "final"}, {"id": "short", "question": "Tiny quiz?", "answer": "yes"}])
    idx = ExamIndex([str(tmp_path / "e.jsonl")], n=13)
    assert idx.match("intro W3 w4, w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15!! outro")[0] == "long"
    assert idx.match("w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14") is None  # 12 words only
    assert idx.match("a TINY quiz: yes.")[0] == "short"
    assert idx.match("tiny quiz no") is None


def _filter_config(tmp_path, clf_dir, inputs, out, workers=1, **extra):
    import yaml

    cfg = {"inputs": inputs, "output": out, "classifier": clf_dir,
           "domains": {"legal": 0.5, "medical": 0.5, "accounting": 0.5},
           "decontamination": {"exam_files": [str(tmp_path / "exam.jsonl")], "ngram": 13},
           "executor": {"kind": "local", "workers": workers}, "seed": 3, **extra}
    path = tmp_path / f"cfg_{os.path.basename(out)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_filter_decontaminates_controls_and_is_task_invariant(tmp_path, classifier, capsys):
    clf_dir, _ = classifier
    exam = [{"id": "q-legal-7", "question": "Which remedy orders a party to perform the exact obligation promised "
             "in a contract for the sale of unique land?", "choices": ["Specific performance", "Rescission"],
             "answer": 0},
            {"id": "q-med-3", "question": "Which electrolyte disturbance is most typical after prolonged vomiting "
             "in an otherwise healthy adult patient?", "choices": ["Hypokalemia", "Hyperkalemia"], "answer": "A"}]
    write_jsonl(tmp_path / "exam.jsonl", exam)
    web = [json.loads(x) if x.strip().startswith("{") and x.strip().endswith("}") else x
           for x in open(WEB, encoding="utf-8").read().splitlines()]
    web = [w for w in web if not (isinstance(w, dict) and str(w.get("id", "")).startswith("web-leak"))]
    planted = [
        {"id": "plant-1", "text": "Study notes. which remedy orders a party to PERFORM the exact obligation "
         "promised in a contract, for the sale of unique land? Specific performance. Good luck!"},
        {"id": "plant-2", "text": "Quiz recap: Which electrolyte disturbance is most typical after prolonged "
         "vomiting in an otherwise healthy adult patient? Hypokalemia"},
    ]
    near_miss = {"id": "near", "text": "Which remedy orders a party to perform the promised obligation? "
                 "Courts rarely order specific performance for ordinary goods."}
    web[40:40] = [planted[0], near_miss]
    web[400:400] = [planted[1]]
    write_jsonl(tmp_path / "web1.jsonl", web[:300])
    write_jsonl(tmp_path / "web2.jsonl", web[300:])
    inputs = [str(tmp_path / "web*.jsonl")]
    out1, out2 = str(tmp_path / "f1"), str(tmp_path / "f2")
    assert run_cli(["filter", "--config", _filter_config(tmp_path, clf_dir, inputs, out1)]) == 0
    printed = capsys.readouterr().out
    assert "control_legal" in printed and "plant-1" in printed
    cfg2 = _filter_config(tmp_path, clf_dir, inputs, out2, workers=2, unit_bytes=60000)
    assert run_cli(["filter", "--config", cfg2]) == 0

    rep = json.load(open(os.path.join(out1, "filter_report.json")))
    removed = {r["id"]: r["exam_item"] for r in rep["decontamination"]["removed"]}
    assert removed == {"plant-1": "q-legal-7", "plant-2": "q-med-3"}
    assert rep["dropped"]["contaminated"] == 2
    assert rep["documents_in"] == rep["documents_clean"] + sum(rep["dropped"].values())
    names = ["legal", "medical", "accounting", "general", "control_legal", "control_medical", "control_accounting"]
    for name in names:
        ids = [json.loads(x)["id"] for x in open(os.path.join(out1, name, "data.jsonl"))]
        assert "plant-1" not in ids and "plant-2" not in ids
        assert len(ids) == rep["outputs"][name]["documents"]
        # task/worker invariance
        assert sha(os.path.join(out1, name, "data.jsonl")) == sha(os.path.join(out2, name, "data.jsonl"))
    general = [json.loads(x) for x in open(os.path.join(out1, "general", "data.jsonl"))]
    assert "near" in {g["id"] for g in general}
    assert len(general) == rep["documents_clean"]
    for d in ("legal", "medical", "accounting"):
        docs = [json.loads(x) for x in open(os.path.join(out1, d, "data.jsonl"))]
        assert docs and all(x["domain_probs"][d] >= 0.5 for x in docs)
        assert sum(x["n_tokens"] for x in docs) == rep["outputs"][d]["tokens"]
        ctrl = [json.loads(x) for x in open(os.path.join(out1, f"control_{d}", "data.jsonl"))]
        got, target = sum(x["n_tokens"] for x in ctrl), rep["outputs"][d]["tokens"]
        assert target <= got < target + max(x["n_tokens"] for x in ctrl)  # within one document
        assert rep["outputs"][f"control_{d}"]["tokens"] == got
        sweep = {r["threshold"]: r["documents"] for r in rep["per_threshold"][d]}
        assert sweep[0.5] == len(docs) and sweep[0.3] >= sweep[0.5] >= sweep[0.9]


def test_filter_general_token_target_and_tokenizer_counts(tmp_path, classifier, bpe):
    from tokenizers import Tokenizer

    clf_dir, _ = classifier
    write_jsonl(tmp_path / "exam.jsonl", [{"question": "unrelated question text", "answer": "none"}])
    out = str(tmp_path / "g")
    cfg = _filter_config(tmp_path, clf_dir, [WEB], out, general={"token_target": 5000},
                         token_count={"tokenizer": bpe}, control={"enabled": False})
    assert run_cli(["filter", "--config", cfg]) == 0
    rep = json.load(open(os.path.join(out, "filter_report.json")))
    g = [json.loads(x) for x in open(os.path.join(out, "general", "data.jsonl"))]
    tot = sum(x["n_tokens"] for x in g)
    assert 5000 <= tot < 5000 + max(x["n_tokens"] for x in g)
    tok = Tokenizer.from_file(os.path.join(bpe, "tokenizer.json"))
    assert g[0]["n_tokens"] == len(tok.encode(g[0]["text"]).ids) + 1
    assert not os.path.exists(os.path.join(out, "control_legal"))
    assert rep["token_unit"].startswith("tokenizer")


def test_filter_refuses_classifier_for_other_labels(tmp_path, classifier):
    from data_prep.classifier import train

    write_jsonl(tmp_path / "exam.jsonl", [{"question": "q", "answer": "a"}])
    rows = [json.loads(x) for x in open(SEED)]
    write_jsonl(tmp_path / "two.jsonl", [r for r in rows if r["label"] in ("legal", "other")])
    train(str(tmp_path / "two.jsonl"), str(tmp_path / "clf2"), labels=("legal", "other"))
    cfg = _filter_config(tmp_path, str(tmp_path / "clf2"), [WEB], str(tmp_path / "o"))
    assert run_cli(["filter", "--config", cfg]) == 2
    cfg = _filter_config(tmp_path, str(tmp_path / "no_clf"), [WEB], str(tmp_path / "o"))
    assert run_cli(["filter", "--config", cfg]) == 2
    assert run_cli(["filter", "--config", str(tmp_path / "missing.yaml")]) == 2


# The SLURM executor (array of units + dependent merge through real `sbatch` on the local
# cluster, byte-identical to local) is tested in tests/test_data_prep_web.py::
# test_dedup_filter_tokenize_on_real_slurm_equal_local; the stand-in `sbatch` tests are gone.
