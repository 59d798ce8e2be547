"""llmkit's own datatrove steps for `llmkit data clean`: the input reader (datatrove's JSONL/Parquet readers, ours
for .txt/.csv/.tsv, files split into contiguous shards), NFKC normalisation, minimum length, py3langid language id,
the digit-ratio rule, PII redaction through the guard, Gopher/C4 filters on a local word splitter, and a MinHash
cluster stage that checks each candidate pair's estimated Jaccard and keeps the earliest document of a cluster.

datatrove is an optional dependency: import this module only when it is installed (data/pipeline.py does).
"""
from __future__ import annotations

import csv
import io
import re
import struct

import numpy as np
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.c4_filters import C4QualityFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.word_tokenizers import WordTokenizer

from llmkit.data.clean import normalize_text
from llmkit.trust.guard import Guard, Policy

RECORD = "record"  # metadata key holding a record's other fields (id, url, ...), written back flat at the end
FIELDS = "fields"  # metadata flag: a fine-tuning record cleaned field by field (its texts joined for the filters)
KEEP_KEYS = {"role", "label", "labels", "class", "category", "sentiment", "name", "type"}  # short labels, untouched


def leaves(x, path=()):
    """(path, string) for every string inside nested dicts/lists (a record's texts), labels and roles left out."""
    if isinstance(x, str):
        if not (path and path[-1] in KEEP_KEYS):
            yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, path + (i,))


def _put(x, path, value):
    for k in path[:-1]:
        x = x[k]
    x[path[-1]] = value


def _fields_adapter(self, data: dict, path: str, id_in_file: int) -> dict:
    """A fine-tuning record (chat messages, instruction/output, text/label): its texts joined are the document."""
    return {"text": "\n".join(v for _, v in leaves(data)), "id": f"{path}/{id_in_file}",
            "metadata": {RECORD: data, FIELDS: True}}
READABLE = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")


class Words(WordTokenizer):
    """Whitespace words and [.!?] sentences, as llmkit's rules counted them; datatrove's English tokenizer is
    spaCy's, and its sentence splitter nltk's punkt, which downloads its model on first use."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        ends = [m.end() for m in re.finditer(r"[.!?]+(?=\s|$)", text)]
        if not ends or text[ends[-1]:].strip():
            ends.append(len(text))
        return list(zip([0] + ends[:-1], ends))

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text)]


def _record_adapter(self, data: dict, path: str, id_in_file: int) -> dict:
    """A record's text becomes the document's, every other field stays in metadata to be written back."""
    text = data.pop(self.text_key, None)
    return {"text": text if isinstance(text, str) else "", "id": f"{path}/{id_in_file}", "metadata": {RECORD: data}}


class Inputs(PipelineStep):
    """Reads the input files, each task a contiguous run of them in the order given (so a task's rank and a
    document's place in it give the document's place in the whole input, whatever the number of tasks)."""

    name = "llmkit inputs"
    type = "📖 - READER"

    def __init__(self, files: list[str], text_field: str = "text", unit: str = "line", records: bool = False):
        super().__init__()
        self.files, self.text_field, self.unit, self.records = list(files), text_field, unit, records

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        n = len(self.files)
        for path in self.files[rank * n // world_size:(rank + 1) * n // world_size]:
            folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
            suffix = "." + name.rsplit(".", 1)[-1].lower()
            if suffix == ".jsonl":
                docs = JsonlReader(folder, adapter=_fields_adapter if self.records else _record_adapter,
                                   text_key=self.text_field,
                                   add_file_path=False).read_file(name)
            elif suffix == ".parquet":
                docs = ParquetReader(folder, adapter=_record_adapter, text_key=self.text_field).read_file(name)
            else:
                docs = self._text_file(folder, name, suffix)
            for doc in docs:
                self.stat_update("documents_in")
                self.stat_update("bytes_in", value=len(doc.text.encode()))
                yield doc

    def _text_file(self, folder: str, name: str, suffix: str):
        with get_datafolder(folder).open(name, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{folder}/{name} is not UTF-8 (line {line})") from None
        if suffix in (".csv", ".tsv"):
            rows = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
            if self.text_field not in (rows.fieldnames or []):
                raise ValueError(f"{folder}/{name} has no column {self.text_field!r} (columns: {rows.fieldnames})")
            items = [(r.pop(self.text_field) or "", {RECORD: r}) for r in rows]
        else:
            parts = text.splitlines() if self.unit == "line" else re.split(r"\n\s*\n", text)
            items = [(p, {}) for p in parts if p.strip()]
        for i, (t, meta) in enumerate(items):
            if t.strip():
                yield Document(text=t, id=f"{name}/{i}", metadata=meta)


class Intermediate(JsonlReader):
    """Task r reads the r-th file of an earlier stage (none when that task kept no document)."""

    def __init__(self, folder):
        super().__init__(folder, compression=None, add_file_path=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])


class Normalize(PipelineStep):
    """NFKC, control and zero-width characters removed, whitespace runs collapsed (data/clean.py's rule)."""

    name = "llmkit normalise"
    type = "✂️ - FORMAT"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            if doc.metadata.get(FIELDS):  # each text of the record, then the joined text again
                rec = doc.metadata[RECORD]
                for p, v in list(leaves(rec)):
                    _put(rec, p, normalize_text(v))
                doc.text = "\n".join(v for _, v in leaves(rec))
            norm = normalize_text(doc.text)
            if norm != doc.text:
                self.stat_update("modified_normalized")
            doc.text = norm
            if not norm:
                self.stat_update("dropped_empty")
                continue
            yield doc


class MinChars(BaseFilter):
    name = "llmkit min chars"

    def __init__(self, min_chars: int):
        super().__init__()
        self.min_chars = min_chars

    def filter(self, doc):
        return len(doc.text) >= self.min_chars or (False, "min_chars")


class Language(BaseFilter):
    """py3langid (its 4.5 MB model ships in the wheel): keep a document when one of langs has a normalised
    probability >= threshold. datatrove's LanguageFilter downloads a fastText model instead."""

    name = "llmkit language"

    def __init__(self, langs: list[str], threshold: float):
        super().__init__()
        self.langs, self.threshold, self._lid = list(langs), threshold, None

    def filter(self, doc):
        if self._lid is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._lid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, p = self._lid.classify(doc.text)
        if lang in self.langs and p >= self.threshold:
            return True
        self.stat_update(f"language_{lang}")
        return False, "language"


class DigitRatio(BaseFilter):
    """Not in Gopher: drop documents whose characters are more than 25 % digits (tables, phone lists, IDs)."""

    name = "llmkit digit ratio"

    def filter(self, doc):
        return sum(c.isdigit() for c in doc.text) / max(1, len(doc.text)) <= 0.25 or (False, "digit_ratio")


class Gopher(GopherQualityFilter):
    def __init__(self):
        super().__init__(language=Words())


class GopherRepetition(GopherRepetitionFilter):
    def __init__(self):
        super().__init__(language=Words())

    def filter(self, doc):
        kept = super().filter(doc)
        return kept if kept is True else (False, "gopher_" + kept[1])


class C4(C4QualityFilter):
    def __init__(self):
        super().__init__(language=Words())

    def filter(self, doc):
        before = doc.text
        kept = super().filter(doc)
        if kept is not True:
            return False, {"too_few_sentences": "c4_few_sentences"}.get(kept[1], "c4_" + kept[1])
        if doc.text != before:
            self.stat_update("modified_c4_lines_removed")
        return True


class Redact(PipelineStep):
    """PII through the guard's validated recognisers and policy (redact, mask or hash)."""

    name = "llmkit PII"
    type = "🔏 - PII"

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def run(self, data, rank: int = 0, world_size: int = 1):
        guard = Guard(Policy(pii_mode=self.mode, pii_input="redact"))
        for doc in data:
            if doc.metadata.get(FIELDS):
                rec = doc.metadata[RECORD]
                for p, v in list(leaves(rec)):
                    _put(rec, p, self._redact(guard, v))
            else:
                doc.text = self._redact(guard, doc.text)
            yield doc

    def _redact(self, guard, text: str) -> str:
        found = guard.scan(text, classify=False)
        if not found:
            return text
        self.stat_update("modified_pii_redacted")
        for f in found:
            self.stat_update(f"pii_{f.type}")
        return guard.redact(text, found)


class Tally(PipelineStep):
    """Counts what is left (documents_out, bytes_out) just before the writer."""

    name = "llmkit tally"
    type = "📊 - STATS"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("documents_out")
            self.stat_update("bytes_out", value=len(doc.text.encode()))
            yield doc


def _output_adapter(self, doc: Document) -> dict:
    if doc.metadata.get(FIELDS):
        return doc.metadata[RECORD]
    return {**doc.metadata.get(RECORD, {}), self.text_field: doc.text}


class Output(JsonlWriter):
    """One JSONL file per task (named by rank): each record as it came in, its text cleaned."""

    def __init__(self, folder, text_field: str = "text"):
        super().__init__(folder, "${rank}.jsonl", compression=None, adapter=_output_adapter)
        self.text_field = text_field


def exact_text(doc: Document) -> str:
    return doc.text


def earliest_first(doc: Document) -> int:
    """ExactDedupFilter keeps the copy of highest priority, then the lowest index in its task: priority by task
    rank keeps the earliest copy of the whole input (contiguous shards)."""
    return max(1, 65535 - doc.metadata.get("_rank", 0))


class TagRank(PipelineStep):
    name = "llmkit rank"
    type = "📊 - STATS"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["_rank"] = rank
            yield doc


class VerifiedCluster(PipelineStep):
    """MinHash stage 3 in place of datatrove's MinhashDedupCluster: each candidate pair from the buckets counts only
    when its signatures agree on at least `cut` of their hashes (MinHash's estimate of the Jaccard), and a cluster
    keeps its earliest document (the lowest (task, index), which is input order), so the output does not depend on
    the number of tasks. Memory: the signatures of documents in candidate pairs only."""

    name = "llmkit MinHash cluster"
    type = "🫂 - DEDUP"

    def __init__(self, sig_folder, dup_folder, output_folder, config, cut: float):
        super().__init__()
        self.sig_folder, self.dup_folder = get_datafolder(sig_folder), get_datafolder(dup_folder)
        self.output_folder, self.config, self.cut = get_datafolder(output_folder), config, cut

    def _signatures(self, nodes: set) -> dict:
        cfg = self.config
        r, size = cfg.hashes_per_bucket, cfg.num_buckets * cfg.hashes_per_bucket
        dtype = np.dtype([("h", f"<{cfg.hash_config.struct_format}", (r,)), ("doc", "<u4")])
        by_rank: dict[int, np.ndarray] = {}
        for f, d in nodes:
            by_rank.setdefault(f, []).append(d)
        sigs = {n: np.zeros(size, dtype=dtype["h"].base) for n in nodes}
        for b in range(cfg.num_buckets):
            for name in self.sig_folder.list_files(subdirectory=f"bucket_{b:03d}"):
                rank = int(name.rsplit("/", 1)[-1].split(".")[0])
                if rank not in by_rank:
                    continue
                with self.sig_folder.open(name, "rb") as fh:
                    rows = np.frombuffer(fh.read(), dtype=dtype)
                for row in rows[np.isin(rows["doc"], by_rank[rank])]:
                    sigs[(rank, int(row["doc"]))][b * r:(b + 1) * r] = row["h"]
        return sigs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pairs = []
        for name in self.dup_folder.list_files(glob_pattern="*.dups"):
            with self.dup_folder.open(name, "rb") as fh:
                pairs += [((f1, d1), (f2, d2)) for f1, d1, f2, d2 in read_tuples_from_file(fh, "4I")]
        sigs = self._signatures({n for p in pairs for n in p})
        root: dict = {}

        def find(x):
            while root.setdefault(x, x) != x:
                root[x] = root[root[x]]
                x = root[x]
            return x

        for a, b in pairs:
            if float(np.mean(sigs[a] == sigs[b])) < self.cut:
                self.stat_update("pairs_rejected")
                continue
            ra, rb = find(a), find(b)
            if ra != rb:
                root[max(ra, rb)] = min(ra, rb)  # the earliest document is the cluster's root, the one kept
        with self.output_folder.get_output_file_manager(mode="wb") as out:
            for node in sorted(root):  # ascending (task, index): each .remove file in order
                if find(node) != node:
                    out.write(f"{node[0]:06d}.remove", struct.pack("<I", node[1]))
                    self.stat_update("to_remove")
