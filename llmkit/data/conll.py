"""Tagged sentences for token classification (named entities): CoNLL files and JSONL records, checked, as examples.

CoNLL: one `token<TAB>tag` a line (spaces also separate; with more columns the first is the token and the last the
tag, as in CoNLL-2003), a blank line between sentences, `-DOCSTART-` lines skipped. JSONL: one
`{"tokens": [...], "tags": [...]}` a line. Tags are IOB2 or IOBES (O, B-TYPE, I-TYPE, E-TYPE, S-TYPE); every error
names the file and the line. Examples carry the word tag on each word's first sub-token and IGNORE elsewhere
(infer.tag.encode_words aligns them).
"""
from __future__ import annotations

import re
from pathlib import Path

from llmkit.data.corpus import IGNORE
from llmkit.infer.tag import encode_words
from llmkit.utils.io import read_json_records, read_utf8

TAG = re.compile(r"^(O|[BIES]-\S+)$")
CONLL_SUFFIXES = (".conll", ".conllu", ".bio", ".iob", ".iob2", ".iobes", ".ner")


def _check_tag(tag: str, path, n: int):
    if not TAG.match(tag):
        raise ValueError(f"{path} line {n}: tag {tag!r} is not IOB2/IOBES (O, B-TYPE, I-TYPE, E-TYPE or S-TYPE)")


def parse_conll(text: str, path="") -> list[tuple[list[str], list[str]]]:
    """(words, tags) of each sentence of CoNLL text."""
    sents, words, tags = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if words:
                sents.append((words, tags))
                words, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols if c.strip()]
        if len(cols) < 2:
            raise ValueError(f"{path} line {n}: expected 'token<TAB>tag', got {line[:60]!r}")
        _check_tag(cols[-1], path, n)
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sents.append((words, tags))
    return sents


def parse_records(recs: list, path="") -> list[tuple[list[str], list[str]]]:
    """(words, tags) of JSON records {"tokens": [...], "tags": [...]} (record n is line n of a JSONL file)."""
    sents = []
    for n, r in enumerate(recs, 1):
        words, tags = (r.get("tokens"), r.get("tags")) if isinstance(r, dict) else (None, None)
        if not (isinstance(words, list) and isinstance(tags, list)):
            raise ValueError(f"{path} line {n}: a record needs 'tokens' and 'tags' lists")
        if len(words) != len(tags):
            raise ValueError(f"{path} line {n}: {len(words)} tokens but {len(tags)} tags")
        if not all(isinstance(w, str) and w.strip() and not any(c.isspace() for c in w) for w in words):
            raise ValueError(f"{path} line {n}: every token must be a non-empty string without spaces")
        for t in tags:
            _check_tag(str(t), path, n)
        if words:
            sents.append((list(words), [str(t) for t in tags]))
    return sents


def looks_like_conll(text: str) -> bool:
    """The first non-blank lines all read `token<TAB or space>tag` with an IOB2/IOBES tag."""
    lines = [x for x in text.splitlines()[:200] if x.strip() and not x.startswith("-DOCSTART-")][:20]
    return bool(lines) and all(len(x.split()) >= 2 and TAG.match(x.split()[-1]) for x in lines)


def sentences(data, kind: str, path="") -> list[tuple[list[str], list[str]]]:
    """(words, tags) of what data.sft.read_task_data read: CoNLL text, or records; at least one sentence."""
    sents = parse_conll(data, path) if kind == "text" else parse_records(data, path) if kind == "records" else None
    if sents is None:
        raise ValueError(f"{path}: tagging data must be CoNLL (token<TAB>tag lines) or JSONL {{tokens, tags}}")
    if not sents:
        raise ValueError(f"{path} holds no tagged sentence")
    return sents


def read_tagged(path) -> list[tuple[list[str], list[str]]]:
    """(words, tags) of each sentence of a CoNLL or JSONL file."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        return sentences(read_json_records(p), "records", path)
    return sentences(read_utf8(p), "text", path)


def tag_set(tag_lists) -> dict[str, str]:
    """id2label for the tags seen: O first, then by entity type, B/I/E/S within a type."""
    seen = {t for tags in tag_lists for t in tags} | {"O"}
    rank = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}
    ordered = sorted(seen, key=lambda t: ("" if t == "O" else t[2:], rank[t[0]]))
    return {str(i): t for i, t in enumerate(ordered)}


def tag_examples(tok, sents, max_length: int, id2label=None, path="") -> tuple:
    """(examples {"input_ids", "labels"}, id2label, their words, their tags, sentences cut by max_length), what
    data.sft.build_examples returns; labels hold the tag id on each word's first sub-token, IGNORE elsewhere. A given
    id2label (the training set's) must hold every tag."""
    id2label = id2label or tag_set(tags for _, tags in sents)
    label2id = {v: int(k) for k, v in id2label.items()}
    examples, kept, cut = [], [], 0
    for n, (words, tags) in enumerate(sents, 1):
        unknown = next((t for t in tags if t not in label2id), None)
        if unknown is not None:
            raise ValueError(f"{path}: sentence {n}: tag {unknown!r} is not among the training tags "
                             f"{sorted(label2id)}")
        ids, first = encode_words(tok, words, max_length)
        cut += any(t < 0 for t in first)
        labels = [IGNORE] * len(ids)
        for t, tag in zip(first, tags):
            if t >= 0:
                labels[t] = label2id[tag]
        if any(lab != IGNORE for lab in labels):
            examples.append({"input_ids": ids, "labels": labels})
            kept.append((words, tags))
    if not examples:
        raise ValueError(f"{path}: no sentence keeps a tagged word within --max-length {max_length}")
    return examples, id2label, [w for w, _ in kept], [t for _, t in kept], cut
