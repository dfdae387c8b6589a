"""Domain classifier: fastText supervised model over legal / medical / accounting / other.

``train`` holds out a stratified split (per label, seeded), trains on the rest, and writes
``DIR/model.bin``, ``DIR/classifier.json`` (labels, hyper-parameters, seed) and
``DIR/metrics.json`` (precision, recall, F1 per label, macro-F1, accuracy, confusion matrix
with rows = true label, columns = predicted label).
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile

from megatron_cpt.errors import UsageError

DEFAULT_LABELS = ("legal", "medical", "accounting", "other")
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['.][a-z0-9]+)*|[^\sa-z0-9]", re.IGNORECASE)
MAX_CHARS = 20000  # the classifier sees the first 20k characters of a document


def normalize(text: str) -> str:
    """Lower-case, split punctuation off words, one line (fastText's input format)."""
    return " ".join(_TOKEN_RE.findall(text[:MAX_CHARS].lower()))


def read_labeled(path: str, labels: tuple[str, ...], text_field="text", label_field="label") -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise UsageError(f"labeled file {path!r} not found: pass a JSONL file with `text` and `label` fields")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{n} is not valid JSON ({exc}): fix the labeled file") from exc
            text, label = obj.get(text_field), obj.get(label_field)
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"{path}:{n} has no {text_field!r} text: every labeled row needs one")
            if label not in labels:
                raise UsageError(f"{path}:{n} has label {label!r}, not one of {', '.join(labels)}: "
                                 "fix the row or pass --labels")
            rows.append((text, label))
    missing = [lab for lab in labels if not any(r[1] == lab for r in rows)]
    if missing:
        raise UsageError(f"{path} has no examples of {', '.join(missing)}: every label needs examples")
    return rows


def stratified_split(rows, holdout: float, seed: int):
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(r[1], []).append(r)
    train, test = [], []
    for label in sorted(by_label):
        items = list(by_label[label])
        rng.shuffle(items)
        k = max(1, round(len(items) * holdout)) if len(items) > 1 else 0
        test.extend(items[:k])
        train.extend(items[k:])
    rng.shuffle(train)
    return train, test


def metrics(true: list[str], pred: list[str], labels: tuple[str, ...]) -> dict:
    idx = {lab: i for i, lab in enumerate(labels)}
    cm = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred):
        cm[idx[t]][idx[p]] += 1
    per = {}
    for lab, i in idx.items():
        tp = cm[i][i]
        fp = sum(cm[j][i] for j in range(len(labels))) - tp
        fn = sum(cm[i]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[lab] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": sum(cm[i])}
    macro = sum(v["f1"] for v in per.values()) / len(per)
    acc = sum(cm[i][i] for i in range(len(labels))) / max(1, len(true))
    return {"per_label": per, "macro_f1": round(macro, 4), "accuracy": round(acc, 4),
            "confusion_matrix": {"labels": list(labels), "rows_true_cols_pred": cm}, "n": len(true)}


HYPER = {"epoch": 40, "lr": 0.5, "wordNgrams": 2, "dim": 32, "minCount": 1, "loss": "softmax", "thread": 1}


def train(labeled: str, out_dir: str, labels=DEFAULT_LABELS, holdout: float = 0.2, seed: int = 0,
          hyper: dict | None = None) -> dict:
    import fasttext

    labels = tuple(labels)
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout {holdout} must be between 0 and 1 (e.g. 0.2)")
    rows = read_labeled(labeled, labels)
    train_rows, test_rows = stratified_split(rows, holdout, seed)
    params = dict(HYPER, **(hyper or {}))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out_dir, delete=False, encoding="utf-8") as fh:
        for text, label in train_rows:
            fh.write(f"__label__{label} {normalize(text)}\n")
        train_file = fh.name
    try:
        model = fasttext.train_supervised(input=train_file, seed=seed, verbose=0, **params)
    finally:
        os.remove(train_file)
    model.save_model(os.path.join(out_dir, "model.bin"))
    clf = DomainClassifier(out_dir, model=model, labels=labels)
    pred = [clf.predict_label(t) for t, _ in test_rows]
    result = metrics([lab for _, lab in test_rows], pred, labels)
    result.update({"train_documents": len(train_rows), "heldout_documents": len(test_rows),
                   "holdout": holdout, "seed": seed, "labeled_file": os.path.abspath(labeled)})
    with open(os.path.join(out_dir, "classifier.json"), "w") as fh:
        json.dump({"labels": list(labels), "hyperparameters": params, "seed": seed,
                   "normalization": "lowercase, punctuation split, first 20k chars"}, fh, indent=2)
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result


class DomainClassifier:
    """Loads ``DIR/model.bin``; ``probs(text)`` gives a probability for every label."""

    def __init__(self, model_dir: str, model=None, labels=None, require: tuple[str, ...] = ()):
        self.model_dir = model_dir
        meta_path = os.path.join(model_dir, "classifier.json")
        if labels is None:
            if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(model_dir, "model.bin")):
                raise UsageError(f"classifier folder {model_dir!r} has no model.bin/classifier.json: "
                                 "train one with `megatron-cpt prep classifier train`")
            with open(meta_path) as fh:
                labels = tuple(json.load(fh)["labels"])
        self.labels = tuple(labels)
        missing = [d for d in require if d not in self.labels]
        if missing:
            raise UsageError(f"classifier {model_dir!r} was trained for labels {', '.join(self.labels)}, not "
                             f"{', '.join(missing)}: retrain it with those labels or change the domains")
        self._model = model

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_model"] = None
        return d

    @property
    def model(self):
        if self._model is None:
            import fasttext

            try:
                self._model = fasttext.load_model(os.path.join(self.model_dir, "model.bin"))
            except ValueError as exc:
                raise UsageError(f"cannot load {self.model_dir}/model.bin ({exc}): retrain the classifier") from exc
            got = sorted(lab.replace("__label__", "") for lab in self._model.labels)
            if got != sorted(self.labels):
                raise UsageError(f"classifier model labels {got} differ from classifier.json: retrain it")
        return self._model

    def probs_batch(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        labs, ps = self.model.predict([normalize(t) for t in texts], k=-1)
        out = []
        for lab_row, p_row in zip(labs, ps):
            d = {lab: 0.0 for lab in self.labels}
            for lab, p in zip(lab_row, p_row):
                d[lab.replace("__label__", "")] = round(float(min(1.0, max(0.0, p))), 6)
            out.append(d)
        return out

    def probs(self, text: str) -> dict[str, float]:
        return self.probs_batch([text])[0]

    def predict_label(self, text: str) -> str:
        p = self.probs(text)
        return max(p, key=p.get)


def score(model_dir: str, inputs, output: str, text_field="text", id_field="id", batch_size=512,
          progress: bool = True) -> dict:
    """Annotate documents with ``domain_probs`` (JSONL out); bad records are counted, not fatal."""
    from tqdm import tqdm

    from data_prep.io import DropCounter, RecordReader, Unit, expand_inputs

    clf = DomainClassifier(model_dir)
    files = expand_inputs(inputs)
    drops = DropCounter()
    reader = RecordReader(text_field, id_field, keep_raw=True)
    n_out = n_in = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as out, tqdm(desc="score", unit=" docs", disable=not progress) as bar:
        for path in files:
            batch = []

            def flush():
                for rec, p in zip(batch, clf.probs_batch([r.text for r in batch])):
                    obj = dict(rec.raw)
                    obj.setdefault(id_field, rec.id)
                    obj["domain_probs"] = p
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                bar.update(len(batch))
                batch.clear()

            for rec in reader.read(Unit(path), drops):
                batch.append(rec)
                n_out += 1
                if len(batch) >= batch_size:
                    flush()
            flush()
            n_in += reader.lines
    return {"documents_in": n_in, "documents": n_out, "dropped": drops.to_dict(), "output": output}
