"""`llmkit data clean`'s settings (CleanConfig) and its text normalisation; the pipeline that applies them runs on
datatrove (data/pipeline.py, data/steps.py).

Order per document: normalise -> min chars -> language -> quality rules -> exact dedup -> near dedup -> PII.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

QUALITY = ("none", "gopher", "c4", "both")


@dataclass
class CleanConfig:
    """What `llmkit data clean` does (flags of the same names)."""
    normalize: bool = True  # NFKC, control characters, whitespace
    dedup: list = field(default_factory=lambda: ["exact", "near"])
    near_threshold: float = 0.8  # Jaccard similarity of word shingles
    shingle: int = 5  # words per shingle
    num_perm: int = 256  # MinHash hashes per document
    min_chars: int = 0
    quality: str = "none"  # none | gopher | c4 | both
    langs: list = field(default_factory=list)  # ISO 639-1 codes to keep; empty: no language filter
    lang_threshold: float = 0.5  # keep a document when one of langs has at least this probability (datatrove's rule)
    pii: str | None = None  # redact | mask | hash | None
    seed: int = 1  # MinHash permutations

    def __post_init__(self):
        bad = [d for d in self.dedup if d not in ("exact", "near")]
        checks = [(not bad, f"--dedup takes exact, near or none, got {','.join(bad)}"),
                  (0 < self.near_threshold <= 1, f"--near-threshold must be in (0, 1], got {self.near_threshold}"),
                  (1 <= self.shingle <= 32, f"--shingle must be in 1..32, got {self.shingle}"),
                  (16 <= self.num_perm <= 1024, f"--num-perm must be in 16..1024, got {self.num_perm}"),
                  (0 <= self.lang_threshold <= 1, f"--lang-threshold must be in [0, 1], got {self.lang_threshold}"),
                  (self.min_chars >= 0, f"--min-chars must be >= 0, got {self.min_chars}"),
                  (self.quality in QUALITY, f"--quality must be one of {', '.join(QUALITY)}"),
                  (self.pii in (None, "redact", "mask", "hash"), f"--pii must be redact, mask or hash, got {self.pii}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for lang in self.langs:
            if not re.fullmatch(r"[a-z]{2,3}", lang):
                raise ValueError(f"--lang takes ISO 639-1 codes such as en,de; got {lang!r}")


# ---------------------------------------------------------------------------------------------------------------
# normalisation

_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_DROP = {"\u00ad", "\u200b", "\u2060", "\ufeff"}  # soft hyphen, zero-width space, word joiner, BOM


def normalize_text(text: str) -> str:
    """NFKC, control and zero-width characters removed, whitespace runs collapsed, lines stripped, at most one
    blank line in a row."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() or any(ord(c) < 32 and c not in "\n\t" for c in text):
        text = "".join(c for c in text if c not in _DROP and (unicodedata.category(c) != "Cc" or c in "\n\t"))
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()
