"""Quality heuristics: datatrove's Gopher repetition, Gopher quality and C4 rules, each switchable.

Each rule is datatrove's own filter class; a document it rejects is dropped with the rule's
name as the reason (``gopher_repetition``, ``gopher_quality``, ``c4``) and datatrove's
sub-reason (e.g. ``dup_line_frac``) as the detail. Config (``quality:`` in the filter YAML):
``false``/absent = off, ``true`` = datatrove's defaults, a mapping = keyword arguments of the
datatrove class (e.g. ``c4: {min_num_sentences: 1}``; for Portuguese pass Gopher's
``stop_words``: its default list is English).

Words: datatrove's word tokenizers need spaCy for every language (even its whitespace
fallback); ``RegexWordTokenizer`` (Unicode words and punctuation, sentence ends on terminal
punctuation) stands in so the rules run with no extra model. C4 also removes lines
(citations, lines without terminal punctuation, ...) from the documents it keeps; the kept
text is the rewritten one, as in datatrove.
"""
from __future__ import annotations

import dataclasses
import re

from datatrove.utils.word_tokenizers import WordTokenizer

from megatron_cpt.errors import UsageError

RULES = ("gopher_repetition", "gopher_quality", "c4")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SENT = re.compile(r"[^.!?\n]+(?:[.!?]+[\"'”)]*|\n|$)")


class RegexWordTokenizer(WordTokenizer):
    """Unicode word / punctuation tokens; sentences end at ``. ! ?`` or a newline."""

    def __init__(self):
        super().__init__("xx")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENT.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _SENT.finditer(text) if m.group().strip()]


WORDS = RegexWordTokenizer()


@dataclasses.dataclass
class QualityConfig:
    gopher_repetition: bool | dict = False
    gopher_quality: bool | dict = False
    c4: bool | dict = False

    @classmethod
    def from_raw(cls, raw, source: str) -> "QualityConfig":
        raw = raw or {}
        if not isinstance(raw, dict) or set(raw) - set(RULES):
            raise UsageError(f"{source}: `quality:` keys must be among {list(RULES)} (true, false or a mapping)")
        for k, v in raw.items():
            if not isinstance(v, (bool, dict)):
                raise UsageError(f"{source}: quality.{k} is {v!r}: use true, false or a mapping of options")
        cfg = cls(**raw)
        cfg.build()  # bad keyword arguments fail now, not inside a task
        return cfg

    def enabled(self) -> list[str]:
        return [r for r in RULES if getattr(self, r) not in (False, None)]

    def build(self) -> list[tuple[str, object]]:
        """(rule name, datatrove filter) for every enabled rule, in the order they run."""
        from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

        classes = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                   "c4": C4QualityFilter}
        out = []
        for rule in self.enabled():
            opts = getattr(self, rule)
            kwargs = dict(opts) if isinstance(opts, dict) else {}
            try:
                out.append((rule, classes[rule](language=WORDS, **kwargs)))
            except TypeError as exc:
                raise UsageError(f"quality.{rule}: {exc} (see datatrove's {classes[rule].__name__})") from exc
        return out


def check(rules: list[tuple[str, object]], doc) -> tuple[str, str] | None:
    """Apply the rules to a datatrove ``Document`` in order; (rule, sub-reason) of the first
    that rejects it, or None (``doc.text`` may have been rewritten by C4)."""
    for name, flt in rules:
        verdict = flt.filter(doc)
        if verdict is True:
            continue
        if isinstance(verdict, tuple):
            ok, why = verdict
        else:
            ok, why = bool(verdict), ""
        if not ok:
            return name, why or name
    return None
