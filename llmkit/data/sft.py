"""Fine-tuning data: read a task file, tokenize it (loss masks for chat), batch it.

Tasks: chat (OpenAI-style {"messages": [...]}), instruct (Alpaca instruction/input/output, rendered through the
model's own chat template), classify (CSV/TSV/JSONL text + label), tag (CoNLL or JSONL tokens + IOB2/IOBES tags:
data.conll), text (plain-text continued pretraining).
Chat and instruct train on assistant tokens only: each assistant turn's span is found by rendering the conversation
up to that turn with add_generation_prompt=True, then up to and including it, with the model's own template; inside
it the reply's tokens and its end-of-turn token are trained (see assistant_mask).
Used by the finetune, federated and distill recipes and by `llmkit finetune --clean`.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from llmkit.data.conll import looks_like_conll, sentences, tag_examples
from llmkit.data.corpus import IGNORE
from llmkit.infer.classify import encode_texts, pad_batch
from llmkit.utils.io import read_utf8

TASKS = ("chat", "instruct", "classify", "tag", "text")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment")


# ---------------------------------------------------------------------------------------------------------------
# reading files


def read_task_data(path) -> tuple[list, str]:
    """Records of a JSON/JSONL/CSV/TSV file (dicts) or the text of a .txt file, and the file kind."""
    p = Path(path)
    raw = read_utf8(p)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        if not rows:
            raise ValueError(f"{path} has a header but no rows")
        return rows, "table"
    if suffix in (".json", ".jsonl"):
        stripped = raw.lstrip()
        if stripped.startswith("["):
            try:
                recs = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None
        else:
            recs = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n} is not valid JSON ({e})") from None
        if not recs or not all(isinstance(r, dict) for r in recs):
            raise ValueError(f"{path} must hold JSON objects (one per line, or a list of them)")
        return recs, "records"
    return raw, "text"


def detect_task(data, kind: str) -> str:
    """chat / instruct / classify / tag / text from a file's records."""
    if kind == "text":
        return "tag" if looks_like_conll(data) else "text"
    first = data[0]
    if "tokens" in first and "tags" in first:
        return "tag"
    if "messages" in first:
        return "chat"
    if "instruction" in first:
        return "instruct"
    if "text" in first and len(first) == 1:
        return "text"
    return "classify"


# ---------------------------------------------------------------------------------------------------------------
# chat / instruct: token ids + labels that keep only assistant tokens


def alpaca_to_messages(rec: dict) -> list[dict]:
    """An Alpaca record as a user/assistant conversation."""
    if "output" not in rec:
        raise ValueError(f"instruct record has no 'output' field: {str(rec)[:80]}")
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns as the template writes them
    (after the generation prompt, through whatever the template puts after the turn, e.g. ChatML's "<|im_end|>\n")."""
    text = tok.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ValueError("the chat template does not render conversations turn by turn (a prefix of the "
                             "conversation does not render as a prefix of the whole); cannot find assistant tokens")
        spans.append((len(before), len(through)))
    return text, spans


def _reply_chars(text: str, span: tuple[int, int], content) -> tuple[int, int]:
    """Where the reply's own text lies inside a template span: the content as written, or trimmed (templates that
    strip it), else the whole span."""
    a, b = span
    if isinstance(content, str):
        for c in (content, content.strip()):
            at = text.find(c, a, b)
            if at >= 0:
                return at, at + len(c)
    return a, b


def assistant_mask(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained: the tokens of each assistant
    reply and its end-of-turn token (the first special token after the reply, e.g. <|im_end|>), and nothing the
    template writes after that (ChatML's trailing newline) or before the reply (the assistant header).

    A token that straddles the header and the reply (byte-level BPE merges the header's "\n" with a reply's leading
    "\n" into one "\n\n" token) is trained: it holds reply text, and masking it would drop the reply's first
    characters from the loss. If no special token follows the reply inside the template's span, the whole rest of the
    span is trained."""
    if "assistant" not in [m.get("role") for m in messages]:
        raise ValueError("chat record has no assistant turn, so there is nothing to train on")
    text, spans = assistant_spans(tok, messages)
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), enc.offsets
    special = set(tok.all_special_ids)
    replies = [m for m in messages if m.get("role") == "assistant"]
    keep = [False] * len(ids)
    for (a, b), m in zip(spans, replies):
        start, reply_end = _reply_chars(text, (a, b), m.get("content"))
        end = b  # through the end-of-turn token: the first special token starting at or after the reply's end
        for t, (s, e) in enumerate(offsets):
            if reply_end <= s < b and ids[t] in special:
                end = e
                break
        for t, (s, e) in enumerate(offsets):
            if s < end and e > start:  # overlaps [start, end): straddling tokens included
                keep[t] = True
    return ids, keep


def encode_chat(tok, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated); labels[t] = ids[t + 1] where that token is an assistant token, else IGNORE."""
    ids, keep = assistant_mask(tok, messages)
    truncated = len(ids) > max_length
    ids, keep = ids[:max_length], keep[:max_length]
    labels = [ids[t + 1] if keep[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, labels, truncated


# ---------------------------------------------------------------------------------------------------------------
# classification data


def _column(rows, given, candidates, what, path):
    cols = list(rows[0].keys())
    if given:
        if given not in cols:
            raise ValueError(f"{path} has no {what} column {given!r} (columns: {', '.join(map(str, cols))})")
        return given
    for c in candidates:
        if c in cols:
            return c
    raise ValueError(f"{path}: cannot find a {what} column among {', '.join(map(str, cols))}; "
                     f"name it with --{what}-column")


def label_name(value) -> str:
    """A label as a class name: what a classifier's id2label holds ("1" for the JSON number 1 and for "1")."""
    if isinstance(value, bool):
        return str(value).lower()  # JSON true/false as written
    return str(value).strip()


def label_set(labels: list[str]) -> dict[str, str]:
    """id2label for the label names: numeric labels in numeric order, others sorted."""
    uniq = sorted(set(labels), key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0, s))
    return {str(i): lab for i, lab in enumerate(uniq)}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def label_ids(labels: list[str], names: list[str], where="the data") -> list[int]:
    """Class ids of label names (label_name) under a classifier's class names (id2label in id order).

    The one reader of classification labels (finetune, distill and eval classify): a label is a class name. Only
    when no class name is an integer (e.g. "negative", "positive", or LABEL_0) and every label is an integer in
    range are the labels read as class indices (GLUE-style 0/1 data scored with a named-label model). A model
    trained on labels 1 and 2 thus reads 1 as class "1" and 2 as class "2", never as indices.
    """
    label2id = {v: i for i, v in enumerate(names)}
    if all(lab in label2id for lab in labels):
        return [label2id[lab] for lab in labels]
    as_index = not any(_is_int(n) for n in names)
    if as_index and all(_is_int(lab) and 0 <= int(lab) < len(names) for lab in labels):
        return [int(lab) for lab in labels]
    i, lab = next((i, lab) for i, lab in enumerate(labels, 1)
                  if lab not in label2id and not (as_index and _is_int(lab) and 0 <= int(lab) < len(names)))
    if as_index and _is_int(lab):
        raise ValueError(f"{where}: record {i}: label {lab} is out of range for the model's {len(names)} labels "
                         f"{names}")
    raise ValueError(f"{where}: record {i}: label {lab!r} is not one of the model's labels {names}")


def read_classification(path, text_column=None, label_column=None, id2label=None):
    """(texts, label ids, id2label) of a CSV/TSV/JSONL file; a given id2label must cover every label (label_ids)."""
    rows, kind = read_task_data(path)
    if kind == "text":
        raise ValueError(f"{path}: classification data must be CSV, TSV or JSONL with text and label columns")
    tcol = _column(rows, text_column, TEXT_COLUMNS, "text", path)
    lcol = _column(rows, label_column, LABEL_COLUMNS, "label", path)
    texts, labels = [], []
    for n, r in enumerate(rows, 1):
        t, lab = r.get(tcol), r.get(lcol)
        if t is None or lab is None or str(lab).strip() == "":
            raise ValueError(f"{path} row {n} has no {tcol!r} or {lcol!r} value")
        texts.append(str(t))
        labels.append(label_name(lab))
    if id2label is None:
        id2label = label_set(labels)
        if len(id2label) < 2:
            raise ValueError(f"{path}: the label column {lcol!r} has one class ({labels[0]!r}); a classifier "
                             "needs at least two")
    names = [id2label[str(i)] for i in range(len(id2label))]
    return texts, label_ids(labels, names, str(path)), id2label


# ---------------------------------------------------------------------------------------------------------------
# batches (what the shared training loop iterates)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of {"input_ids", "labels"} into tensors with an attention mask."""
    ids, mask = pad_batch([e["input_ids"] for e in examples], pad_id)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full(ids.shape, IGNORE, dtype=torch.long) if seq_labels else \
        torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    if seq_labels:
        for i, e in enumerate(examples):
            labels[i, :len(e["input_ids"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ExampleLoader:
    """Padded batches of variable-length examples: shuffled each epoch, similar lengths batched together, resumable,
    split by rank.

    The state is (epoch, cursor); the order is a pure function of (seed, epoch). Under several processes every rank
    draws the same global batch (batch_size * world_size examples) and keeps its own slice, so N processes see
    exactly the examples one process with an N times larger batch would (as data.corpus.BlockLoader does). With
    shuffle=False it yields the examples once, in order, unsplit (evaluation: every rank scores the whole set).
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 collate_fn=None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        if shuffle and len(examples) < batch_size * world_size:
            many = f" ({world_size} processes x --batch-size {batch_size})" if world_size > 1 else ""
            raise ValueError(f"{len(examples)} training examples are fewer than one batch of {batch_size * world_size}"
                             f"{many}: use more data or a smaller --batch-size")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.collate = collate_fn or collate  # e.g. distill.kd_collate adds cached teacher outputs
        self.epoch, self.cursor, self._batches = 0, 0, None

    def _epoch_batches(self) -> list[list[int]]:
        """This epoch's global batches (batch_size * world_size example indices each)."""
        n, bs = len(self.examples), self.batch_size * (self.world_size if self.shuffle else 1)
        if not self.shuffle:
            return [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        # sort within windows of 32 batches by length: little padding, still random (what HF's group_by_length does)
        win = bs * 32
        order = [i for s in range(0, n, win)
                 for i in sorted(order[s:s + win], key=lambda i: len(self.examples[i]["input_ids"]))]
        batches = [order[s:s + bs] for s in range(0, n - bs + 1, bs)]  # drop the ragged last batch
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __len__(self) -> int:
        """Global batches per epoch (optimizer steps without accumulation)."""
        if not self.shuffle:
            return -(-len(self.examples) // self.batch_size)
        return len(self.examples) // (self.batch_size * self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict):
        self.epoch, self.cursor, self._batches = state["epoch"], state["cursor"], None

    def __iter__(self):
        if not self.shuffle:
            for b in self._epoch_batches():
                yield self.collate([self.examples[i] for i in b], self.pad_id)
            return
        while True:
            if self._batches is None:
                self._batches = self._epoch_batches()
            if self.cursor >= len(self._batches):
                self.epoch, self.cursor, self._batches = self.epoch + 1, 0, self._epoch_batches()
            b = self._batches[self.cursor]
            self.cursor += 1
            mine = b[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # this rank's slice
            yield self.collate([self.examples[i] for i in mine], self.pad_id)


# ---------------------------------------------------------------------------------------------------------------
# examples of a task file


def build_examples(tok, data, kind: str, task: str, fc, id2label=None, path="") -> tuple:
    """(examples, id2label, texts, labels, number truncated) for one data file; fc gives max_length, text_column and
    label_column (a train.setup.FinetuneConfig)."""
    texts = golds = None
    if task in ("chat", "instruct"):
        if kind != "records":
            raise ValueError(f"{path}: {task} data must be JSON or JSONL records")
        examples, cut = [], 0
        for n, rec in enumerate(data, 1):
            if task == "chat":
                msgs = rec.get("messages")
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
                    raise ValueError(f"{path} record {n}: 'messages' must be a list of {{role, content}} objects")
            else:
                if "instruction" not in rec:
                    raise ValueError(f"{path} record {n} has no 'instruction' field")
                msgs = alpaca_to_messages(rec)
            try:
                ids, labels, truncated = encode_chat(tok, msgs, fc.max_length)
            except ValueError as e:
                raise ValueError(f"{path} record {n}: {e}") from None
            cut += truncated
            if any(lab != IGNORE for lab in labels):
                examples.append({"input_ids": ids, "labels": labels})
        if not examples:
            raise ValueError(f"{path}: no example keeps an assistant token within --max-length {fc.max_length}")
        if len(examples) < len(data):  # an answer cut away entirely leaves nothing to learn: say so
            print(f"{path}: skipped {len(data) - len(examples)} record(s) whose assistant turns all lie beyond "
                  f"--max-length {fc.max_length}", file=sys.stderr)
        return examples, None, None, None, cut
    if task == "classify":
        texts, golds, id2label = read_classification(path, fc.text_column, fc.label_column, id2label)
        ids, cut = encode_texts(tok, texts, fc.max_length)
        return [{"input_ids": x, "labels": y} for x, y in zip(ids, golds)], id2label, texts, golds, cut
    if task == "tag":
        return tag_examples(tok, sentences(data, kind, path), fc.max_length, id2label, path)
    if task == "text":
        text = data if kind == "text" else "\n\n".join(str(r.get("text", "")) for r in data)
        ids = tok.encode(text, add_special_tokens=False)
        L = fc.max_length
        if len(ids) < 2:
            raise ValueError(f"{path} holds no text to train on")
        blocks = [ids[s:s + L + 1] for s in range(0, max(1, len(ids) - 1), L)]
        return [{"input_ids": b[:-1], "labels": b[1:]} for b in blocks if len(b) > 1], None, None, None, 0
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def split_train_val(examples, fraction, seed, *cols):
    """([train examples, *train columns], [val examples, *val columns]): `fraction` held out at random (seeded)."""
    n_val = max(1, int(round(len(examples) * fraction)))
    if not 0 < fraction < 1 or n_val >= len(examples):
        raise ValueError(f"--val-fraction {fraction} leaves no training or no validation examples "
                         f"({len(examples)} in all); pass --val-data")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val, tr = perm[:n_val], perm[n_val:]
    pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return [pick(c, tr) for c in (examples, *cols)], [pick(c, val) for c in (examples, *cols)]
