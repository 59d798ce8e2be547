"""Pretraining data: read text files, tokenize once into a cached memmap, serve fixed-length blocks (CLM or MLM).

Every batch is a dict {"input_ids": (B, T), "labels": (B, T)} with labels already aligned to the positions the loss
scores (-100 = not scored), so train.py's loop needs nothing objective-specific.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from llmkit.utils.io import check_file

IGNORE = -100
FORMATS = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_text_lossy(path) -> tuple[str, int]:
    """A file's text decoded as UTF-8 with invalid bytes replaced by U+FFFD, and how many were replaced."""
    raw = check_file(path).read_bytes()
    text = raw.decode("utf-8", errors="replace")
    # replacement characters that were already in the file are not errors
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    return text, bad


def read_texts(path, text_field: str = "text", lines: bool = False) -> list[str]:
    """The documents of a .txt (whole file, or one per line), .jsonl/.json, .csv/.tsv or .parquet file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported data file {path}: use one of {', '.join(FORMATS)}")
    if suffix == ".parquet":
        check_file(p)
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if text_field not in table.column_names:
            raise ValueError(f"{path} has no column {text_field!r} (columns: {table.column_names}); pass --text-field")
        return [t for t in table.column(text_field).to_pylist() if t]
    text, bad = read_text_lossy(p)
    if bad:
        print(f"warning: {path}: replaced {bad} invalid UTF-8 byte sequence(s) with U+FFFD", file=sys.stderr)
    if suffix == ".txt":
        return [t for t in text.splitlines()] if lines else ([text] if text else [])
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        if rows and text_field not in rows[0]:
            raise ValueError(f"{path} has no column {text_field!r} (columns: {list(rows[0])}); pass --text-field")
        return [r[text_field] for r in rows if r[text_field]]
    try:
        if suffix == ".json" and text.lstrip().startswith("["):
            records = json.loads(text)
        else:  # .jsonl (also a .json holding one object per line)
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); one JSON object a line") from None
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or text_field not in r:
            raise ValueError(f"{path}: record {i + 1} has no {text_field!r} field; pass --text-field")
        if r[text_field]:
            out.append(str(r[text_field]))
    return out


def iter_documents(path, text_field: str = "text", unit: str = "line"):
    """Stream the documents of a file without reading it whole: .txt one per line (unit="line") or per blank-line
    separated block (unit="doc"), .jsonl records, .csv/.tsv rows, .parquet row groups (.json arrays are read whole).
    Strict UTF-8: a bad byte raises ValueError naming the file and line."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported data file {path}: use one of {', '.join(FORMATS)}")
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if p.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(p)
        if text_field not in f.schema_arrow.names:
            names = f.schema_arrow.names
            raise ValueError(f"{path} has no column {text_field!r} (columns: {names}); pass --text-field")
        for batch in f.iter_batches(columns=[text_field], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    if suffix == ".json":
        yield from read_texts(p, text_field)
        return
    with open(p, encoding="utf-8", newline="") as f:
        lines = _strict_lines(f, path)
        if suffix in (".csv", ".tsv"):
            for row in csv.DictReader(lines, delimiter="\t" if suffix == ".tsv" else ","):
                if text_field not in row:
                    raise ValueError(f"{path} has no column {text_field!r} (columns: {list(row)}); pass --text-field")
                if row[text_field]:
                    yield row[text_field]
        elif suffix == ".jsonl":
            yield from (text for text, _ in jsonl_records(lines, path, text_field))
        elif unit == "line":
            yield from (line.rstrip("\r\n") for line in lines)
        else:
            block = []
            for line in lines:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\r\n")
                    block = []
            if block:
                yield "".join(block).rstrip("\r\n")


def jsonl_records(lines, path, text_field: str = "text"):
    """(text, record) for each non-blank line of a JSONL file whose text field is not empty; errors name the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict) or text_field not in r:
            raise ValueError(f"{path}:{n}: record has no {text_field!r} field; pass --text-field")
        if r[text_field]:
            yield str(r[text_field]), r


def _strict_lines(f, path):
    try:
        yield from f
    except UnicodeDecodeError:
        with open(path, "rb") as raw:  # decoding runs in chunks: find the line again, byte by byte
            for n, line in enumerate(raw, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 text (invalid byte 0x{line[e.start]:02x} at column "
                                     f"{e.start + 1})") from None
        raise ValueError(f"{path}: not UTF-8 text") from None


# ---------------------------------------------------------------------------------------------------------------
# tokenizing (once, cached)


def _chunks(docs: list[str], max_chars: int = 1 << 16):
    """Split long documents into line-aligned pieces so encoding runs in parallel and shows progress."""
    for doc in docs:
        if len(doc) <= max_chars:
            yield doc, True
            continue
        lines, piece, size = doc.splitlines(keepends=True), [], 0
        for line in lines:
            piece.append(line)
            size += len(line)
            if size >= max_chars:
                yield "".join(piece), False
                piece, size = [], 0
        yield "".join(piece), True


def tokenize_files(files, tokenizer, cache_dir, text_field: str = "text", lines: bool = False,
                   progress: bool = True) -> np.ndarray:
    """Token ids of all files (documents separated by eos), cached as a .bin memmap in cache_dir."""
    files = [check_file(f) for f in files]
    # the cache key covers the files (path, size, mtime), the reading options and the whole tokenizer
    h = hashlib.sha256(tokenizer.hf.to_str().encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{text_field}|{lines}".encode())
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    cache = Path(cache_dir) / f"{files[0].stem}-{h.hexdigest()[:16]}.bin"
    if cache.is_file():
        return np.memmap(cache, dtype=dtype, mode="r")

    from tqdm import tqdm

    docs = [d for f in files for d in read_texts(f, text_field=text_field, lines=lines)]
    if not any(docs):
        raise ValueError(f"no text in {', '.join(map(str, files))}: the data files are empty")
    sep = tokenizer.eos_id
    pieces = list(_chunks(docs))
    ids: list[np.ndarray] = []
    bar = tqdm(total=sum(len(p) for p, _ in pieces), unit="char", unit_scale=True, desc="tokenizing",
               disable=not progress, leave=False)
    for i in range(0, len(pieces), 256):
        batch = pieces[i:i + 256]
        for (text, doc_end), enc in zip(batch, tokenizer.encode_batch([p for p, _ in batch], add_special_tokens=False)):
            ids.append(np.asarray(enc, dtype=dtype))
            if doc_end and sep is not None and len(docs) > 1:
                ids.append(np.asarray([sep], dtype=dtype))
        bar.update(sum(len(p) for p, _ in batch))
    bar.close()
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    tokens.tofile(tmp)
    os.replace(tmp, cache)
    return np.memmap(cache, dtype=dtype, mode="r")


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the stream for training, the rest for validation (nanoGPT's split)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]


# ---------------------------------------------------------------------------------------------------------------
# masked-LM corruption (BERT, Devlin et al. 2018, section 3.1)


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids, generator: torch.Generator,
                prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick 15% of non-special tokens; 80% -> [MASK], 10% -> random token, 10% unchanged."""
    special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))
    picked = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    labels = torch.where(picked, ids, IGNORE)
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    # random replacements come from ordinary tokens only
    random_ids = torch.where(torch.isin(random_ids, torch.tensor(sorted(special_ids), dtype=ids.dtype)),
                             ids, random_ids)
    out = torch.where(picked & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, out)
    return out, labels


# ---------------------------------------------------------------------------------------------------------------
# batches


class BlockLoader:
    """Batches of fixed-length blocks from a token stream: shuffled each epoch, sharded by rank, resumable.

    Every rank draws the same global batch (batch_size * world_size blocks) and keeps its own slice, so N processes
    see exactly the samples one process with an N times larger batch would. The position (epoch, cursor) is the
    whole state: block order and MLM masks are pure functions of (seed, epoch, cursor).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, objective: str = "clm", seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, mask_id: int | None = None,
                 vocab_size: int = 0, special_ids=(), mask_prob: float = 0.15):
        if objective not in ("clm", "mlm"):
            raise ValueError(f"objective must be 'clm' or 'mlm', not {objective!r}")
        if objective == "mlm" and mask_id is None:
            raise ValueError("masked-LM training needs a tokenizer with a mask token (llmkit tokenizer train adds one)")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.objective, self.seed, self.rank, self.world_size, self.shuffle = objective, seed, rank, world_size, shuffle
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob
        self.special_ids = set(special_ids)
        self.span = block_size + (1 if objective == "clm" else 0)  # CLM blocks carry one extra token for the targets
        if len(tokens) < self.span:
            raise ValueError(f"data has {len(tokens)} tokens, fewer than one block of {self.span}: "
                             f"use more data or a smaller --block-size")
        self.epoch, self.cursor = 0, 0
        self._starts = None

    def _epoch_starts(self) -> np.ndarray:
        n = len(self.tokens)
        if not self.shuffle:
            return np.arange(0, n - self.span + 1, self.block_size)
        rng = np.random.default_rng([self.seed, self.epoch])
        # a random phase each epoch so block boundaries move, then non-overlapping blocks in random order
        offset = int(rng.integers(0, max(1, min(self.block_size, n - self.span + 1))))
        starts = np.arange(offset, n - self.span + 1, self.block_size)
        return starts[rng.permutation(len(starts))]

    def __len__(self) -> int:
        """Global batches per epoch."""
        n_blocks = len(range(0, len(self.tokens) - self.span + 1, self.block_size))
        return n_blocks // (self.batch_size * self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict):
        self.epoch, self.cursor, self._starts = state["epoch"], state["cursor"], None

    def __iter__(self):
        if not self.shuffle:  # evaluation: the same blocks from the start every time
            self.epoch, self.cursor, self._starts = 0, 0, None
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> dict | None:
        """The next batch of this rank, or None when an unshuffled (evaluation) loader is exhausted."""
        global_bs = self.batch_size * self.world_size
        if self._starts is None:
            self._starts = self._epoch_starts()
            if len(self._starts) < global_bs and self.shuffle:
                raise ValueError(f"data holds {len(self._starts)} blocks of {self.block_size} tokens, fewer than one "
                                 f"batch of {global_bs}: use more data or a smaller --batch-size/--block-size")
        if self.cursor + global_bs > len(self._starts):
            if not self.shuffle:
                return None
            self.epoch, self.cursor = self.epoch + 1, 0
            self._starts = self._epoch_starts()
        row0 = self.cursor + self.rank * self.batch_size  # this rank's first row within the global batch
        starts = self._starts[row0:row0 + self.batch_size]
        self.cursor += global_bs
        blocks = torch.from_numpy(np.stack([self.tokens[s:s + self.span] for s in starts]).astype(np.int64))
        if self.objective == "clm":
            return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}
        # each row's mask depends only on its place in the global batch: same masks for any number of ranks
        g = torch.Generator()
        rows = []
        for i, row in enumerate(blocks):
            g.manual_seed(hash((self.seed, self.epoch, row0 + i)) & 0x7FFFFFFFFFFF)
            rows.append(mask_tokens(row, self.mask_id, self.vocab_size, self.special_ids, g, self.mask_prob))
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}
