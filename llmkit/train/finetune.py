"""Fine-tuning recipe: read task data, tokenize it (loss masks for chat), add a head / LoRA, run train.py's loop, save.

Tasks: chat (OpenAI-style {"messages": [...]}), instruct (Alpaca instruction/input/output, rendered through the
model's own chat template), classify (CSV/TSV/JSONL text + label), text (plain-text continued pretraining).
Chat and instruct train on assistant tokens only: each assistant turn's span is found by rendering the conversation
up to that turn with add_generation_prompt=True, then up to and including it, with the model's own template.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.model import lora as lora_lib
from llmkit.data.corpus import IGNORE, read_utf8
from llmkit.train.pretrain import clm_loss

TASKS = ("chat", "instruct", "classify", "text")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment")


@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str = "default"
    task: str | None = None  # detected from the file when None
    method: str = "lora"  # lora | full
    val_data: str | None = None
    val_fraction: float = 0.1
    max_length: int = 512
    batch_size: int = 8
    text_column: str | None = None
    label_column: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r)
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    lora_layers: int | list[int] | None = None  # top N blocks, or these block indices; None: all (faster if fewer)
    seed: int = 0
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------------------------
# reading files


def read_records(path) -> tuple[list, str]:
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
    """chat / instruct / classify / text from a file's records."""
    if kind == "text":
        return "text"
    first = data[0]
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
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn marker)."""
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


def assistant_mask(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    if "assistant" not in [m.get("role") for m in messages]:
        raise ValueError("chat record has no assistant turn, so there is nothing to train on")
    text, spans = assistant_spans(tok, messages)
    enc = tok.hf.encode(text, add_special_tokens=False)
    return list(enc.ids), [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]


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


def label_set(labels: list[str]) -> dict[str, str]:
    """id2label for the label strings: numeric labels in numeric order, others sorted."""
    uniq = sorted(set(labels), key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0, s))
    return {str(i): lab for i, lab in enumerate(uniq)}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_classification(path, text_column=None, label_column=None, id2label=None):
    """(texts, label ids, id2label) of a CSV/TSV/JSONL file; a given id2label must cover every label."""
    rows, kind = read_records(path)
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
        labels.append(str(lab).strip())
    if id2label is None:
        id2label = label_set(labels)
        if len(id2label) < 2:
            raise ValueError(f"{path}: the label column {lcol!r} has one class ({labels[0]!r}); a classifier "
                             "needs at least two")
    label2id = {v: int(k) for k, v in id2label.items()}
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise ValueError(f"{path} has labels the training data lacks: {unknown[:5]}")
    return texts, [label2id[lab] for lab in labels], id2label


def encode_texts(tok, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text cut to max_length, and how many were cut."""
    ids = tok.encode_batch(texts, add_special_tokens=True)
    cut = sum(len(x) > max_length for x in ids)
    return [x[:max_length] for x in ids], cut


# ---------------------------------------------------------------------------------------------------------------
# batches and losses (what the shared training loop calls)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of {"input_ids", "labels"} into tensors with an attention mask."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long) if seq_labels else \
        torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classify_loss(model, batch):
    """Cross-entropy of the sequence-classification head, and accuracy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], head="classify")  # (B, num_labels)
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits.float(), batch["labels"]), {"acc": acc.detach()}


class ExampleLoader:
    """Padded batches of variable-length examples: shuffled each epoch, similar lengths batched together, resumable.

    The state is (epoch, cursor); the order is a pure function of (seed, epoch). With shuffle=False it yields the
    examples once, in order (evaluation).
    """

    def __init__(self, examples: list[dict], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 collate_fn=None):
        if shuffle and len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch of {batch_size}: "
                             "use more data or a smaller --batch-size")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.collate = collate_fn or collate  # e.g. distill.kd_collate adds cached teacher outputs
        self.epoch, self.cursor, self._batches = 0, 0, None

    def _epoch_batches(self) -> list[list[int]]:
        n, bs = len(self.examples), self.batch_size
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
        return len(self.examples) // self.batch_size if self.shuffle else -(-len(self.examples) // self.batch_size)

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
            yield self.collate([self.examples[i] for i in b], self.pad_id)


@torch.no_grad()
@torch.inference_mode()
def predict_proba(model, tok, texts: list[str], max_length: int = 512, batch_size: int = 32,
                  progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, num_labels) of a classifier for each text (on the CPU)."""
    from tqdm import tqdm

    if not model.config.num_labels:
        raise ValueError("this model has no classification head; fine-tune one with `llmkit finetune --task classify`")
    pad = _pad_id(tok, model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, _ = encode_texts(tok, texts, max_length)
    out = []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    bar = tqdm(total=len(order), desc="classifying", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        b = collate([{"input_ids": ids[i], "labels": 0} for i in chunk], pad)
        logits = model(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), head="classify")
        out.append(logits.float().softmax(-1).cpu())
        bar.update(len(chunk))
    bar.close()
    probs = torch.cat(out) if out else torch.zeros(0, model.config.num_labels)
    model.train(was_training)
    return probs[torch.argsort(torch.tensor(order))]


def _pad_id(tok, cfg) -> int:
    for i in (tok.pad_id if tok is not None else None, cfg.pad_token_id, tok.eos_id if tok is not None else None):
        if i is not None and i >= 0:
            return i
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the recipe


def build_examples(tok, data, kind: str, task: str, fc: FinetuneConfig, id2label=None, path="") -> tuple:
    """(examples, id2label, texts, labels, number truncated) for one data file."""
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
    if task == "text":
        text = data if kind == "text" else "\n\n".join(str(r.get("text", "")) for r in data)
        ids = tok.encode(text, add_special_tokens=False)
        L = fc.max_length
        if len(ids) < 2:
            raise ValueError(f"{path} holds no text to train on")
        blocks = [ids[s:s + L + 1] for s in range(0, max(1, len(ids) - 1), L)]
        return [{"input_ids": b[:-1], "labels": b[1:]} for b in blocks if len(b) > 1], None, None, None, 0
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _split(examples, fraction, seed, *cols):
    n_val = max(1, int(round(len(examples) * fraction)))
    if not 0 < fraction < 1 or n_val >= len(examples):
        raise ValueError(f"--val-fraction {fraction} leaves no training or no validation examples "
                         f"({len(examples)} in all); pass --val-data")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val, tr = perm[:n_val], perm[n_val:]
    pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return [pick(c, tr) for c in (examples, *cols)], [pick(c, val) for c in (examples, *cols)]


def prepare(fc: FinetuneConfig):
    """Load the base model and tokenize the data, checking everything before anything is written."""
    from llmkit.model.checkpoint import load_model

    if fc.method not in ("lora", "full"):
        raise ValueError(f"--method must be lora or full, not {fc.method!r}")
    if fc.task is not None and fc.task not in TASKS:
        raise ValueError(f"unknown task {fc.task!r}; choose one of {', '.join(TASKS)}")
    data, kind = read_records(fc.data)
    task = fc.task or detect_task(data, kind)
    lm = load_model(fc.model, dtype="float32", device=fc.device)
    fc.max_length = min(fc.max_length, lm.config.max_position_embeddings)  # capped at the model's context
    tok = lm.tokenizer
    if tok is None:
        raise ValueError(f"{fc.model} has no tokenizer; fine-tuning needs one")
    if task in ("chat", "instruct") and not tok.chat_template:
        raise ValueError(f"{fc.model} has no chat template, so {task} data cannot be rendered; use --task text")
    train_ex, id2label, texts, golds, cut = build_examples(tok, data, kind, task, fc, path=fc.data)
    if fc.val_data:
        vdata, vkind = read_records(fc.val_data)
        val_ex, _, vtexts, vgolds, vcut = build_examples(tok, vdata, vkind, task, fc, id2label, path=fc.val_data)
        cut += vcut
    else:
        (train_ex, texts, golds), (val_ex, vtexts, vgolds) = _split(train_ex, fc.val_fraction, fc.seed, texts, golds)
    if cut:
        print(f"truncated {cut} example(s) longer than --max-length {fc.max_length} tokens", file=sys.stderr)
    model = lm.model
    extra = ()
    if task == "classify":
        lora_lib.add_classifier(model, id2label)
        extra = ("score",)
    layers = fc.lora_layers
    if isinstance(layers, int):  # the top N blocks: the backward pass stops below them
        n = model.config.n_layer
        if not 0 < layers <= n:
            raise ValueError(f"--lora-layers {layers} must be between 1 and the model's {n} layers")
        layers = list(range(n - layers, n))
    lcfg = lora_lib.LoRAConfig(fc.lora_r, fc.lora_alpha, fc.lora_dropout, list(fc.lora_targets), layers,
                               use_rslora=fc.lora_rslora)
    if fc.method == "lora":
        lora_lib.inject_lora(model, lcfg, trainable=extra)
    return dict(lm=lm, task=task, train=train_ex, val=val_ex, val_texts=vtexts, val_golds=vgolds, lora=lcfg,
                extra=extra, truncated=cut)


def finetune(fc: FinetuneConfig, tc, epochs: float | None = None, dp=None):
    """Fine-tune per `fc` with train.py's loop configured by `tc` (a TrainConfig); returns the final metrics.

    tc.max_steps <= 0 means `epochs` passes over the data (default 1); tc.warmup_steps < 0 means 3% of the steps.
    dp (a privacy.DPConfig) trains with DP-SGD; the epsilon spent is logged, returned and kept in run_config.json.
    """
    from llmkit.model.checkpoint import save_model
    from llmkit.train.loop import train

    out = Path(fc.out)
    if not tc.resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: pass --resume to continue that run, or a new --out")
    if dp is not None:
        from llmkit.train import dp as privacy

        dp.check()
        privacy.check_compatible(method=fc.method, grad_accum=tc.grad_accum, resume=tc.resume, compile=tc.compile,
                                 fsdp=tc.fsdp)
    p = prepare(fc)
    lm, model, tok = p["lm"], p["lm"].model, p["lm"].tokenizer
    pad = _pad_id(tok, model.config)
    train_data = ExampleLoader(p["train"], fc.batch_size, pad, seed=fc.seed)
    if epochs is not None or tc.max_steps <= 0:
        tc.max_steps = max(1, round((epochs or 1.0) * len(train_data) / max(1, tc.grad_accum)))
    if tc.warmup_steps < 0:
        tc.warmup_steps = max(1, tc.max_steps * 3 // 100)
    val_data = ExampleLoader(p["val"], fc.batch_size, pad, shuffle=False)
    base = fc.model if fc.model == "default" else str(Path(fc.model).resolve())

    def save_fn(d, m):
        if fc.method == "lora":
            lora_lib.save_adapter(d, m, p["lora"], base=base, tokenizer=tok, extra=p["extra"])
        else:
            save_model(d, m, tok, lm.generation_config)

    loss = classify_loss if p["task"] == "classify" else clm_loss
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"{p['task']} fine-tuning ({fc.method}): {len(p['train'])} train / {len(p['val'])} val examples, "
          f"{trainable:,} of {model.num_params():,} parameters trainable", file=sys.stderr)
    tc.eval_steps = max(tc.eval_steps, len(val_data))  # the whole validation set, every time
    run = {"finetune": {**fc.__dict__, "task": p["task"], "n_train": len(p["train"]), "n_val": len(p["val"]),
                        "truncated": p["truncated"]}}
    wrap = None
    if dp is not None:  # DP-SGD: per-example losses, Opacus clips per example (the loop's global clip is off)
        wrap = privacy.DPTraining(dp, p["train"], lambda ex: collate(ex, pad), fc.batch_size, tc.max_steps)
        loss = privacy.classify_loss if p["task"] == "classify" else privacy.clm_loss
        tc.grad_clip = 0.0
        run["dp"] = wrap.summary()
    result = train(model, train_data, loss, tc, val_data=val_data, save_fn=save_fn, run_config=run, wrap=wrap)
    if dp is not None:
        privacy.undo_dp_ready(model)
        _record_dp(out, wrap.summary(), result)
    if p["task"] == "classify":
        result.update(report_classification(model, tok, p["val_texts"], p["val_golds"], fc.max_length, out))
    return result


def _record_dp(out: Path, summary: dict, result: dict):
    from llmkit.utils.io import write_json

    result["epsilon"] = summary["epsilon_spent"]
    cfg_path = out / "run_config.json"
    if cfg_path.is_file():
        write_json(cfg_path, {**json.loads(cfg_path.read_text()), "dp": summary})
    print(f"differential privacy: spent epsilon {summary['epsilon_spent']:.3f} (target {summary['target_epsilon']:g})"
          f" at delta {summary['delta']:g} over {summary['steps']} steps, noise multiplier "
          f"{summary['noise_multiplier']:.3f}, max grad norm {summary['max_grad_norm']:g}", file=sys.stderr)


def report_classification(model, tok, texts, golds, max_length, out: Path | None = None) -> dict:
    """Accuracy, per-class P/R/F1, macro-F1 and the confusion matrix on labelled texts; printed, and saved under out."""
    from llmkit.utils.io import write_json
    from llmkit.eval.metrics import classification_metrics, plot_confusion_matrix

    probs = predict_proba(model, tok, texts, max_length)
    labels = [model.config.id2label[str(i)] for i in range(model.config.num_labels)]
    m = classification_metrics(golds, probs.argmax(-1).tolist(), labels)
    print(format_classification(m), file=sys.stderr)
    if out is not None:
        write_json(out / "val_metrics.json", m)
        plot_confusion_matrix(m["confusion_matrix"], labels, out / "confusion_matrix.png")
    return {"val_accuracy": m["acc"], "val_macro_f1": m["macro_f1"]}


def format_classification(m: dict) -> str:
    """A plain-text report: accuracy, macro-F1, per-class table, confusion matrix."""
    w = max(8, *(len(lab) for lab in m["labels"]))
    lines = [f"accuracy {m['acc']:.4f}   macro-F1 {m['macro_f1']:.4f}",
             f"{'class':<{w}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for lab, r in m["per_class"].items():
        lines.append(f"{lab:<{w}} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} {r['support']:>8}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (w + 1) + " ".join(f"{lab[:8]:>8}" for lab in m["labels"]))
    for lab, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"{lab:<{w}} " + " ".join(f"{c:>8}" for c in row))
    return "\n".join(lines)
