"""`llmkit data clean`: normalise, de-duplicate (exact and MinHash LSH), filter (Gopher/C4 rules, language) and
redact PII, streaming document by document, with a report of what each rule removed.

Order per document: normalise -> min chars -> language -> quality rules -> exact dedup -> near dedup -> PII.
Memory grows with the number of kept documents only (a 16-byte hash each, plus ~1 KB of MinHash for near dedup).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.trust.guard import Guard, Policy
from llmkit.utils.io import write_results

QUALITY = ("none", "gopher", "c4", "both")


@dataclass
class CleanConfig:
    """What `llmkit data clean` does (flags of the same names)."""
    normalize: bool = True  # NFKC, control characters, whitespace
    dedup: list = field(default_factory=lambda: ["exact", "near"])
    near_threshold: float = 0.8  # Jaccard similarity of word shingles
    shingle: int = 5  # words per shingle
    num_perm: int = 128
    min_chars: int = 0
    quality: str = "none"  # none | gopher | c4 | both
    langs: list = field(default_factory=list)  # ISO 639-1 codes to keep; empty: no language filter
    lang_threshold: float = 0.5  # keep a document when one of langs has at least this probability (datatrove's rule)
    pii: str | None = None  # redact | mask | hash | None
    seed: int = 1

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


# ---------------------------------------------------------------------------------------------------------------
# quality rules: Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020, section 2.2), thresholds as in
# the papers and datatrove's filters

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
TERMINAL = (".", "!", "?", '"', "'", "”", "’")
POLICY_WORDS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier one, and share of characters in them."""
    seen, dup, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        seen.add(x)
    total = sum(len(x) for x in items)
    return (dup / len(items) if items else 0.0), (dup_chars / total if total else 0.0)


def _ngram_fractions(words: list[str]) -> list[tuple[str, float, float]]:
    out = []
    total = sum(len(w) for w in words) or 1
    for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):  # most frequent n-gram's share of characters
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams:
            g, c = grams.most_common(1)[0]
            out.append((f"gopher_top_{n}gram", sum(len(w) for w in g) * c / total, limit))
    for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):  # duplicated n-grams
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            g = tuple(words[i:i + n])
            if g in seen:
                covered[i:i + n] = [True] * n
            seen.add(g)
        out.append((f"gopher_dup_{n}gram", sum(len(w) for w, c in zip(words, covered) if c) / total, limit))
    return out


def gopher_rule(text: str) -> str | None:
    """The first Gopher quality rule the text fails, or None."""
    words = text.split()  # Gopher counts whitespace-separated words
    if not words:
        return "gopher_word_count"
    alpha = [w for w in words if any(c.isalpha() for c in w)]
    n = len(alpha)
    if not 50 <= n <= 100_000:
        return "gopher_word_count"
    mean = sum(len(w) for w in alpha) / n
    if not 3 <= mean <= 10:
        return "gopher_mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > 0.1:
        return "gopher_symbol_ratio"
    if sum(c.isdigit() for c in text) / max(1, len(text)) > 0.25:
        return "digit_ratio"  # not in Gopher: tables of numbers, phone lists, IDs (our addition)
    lines = [x for x in text.split("\n") if x.strip()]
    if lines and sum(x.lstrip().startswith(("•", "-", "*", "·", "‣", "▪")) for x in lines) / len(lines) > 0.9:
        return "gopher_bullet_lines"
    if lines and sum(x.rstrip().endswith(("...", "…")) for x in lines) / len(lines) > 0.3:
        return "gopher_ellipsis_lines"
    if n / len(words) < 0.8:
        return "gopher_alpha_words"
    if len(STOP_WORDS & {w.lower() for w in alpha}) < 2:
        return "gopher_stop_words"
    frac, char_frac = _dup_fraction(lines)
    if frac > 0.3:
        return "gopher_dup_lines"
    if char_frac > 0.2:
        return "gopher_dup_line_chars"
    paras = [x for x in text.split("\n\n") if x.strip()]
    frac, char_frac = _dup_fraction(paras)
    if frac > 0.3:
        return "gopher_dup_paragraphs"
    if char_frac > 0.2:
        return "gopher_dup_paragraph_chars"
    lower = [w.lower() for w in alpha]
    for name, value, limit in _ngram_fractions(lower):
        if value > limit:
            return name
    return None


def c4_filter(text: str) -> tuple[str | None, str | None]:
    """C4's rules: keep lines that end in terminal punctuation, have >= 3 words and mention no javascript or
    cookie/privacy policy; drop pages with lorem ipsum, a curly bracket, or fewer than 5 sentences.
    Returns (the text left, None) or (None, the rule that removed it)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return None, "c4_lorem_ipsum"
    if "{" in text:
        return None, "c4_curly_bracket"
    kept = []
    for line in text.split("\n"):
        s, ls = line.strip(), line.strip().lower()
        if not s.endswith(TERMINAL) or len(s.split()) < 3 or "javascript" in ls or any(p in ls for p in POLICY_WORDS):
            continue
        kept.append(line)
    out = "\n".join(kept)
    if len(re.findall(r"[.!?]+(?:\s|$)", out)) < 5:
        return None, "c4_few_sentences"
    return out, None


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


class Cleaner:
    """Applies a CleanConfig to documents one at a time and keeps the counts for the report."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.removed, self.modified, self.pii, self.languages = Counter(), Counter(), Counter(), Counter()
        self.examples: dict[str, list[str]] = {}
        self.seen: set[bytes] = set()
        self.n_in = self.n_out = self.bytes_in = self.bytes_out = 0
        self.lsh = self._lid = self.guard = None
        if "near" in cfg.dedup:
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise ValueError("near-duplicate removal needs datasketch: pip install 'llmkit[trust]' "
                                 "(or pass --dedup exact)") from None
            # MinHash estimates a Jaccard with standard error sqrt(J(1-J)/num_perm) (~0.035 at 0.8 with 128):
            # a pair is a duplicate when its estimate is within two standard errors of the threshold, so pairs at
            # the threshold are caught ~97% of the time; LSH looks a little lower still so candidates are not lost
            t = cfg.near_threshold
            self.near_cut = t - 2 * math.sqrt(t * (1 - t) / cfg.num_perm)
            self.lsh = MinHashLSH(threshold=max(0.2, self.near_cut - 0.1), num_perm=cfg.num_perm)
            self.minhashes = {}
        if cfg.langs:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError:
                raise ValueError("--lang needs py3langid: pip install 'llmkit[trust]'") from None
            self._lid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            unknown = [x for x in cfg.langs if x not in self._lid.nb_classes]
            if unknown:
                raise ValueError(f"--lang {','.join(unknown)}: not a language py3langid knows (ISO 639-1 codes)")
        if cfg.pii:
            self.guard = Guard(Policy(pii_mode=cfg.pii, pii_input="redact"))
        self.redactor = self.guard  # the report's examples are redacted too: a report holds no PII the run removed

    def _drop(self, rule: str, text: str) -> None:
        self.removed[rule] += 1
        ex = self.examples.setdefault(rule, [])
        if len(ex) < 3:
            if self.redactor is not None:  # before cutting, so no half of a value is left
                text = self.redactor.redact(text, self.redactor.scan(text, classify=False))
            ex.append(text[:300])
        return None

    def __call__(self, text: str) -> str | None:
        """The cleaned document, or None when a rule removes it."""
        cfg = self.cfg
        self.n_in += 1
        self.bytes_in += len(text.encode())
        if cfg.normalize:
            norm = normalize_text(text)
            if norm != text:
                self.modified["normalized"] += 1
            text = norm
        if not text:
            return self._drop("empty", text)
        if len(text) < cfg.min_chars:
            return self._drop("min_chars", text)
        if self._lid is not None:
            lang, p = self._lid.classify(text)
            if lang not in cfg.langs or p < cfg.lang_threshold:
                self.languages[lang] += 1
                return self._drop("language", text)
        if cfg.quality in ("gopher", "both"):
            rule = gopher_rule(text)
            if rule:
                return self._drop(rule, text)
        if cfg.quality in ("c4", "both"):
            out, rule = c4_filter(text)
            if rule:
                return self._drop(rule, text)
            if out != text:
                self.modified["c4_lines_removed"] += 1
            text = out
        if "exact" in cfg.dedup:
            h = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if h in self.seen:
                return self._drop("exact_duplicate", text)
            self.seen.add(h)
        if self.lsh is not None and self._near_duplicate(text):
            return self._drop("near_duplicate", text)
        if self.guard is not None:
            findings = self.guard.scan(text, classify=False)
            if findings:
                self.pii.update(f.type for f in findings)
                self.modified["pii_redacted"] += 1
                text = self.guard.redact(text, findings)
        self.n_out += 1
        self.bytes_out += len(text.encode())
        return text

    def minhash(self, text: str):
        """The MinHash of a text's lower-cased word shingles (the whole text when shorter than one shingle)."""
        from datasketch import LeanMinHash, MinHash

        words = re.findall(r"\w+", text.lower())
        k = self.cfg.shingle
        grams = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))} or {text}
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        m.update_batch([g.encode() for g in grams])
        return LeanMinHash(m)

    def _near_duplicate(self, text: str) -> bool:
        m = self.minhash(text)
        for key in self.lsh.query(m):  # LSH candidates, then the estimated Jaccard itself
            if m.jaccard(self.minhashes[key]) >= self.near_cut:
                return True
        key = len(self.minhashes)
        self.minhashes[key] = m
        self.lsh.insert(key, m)
        return False

    def report(self) -> dict:
        return {"documents_in": self.n_in, "documents_out": self.n_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "removed": dict(self.removed.most_common()),
                "modified": dict(self.modified), "pii": dict(self.pii),
                "languages_removed": dict(self.languages.most_common(20)), "examples": self.examples,
                "config": asdict(self.cfg)}


def clean_texts(texts, cfg: CleanConfig | None = None) -> tuple[list[str], dict]:
    """Clean an iterable of documents in memory: (kept documents, report)."""
    c = Cleaner(cfg or CleanConfig())
    out = [t for t in map(c, texts) if t is not None]
    return out, c.report()


def clean_files(inputs, out, cfg: CleanConfig, text_field: str = "text", unit: str = "line",
                report_path=None, progress: bool = True, cleaner: Cleaner | None = None) -> dict:
    """Stream documents from inputs through the Cleaner into out (.txt, or .jsonl with the text under text_field),
    written atomically; pass a cleaner to share its duplicate memory across calls."""
    import json

    from tqdm import tqdm

    from llmkit.data.corpus import iter_documents  # corpus imports torch, which cleaning never needs

    out = Path(out)
    if out.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"--out {out}: write a .txt (one document per line) or .jsonl file")
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        if p.stat().st_size == 0:
            raise ValueError(f"{p} is empty")
        if p.resolve() == out.resolve():
            raise ValueError(f"--out {out} is also an input")
    cleaner = cleaner or Cleaner(cfg)
    n0 = cleaner.n_in
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    jsonl = out.suffix.lower() == ".jsonl"
    sep = "\n" if unit == "line" or jsonl else "\n\n"
    bar = tqdm(total=sum(p.stat().st_size for p in inputs), unit="B", unit_scale=True, desc="cleaning",
               disable=None if progress else True, leave=False)  # None: only on a terminal
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in inputs:
                for doc, rec in _documents(p, text_field, unit, iter_documents):
                    kept = cleaner(doc)
                    bar.update(len(doc.encode()) + 1)
                    if kept is None:
                        continue
                    if jsonl:  # a JSONL record keeps its other fields (id, url, source, ...)
                        f.write(json.dumps({**(rec or {}), text_field: kept}, ensure_ascii=False) + "\n")
                    else:  # one document per line: newlines inside a document become spaces
                        f.write((kept.replace("\n", " ") if unit == "line" else kept) + sep)
        if cleaner.n_in == n0:
            raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    report = {"inputs": [str(p) for p in inputs], "output": str(out), **cleaner.report(),
              "seconds": round(seconds, 3), "mb_per_s": round(cleaner.bytes_in / 1e6 / max(seconds, 1e-9), 3)}
    if report_path:
        write_results(report_path, report)
    return report


def _documents(path: Path, text_field: str, unit: str, iter_documents):
    """(text, the whole record) for each record of a .jsonl file, (text, None) for each document of other formats."""
    if path.suffix.lower() != ".jsonl":
        yield from ((d, None) for d in iter_documents(path, text_field, unit))
        return
    from llmkit.data.corpus import _strict_lines, jsonl_records

    with open(path, encoding="utf-8", newline="") as f:
        yield from jsonl_records(_strict_lines(f, path), path, text_field)


def clean_for_training(files, out_dir, cfg: CleanConfig, text_field: str = "text", unit: str = "doc") -> list[str]:
    """Clean training files before use (pretrain --clean): one cleaned file per input in OUT/clean/ (duplicates
    found across all of them), with a report per file; returns the new paths. unit: .txt documents are blank-line
    separated blocks ("doc") or lines ("line")."""
    folder = Path(out_dir) / "clean"
    cleaner, paths = Cleaner(cfg), []
    for f in files:
        f = Path(f)
        dst = folder / (f.stem + (".txt" if f.suffix.lower() == ".txt" else ".jsonl"))
        rep = clean_files([f], dst, cfg, text_field=text_field, unit=unit, report_path=folder / f"{f.stem}.report.json",
                          cleaner=cleaner)
        print(f"[clean] {f}: kept {rep['documents_out']} of {rep['documents_in']} documents so far -> {dst}",
              file=__import__("sys").stderr)
        paths.append(str(dst))
    return paths


def _leaves(x, path=()):
    """(path, string) for every string inside nested dicts/lists (a record's texts)."""
    if isinstance(x, str):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, path + (i,))


def _put(x, path, value):
    for k in path[:-1]:
        x = x[k]
    x[path[-1]] = value


def clean_records(records: list[dict], cfg: CleanConfig) -> tuple[list[dict], dict]:
    """Clean fine-tuning records (chat messages, instruction/output, text/label): every string field normalised,
    the record's texts joined for the filters and duplicate checks, PII redacted field by field. Labels and roles
    (short strings) are left alone."""
    import copy

    keep_keys = {"role", "label", "labels", "class", "category", "sentiment", "name", "type"}
    c = Cleaner(CleanConfig(**{**asdict(cfg), "pii": None}))  # decide on the joined text, redact per field below
    guard = Cleaner(CleanConfig(dedup=[], pii=cfg.pii)).guard if cfg.pii else None
    c.redactor = guard
    out = []
    for rec in records:
        rec = copy.deepcopy(rec)
        fields = [(p, v) for p, v in _leaves(rec) if not (p and p[-1] in keep_keys)]
        if cfg.normalize:
            for p, v in fields:
                _put(rec, p, normalize_text(v))
            fields = [(p, normalize_text(v)) for p, v in fields]
        joined = "\n".join(v for _, v in fields)
        if c(joined) is None:
            continue
        if guard is not None:
            for p, v in fields:
                found = guard.scan(v, classify=False)
                if found:
                    c.pii.update(f.type for f in found)
                    c.modified["pii_redacted"] += 1
                    _put(rec, p, guard.redact(v, found))
        out.append(rec)
    report = c.report()
    report["config"]["pii"] = cfg.pii
    return out, report
