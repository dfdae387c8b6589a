"""Exam decontamination: drop documents sharing a word n-gram with any exam question+answer.

Normalization (documents and exam items alike): lower-case, keep letters and digits only
(``\\w`` without ``_``), split on everything else. An exam item whose normalized text has
fewer than ``n`` words contributes its whole word sequence as one shorter n-gram.

Exam files are JSONL. Per item, the text matched is the question plus its answer:
``question`` (or ``query`` / ``prompt`` / ``text``), and the answer resolved from
``answer`` / ``target`` / ``gold`` — an index or letter into ``choices`` / ``options`` when those
exist, else the answer text itself. The item id is ``id`` if present, else ``FILE:LINE``.
"""
from __future__ import annotations

import json
import os
import re

from megatron_cpt.errors import UsageError

_WORD = re.compile(r"[^\W_]+")
_Q_FIELDS = ("question", "query", "prompt", "text")
_A_FIELDS = ("answer", "target", "gold", "label")
_C_FIELDS = ("choices", "options", "endings")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def item_text(obj: dict) -> str | None:
    q = next((obj[f] for f in _Q_FIELDS if isinstance(obj.get(f), str)), None)
    if q is None:
        return None
    ans = next((obj[f] for f in _A_FIELDS if f in obj), None)
    choices = next((obj[f] for f in _C_FIELDS if isinstance(obj.get(f), (list, dict))), None)
    a_text = ""
    if isinstance(choices, dict):  # {"A": "...", ...}
        a_text = str(choices.get(ans, ans if ans is not None else ""))
    elif isinstance(choices, list) and ans is not None:
        idx = ans
        if isinstance(ans, str) and len(ans) == 1 and ans.upper() in "ABCDEFGHIJ":
            idx = "ABCDEFGHIJ".index(ans.upper())
        if isinstance(idx, int) and 0 <= idx < len(choices):
            a_text = str(choices[idx])
        else:
            a_text = str(ans)
    elif ans is not None:
        a_text = str(ans)
    return f"{q} {a_text}".strip()


class ExamIndex:
    """n-gram -> exam item id, built from exam JSONL files (picklable, small)."""

    def __init__(self, exam_files: list[str], n: int = 13):
        if n < 1:
            raise UsageError(f"decontamination n-gram size {n} must be >= 1 (default 13)")
        self.n = n
        self.grams: dict[str, str] = {}
        self.lengths: set[int] = set()
        self.items = 0
        self.files = list(exam_files)
        self.item_info: dict[str, dict] = {}  # item id -> exam file and split (for the report)
        for path in exam_files:
            if not os.path.isfile(path):
                raise UsageError(f"exam file {path!r} not found: fix `decontamination.exam_files` in the config")
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise UsageError(f"exam file {path}:{line_no} is not valid JSON ({exc}): fix the file") from exc
                    text = item_text(obj) if isinstance(obj, dict) else None
                    if text is None:
                        raise UsageError(f"exam file {path}:{line_no} has no question field "
                                         f"({'/'.join(_Q_FIELDS)}): fix the file")
                    item_id = str(obj.get("id", f"{os.path.basename(path)}:{line_no}"))
                    self.item_info[item_id] = {"exam": path, "split": str(obj.get("split", "-"))}
                    self.add(words(text), item_id)

    def add(self, ws: list[str], item_id: str) -> None:
        if not ws:
            return
        self.items += 1
        k = min(self.n, len(ws))
        self.lengths.add(k)
        for i in range(len(ws) - k + 1):
            self.grams.setdefault(" ".join(ws[i:i + k]), item_id)

    def match(self, text: str) -> tuple[str, str] | None:
        """Returns (exam item id, matched n-gram) for the first shared n-gram, else None."""
        if not self.grams:
            return None
        ws = words(text)
        grams = self.grams
        for k in sorted(self.lengths, reverse=True):
            for i in range(len(ws) - k + 1):
                g = " ".join(ws[i:i + k])
                hit = grams.get(g)
                if hit is not None:
                    return hit, g
        return None
