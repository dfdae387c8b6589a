"""Language identification with py3langid (langid.py's 97-language model, shipped in the wheel).

Why not datatrove's ``LanguageFilter``: its fastText lid.176 / GlotLID models are downloaded
at run time, which a cluster node without internet (or a CI) cannot do. ``py3langid`` carries
its Naive Bayes model inside the package (4.6 MB), needs only numpy, and gives a calibrated
probability (``norm_probs``) for the threshold.
"""
from __future__ import annotations

import dataclasses

from megatron_cpt.config_ranges import check_instance, ranged
from megatron_cpt.errors import UsageError


@dataclasses.dataclass
class LanguageConfig:
    code: str | None = None  # keep documents identified as this ISO 639-1 code (None: identify only)
    threshold: float = ranged(0.5, 0, 1) # ... with at least this probability

    @classmethod
    def from_raw(cls, raw, source: str) -> "LanguageConfig":
        """``language: pt`` or ``language: {code: pt, threshold: 0.6}`` (null: no identification)."""
        if raw is None:
            return cls()
        if isinstance(raw, str):
            raw = {"code": raw}
        if not isinstance(raw, dict) or set(raw) - {"code", "threshold"}:
            raise UsageError(f"{source}: `language:` must be a code (pt) or {{code: pt, threshold: 0.5}}")
        cfg = cls(**raw)
        if cfg.code is not None and cfg.code not in _labels():
            raise UsageError(f"{source}: language {cfg.code!r} is not one of py3langid's 97 codes "
                             f"(e.g. {', '.join(sorted(_labels())[:8])}, ...)")
        check_instance(cfg, source, "language.")
        return cfg


_IDENTIFIER = None


def _identifier():
    """Loaded once per process (about 1 s); never pickled into SLURM jobs (68 MB)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def _labels() -> set[str]:
    return set(_identifier().nb_classes)


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) of ``text``."""
    lang, prob = _identifier().classify(text)
    return str(lang), float(prob)


def keep(cfg: LanguageConfig, text: str) -> tuple[bool, str, float]:
    """Whether ``text`` passes ``cfg``, with the identified language and its probability."""
    lang, prob = identify(text)
    if cfg.code is None:
        return True, lang, prob
    return lang == cfg.code and prob >= cfg.threshold, lang, prob
