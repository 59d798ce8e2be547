"""Evaluation: perplexity, multiple choice, generation and classification, with lm-evaluation-harness's semantics.

Log-likelihoods follow lm-eval's Hugging Face backend (HFLM) exactly: the same context/continuation split of the
tokens, the same left truncation, the same rolling windows for perplexity. What differs is speed: a query's tokens
go through the model once and all its choices continue from the query's KV cache, and the LM head runs only where
a token is scored.

Every task returns one flat dict: each metric a plain key (`acc`, `bits_per_byte`, `bleu`, ...) beside its
`<metric>_ci` bootstrap 95 % interval where the metric is a mean over items.
"""
from __future__ import annotations

import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.data.sft import label_ids, label_name
from llmkit.eval import metrics
from llmkit.infer.classify import predict_proba
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.transformer import PackedKV
from llmkit.utils.io import read_json_records, read_utf8

# ---------------------------------------------------------------------------------------------------------------
# Reading inputs: one clear line per problem, naming the record (the readers are utils.io's)

# the excerpts shipped with llmkit: the compression report's data when no file is given (tiny: figures on them are a
# smoke test, not a benchmark)
SAMPLE_DATA = Path(__file__).with_name("data")
WIKITEXT_SAMPLE = SAMPLE_DATA / "wikitext2_test_excerpt.txt"
HELLASWAG_SAMPLE = SAMPLE_DATA / "hellaswag_val_8.jsonl"


def _field(path, i, record, name, kind=None):
    if name not in record:
        raise ValueError(f"{path}: record {i}: missing field {name!r} (has {sorted(record)}); "
                         f"rename the field or pass the --*-field flag")
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{path}: record {i}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Tokenization as lm-eval's HFLM does it


def tok_encode(tok, text: str) -> list[int]:
    """HFLM.tok_encode: the tokenizer's own special tokens, none if the text already starts with the prefix token."""
    prefix = prefix_token_id(tok)
    starts_with_prefix = prefix is not None and text.startswith(tok.decode([prefix]))
    return tok.encode(text, add_special_tokens=not starts_with_prefix)


def prefix_token_id(tok) -> int | None:
    """The token scored text is conditioned on when it has no context: BOS, else EOS (HFLM.prefix_token_id)."""
    return tok.bos_id if tok.bos_id is not None else tok.eos_id


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode context+continuation as one string, cut at len(encode(context)).

    Trailing spaces of the context move to the continuation first, because BPE vocabularies glue a space to the
    word after it. An empty context becomes the prefix token (lm-eval's TemplateLM.loglikelihood).
    """
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok_encode(tok, context + continuation)
    ctx = tok_encode(tok, context)
    if not ctx:  # a whitespace-only context (lm-eval asserts here): condition on the prefix token instead
        return [prefix_token_id(tok)], whole
    return ctx, whole[len(ctx):]


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations, sharing each context's forward pass


def _device_dtype(model):
    return next(model.parameters()).device, model.activation_dtype


def _scored_logprobs(model, hidden, targets):
    """LM head on the scored positions only: hidden (P, C), targets (P,) -> log p(target) (P,), greedy (P,) bool."""
    logp = F.log_softmax(model.logits(hidden).float(), dim=-1)  # float32, as lm-eval's softmax_dtype default
    return logp.gather(-1, targets[:, None])[:, 0], logp.argmax(-1) == targets


def _tree(ctx: list[int], conts: list[list[int]]):
    """One packed segment for a context and its continuations: tokens, positions, (T, T) mask, scored indices.

    The context comes once, then each continuation minus its last token (never fed); each continuation sees the
    whole context and itself causally, never another continuation. Position i of the segment predicts targets[i].
    """
    Lc = len(ctx)
    tokens, positions, owner = list(ctx), list(range(Lc)), [-1] * Lc
    scored = []  # per continuation: indices whose logits predict its tokens
    for j, c in enumerate(conts):
        start = len(tokens)
        tokens += c[:-1]
        positions += range(Lc, Lc + len(c) - 1)
        owner += [j] * (len(c) - 1)
        scored.append([Lc - 1] + list(range(start, start + len(c) - 1)))
    own = torch.tensor(owner)
    pos = torch.tensor(positions)
    same = (own[:, None] == own[None, :]) | (own[None, :] == -1)  # own continuation, or the context
    mask = same & (pos[None, :] <= pos[:, None])
    return tokens, positions, mask, scored


@torch.inference_mode()
def score_continuations(model, groups: list[tuple[list[int], list[list[int]]]], batch_size: int = 32,
                        progress: bool = False) -> list[list[tuple[float, bool]]]:
    """Sum of log p(continuation | context) and is-greedy for each (context_ids, [continuation_ids, ...]) group.

    Each group is one segment of a packed forward (kvcache.PackedKV, no padding): its context once, then its
    continuations, each attending to the context and to itself; about batch_size groups share a forward. The LM
    head runs only where a continuation token is scored.
    """
    if not model.config.causal:
        raise ValueError("log-likelihood evaluation needs a causal (decoder) language model, not an encoder")
    device, _ = _device_dtype(model)
    out: list = [None] * len(groups)
    bar = _progress(len(groups), progress, "scoring")
    for i in range(0, len(groups), batch_size):
        batch = range(i, min(i + batch_size, len(groups)))
        trees = [_tree(*groups[g]) for g in batch]
        packed = PackedKV([None] * len(trees), [len(t[0]) for t in trees], [t[2].to(device) for t in trees],
                          [t[1] for t in trees])
        ids = torch.tensor([x for t in trees for x in t[0]], device=device)[None]
        hidden = model(ids, cache=packed, head="hidden")[0]  # (N, C)
        index, targets, counts = [], [], []
        for g, t, off in zip(batch, trees, packed.offsets):
            for c, idx in zip(groups[g][1], t[3]):
                index += [off + x for x in idx]
                targets += c
                counts.append(len(c))
        index, targets = torch.tensor(index, device=device), torch.tensor(targets, device=device)
        parts = [_scored_logprobs(model, hidden[index[k:k + 1024]], targets[k:k + 1024])  # bounded (P, V) logits
                 for k in range(0, len(index), 1024)]
        lp, gr = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        res = iter(zip(torch.split(lp, counts), torch.split(gr, counts)))
        for g in batch:
            out[g] = [(float(a.sum()), bool(b.all())) for a, b in (next(res) for _ in groups[g][1])]
        bar.update(len(batch))
    bar.close()
    return out


def loglikelihood(model, tok, requests: list[tuple[str, str]], batch_size: int = 32, max_length: int | None = None,
                  progress: bool = False) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood`: (log p(continuation | context), is_greedy) per (context, continuation) string pair."""
    max_length = max_length or model.config.max_position_embeddings
    groups: dict[tuple, list] = {}  # context ids -> [(request index, continuation ids)]
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tok, context, continuation)
        if not cont:
            raise ValueError(f"request {i + 1}: the continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_length:
            raise ValueError(f"request {i + 1}: continuation of {len(cont)} tokens exceeds the model's context "
                             f"({max_length})")
        # HFLM keeps the last max_length + 1 tokens of context+continuation (left truncation)
        ctx = ctx[max(0, len(ctx) + len(cont) - (max_length + 1)):]
        groups.setdefault(tuple(ctx), []).append((i, cont))
    keys = list(groups)
    scored = score_continuations(model, [(list(k), [c for _, c in groups[k]]) for k in keys], batch_size, progress)
    out: list = [None] * len(requests)
    for k, results in zip(keys, scored):
        for (i, _), res in zip(groups[k], results):
            out[i] = res
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rolling log-likelihood (perplexity)


def rolling_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(input_start, input_end, n_scored) windows over seq = [prefix] + tokens, scoring tokens 1..n_tokens once.

    The first window scores `context` tokens, each later one `stride` tokens with up to `context` tokens of input.
    With stride == context this is exactly lm-eval's get_rolling_token_windows + make_disjoint_window (context_len=1):
    disjoint blocks, and a last block that is left-extended to a full window.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    windows, s = [], 1
    while s <= n_tokens:
        e = min(s - 1 + (context if s == 1 else stride), n_tokens)  # last scored target (inclusive)
        windows.append((max(0, e - context), e, e - s + 1))
        s = e + 1
    return windows


@torch.inference_mode()
def rolling_loglikelihood(model, tokens: list[int], prefix: int, context: int, stride: int | None = None,
                          batch_size: int = 8, progress: bool = False) -> dict:
    """Total log-likelihood of tokens (each scored once), with per-token entropy and top-1 probability sums."""
    stride = stride or context
    device, _ = _device_dtype(model)
    seq = torch.tensor([prefix] + list(tokens))
    windows = rolling_windows(len(tokens), context, stride)
    total = {"loglikelihood": 0.0, "tokens": 0, "entropy": 0.0, "top1_prob": 0.0, "greedy": 0}
    nll_per_window = []
    bar = _progress(len(windows), progress, "windows")
    # batch_size windows per forward, packed back to back (kvcache.PackedKV): no padding whatever their lengths
    for i in range(0, len(windows), batch_size):
        part = windows[i:i + batch_size]
        packed = PackedKV([None] * len(part), [e - a for a, e, _ in part])
        ids = torch.cat([seq[a:e] for a, e, _ in part]).to(device)[None]
        hidden = model(ids, cache=packed, head="hidden")[0]  # (N, C)
        for (a, e, n), off in zip(part, packed.offsets[1:]):
            h = hidden[off - n:off]  # the window's last n positions are the scored ones
            targets = seq[e - n + 1:e + 1].to(device)
            ll = 0.0
            for j in range(0, n, 1024):  # bound the (positions, vocab) logits in memory
                logp = F.log_softmax(model.logits(h[j:j + 1024]).float(), dim=-1)
                t = targets[j:j + 1024]
                ll += float(logp.gather(-1, t[:, None]).sum())
                top, arg = logp.max(-1)  # one pass gives the top-1 probability and the greedy token
                total["entropy"] += float(-(logp.exp() * logp).sum())
                total["top1_prob"] += float(top.exp().sum())
                total["greedy"] += int((arg == t).sum())
            total["loglikelihood"] += ll
            total["tokens"] += n
            nll_per_window.append((-ll, n))
        bar.update(len(part))
    bar.close()
    total["window_nll"] = nll_per_window
    return total


def evaluate_perplexity(lm, data, context: int | None = None, stride: int | None = None, batch_size: int = 8,
                        limit: int | None = None, progress: bool = False) -> dict:
    """Token, word and byte perplexity and bits per byte of a text file, as lm-eval's wikitext task computes them."""
    _need_causal_lm(lm, "perplexity")
    _check_limit(limit)
    text = read_utf8(data)
    if limit:
        text = "".join(text.splitlines(keepends=True)[:limit])
    tok, model = _need_tokenizer(lm), lm.model
    context = context or model.config.max_position_embeddings
    if context > model.config.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds the model's {model.config.max_position_embeddings} positions")
    t0 = time.time()
    tokens = tok_encode(tok, text)
    r = rolling_loglikelihood(model, tokens, prefix_token_id(tok), context, stride, batch_size, progress)
    ll, n = r["loglikelihood"], r["tokens"]
    # lm-eval wikitext: words = len(re.split(r"\s+", doc)) and bytes = UTF-8 length, both of the original text
    words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    res = {
        "task": "perplexity", "model": str(lm.path), "data": str(data), "n_tokens": n, "n_words": words,
        "n_bytes": n_bytes, "context": context, "stride": stride or context, "loglikelihood": ll,
        "token_perplexity": math.exp(-ll / n),
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / n_bytes),
        "bits_per_byte": -ll / n_bytes / math.log(2),
        "mean_token_entropy": r["entropy"] / n,
        "mean_top1_prob": r["top1_prob"] / n,
        "top1_acc": r["greedy"] / n,
    }
    # interval for the mean token NLL, resampling windows (tokens inside a window are not independent)
    nll = np.array(r["window_nll"])
    if len(nll) > 1:
        lo, hi = metrics.bootstrap_ratio_ci(nll[:, 0], nll[:, 1])
        res["token_perplexity_ci"] = [math.exp(lo), math.exp(hi)]
    res["seconds"] = time.time() - t0
    return res


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice


def load_choice_records(path, query_field="query", choices_field="choices", label_field="label") -> list[dict]:
    """Validated {"query", "choices", "label"} records (field names configurable)."""
    records = read_json_records(path)
    out = []
    for i, r in enumerate(records, 1):
        query = _field(path, i, r, query_field, str)
        choices = _field(path, i, r, choices_field, list)
        label = _field(path, i, r, label_field)
        if not choices:
            raise ValueError(f"{path}: record {i}: {choices_field!r} is empty; give at least one choice")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}: record {i}: every choice must be a non-empty string")
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"{path}: record {i}: label {label!r} is out of range for {len(choices)} choices "
                             f"(use a 0-based index)")
        out.append({"query": query, "choices": choices, "label": label})
    return out


def fewshot_prefix(records: list[dict], i: int, k: int, seed: int = 1234) -> str:
    """K solved examples drawn (seeded, never the item itself) and joined as lm-eval does: '\\n\\n' between them."""
    if k <= 0:
        return ""
    rng = random.Random(seed + i)
    pool = [j for j in range(len(records)) if j != i]
    if len(pool) < k:
        raise ValueError(f"--num-fewshot {k} needs at least {k + 1} records, the file has {len(records)}")
    shots = rng.sample(pool, k)
    return "".join(records[j]["query"] + " " + records[j]["choices"][records[j]["label"]] + "\n\n" for j in shots)


def choice_metrics(records: list[dict], lls: list[list[float]]) -> tuple[dict, dict]:
    """lm-eval multiple_choice metrics per item (acc, acc_norm, acc_bytes) plus probabilities for calibration."""
    per_item = {"acc": [], "acc_norm": [], "acc_bytes": []}
    probs, golds = [], []
    for r, ll in zip(records, lls):
        ll = np.array(ll)
        # lengths of the choice text without the " " delimiter, as lm-eval's process_results measures them
        chars = np.array([float(len(c)) for c in r["choices"]])
        nbytes = np.array([float(len(c.encode("utf-8"))) for c in r["choices"]])
        gold = r["label"]
        per_item["acc"].append(float(np.argmax(ll) == gold))
        per_item["acc_norm"].append(float(np.argmax(ll / chars) == gold))
        per_item["acc_bytes"].append(float(np.argmax(ll / nbytes) == gold))
        probs.append(metrics.softmax(ll))
        golds.append(gold)
    return per_item, {"probs": probs, "golds": golds}


def evaluate_choice(lm, data, query_field="query", choices_field="choices", label_field="label", num_fewshot=0,
                    limit=None, batch_size=32, progress=False, plot=None) -> dict:
    """acc, acc_norm, acc_bytes (lm-eval's multiple_choice) with calibration and bootstrap intervals."""
    _need_causal_lm(lm, "multiple-choice scoring")
    _check_limit(limit)
    records = load_choice_records(data, query_field, choices_field, label_field)
    if limit:
        records = records[:limit]
    tok, model = _need_tokenizer(lm), lm.model
    t0 = time.time()
    requests, owner = [], []
    for i, r in enumerate(records):
        ctx = fewshot_prefix(records, i, num_fewshot) + r["query"]
        for c in r["choices"]:
            requests.append((ctx, " " + c))  # lm-eval's target_delimiter
            owner.append(i)
    results = loglikelihood(model, tok, requests, batch_size=batch_size, progress=progress)
    lls: list[list[float]] = [[] for _ in records]
    for i, (ll, _) in zip(owner, results):
        lls[i].append(ll)
    per_item, cal_in = choice_metrics(records, lls)
    res = {"task": "choice", "model": str(lm.path), "data": str(data), "n": len(records), "num_fewshot": num_fewshot}
    res.update(metrics.means_with_ci(per_item))
    res.update(_calibration(cal_in["probs"], cal_in["golds"], plot))
    res["seconds"] = time.time() - t0
    res["predictions"] = [int(np.argmax(ll)) for ll in lls]
    return res


def _calibration(probs, golds, plot=None) -> dict:
    conf = [float(np.max(p)) for p in probs]
    correct = [int(np.argmax(p) == g) for p, g in zip(probs, golds)]
    cal = metrics.calibration(conf, correct, n_bins=15)
    # probability vectors may differ in length (records with different numbers of choices): Brier per item
    brier = [metrics.brier_score([p], [g]) for p, g in zip(probs, golds)]
    out = {"ece": cal["ece"], "mce": cal["mce"], "brier": float(np.mean(brier)),
           "brier_ci": list(metrics.bootstrap_ci(brier)), "calibration_bins": cal["bins"]}
    if plot:
        metrics.plot_reliability(cal, plot)
        out["reliability_png"] = str(plot)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation: BLEU / chrF (sacrebleu), ROUGE (rouge-score), exact match


def load_generate_records(path, prompt_field="prompt", reference_field="reference") -> list[dict]:
    """Records with a prompt and one reference (a string) or several (a list of strings)."""
    out = []
    for i, r in enumerate(read_json_records(path), 1):
        prompt = _field(path, i, r, prompt_field, str)
        name = reference_field if reference_field in r else ("references" if "references" in r else reference_field)
        refs = _field(path, i, r, name)
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(x, str) for x in refs):
            raise ValueError(f"{path}: record {i}: {name!r} must be a string or a non-empty list of strings")
        if not prompt:
            raise ValueError(f"{path}: record {i}: the prompt is empty")
        out.append({"prompt": prompt, "references": refs})
    return out


def evaluate_generate(lm, data, params=None, prompt_field="prompt", reference_field="reference", chat=False,
                      limit=None, batch_size=16, progress=False) -> dict:
    """Generate for every prompt through the engine (batched) and score against the references."""
    _need_causal_lm(lm, "generation")
    _check_limit(limit)
    records = load_generate_records(data, prompt_field, reference_field)
    if limit:
        records = records[:limit]
    tok = _need_tokenizer(lm)
    engine = Engine(lm.model, tok, lm.generation_config)
    params = params or SamplingParams(temperature=0.0, max_new_tokens=128)
    t0 = time.time()
    prompts = [engine.chat_prompt_ids([{"role": "user", "content": r["prompt"]}]) if chat else r["prompt"]
               for r in records]
    hyps = []
    bar = _progress(len(prompts), progress, "generating")
    for i in range(0, len(prompts), batch_size):
        hyps += [c.text for c in engine.generate(prompts[i:i + batch_size], params)]
        bar.update(len(prompts[i:i + batch_size]))
    bar.close()
    res = {"task": "generate", "model": str(lm.path), "data": str(data), "n": len(records), "chat": chat,
           "temperature": params.temperature, "max_new_tokens": params.max_new_tokens}
    res.update(metrics.text_metrics(hyps, [r["references"] for r in records]))
    res["seconds"] = time.time() - t0
    res["generations"] = hyps
    return res


# ---------------------------------------------------------------------------------------------------------------
# Classification with a fine-tuned sequence-classification head


def load_classify_records(path, text_field="text", label_field="label", labels: list[str] | None = None) -> list[dict]:
    """(text, label index) records from .jsonl/.json or a TSV `text<TAB>label` file (SST-2 layout), labels read as
    the model's class names (data.sft.label_ids, as finetune reads them); labels=None checks the file's structure
    only (labels are kept as names)."""
    if str(path).endswith((".tsv", ".txt")):
        rows = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit("\t", 1)
            if len(parts) != 2:
                raise ValueError(f"{path}: record {len(rows) + 1} (line {n}): expected 'text<TAB>label'")
            rows.append({text_field: parts[0], label_field: parts[1]})
        if rows and rows[0][label_field] == "label":  # header line
            rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: no records (a header line only?); give one 'text<TAB>label' line a record")
    else:
        rows = read_json_records(path)
    out = []
    for i, r in enumerate(rows, 1):
        text, label = _field(path, i, r, text_field, str), _field(path, i, r, label_field)
        if isinstance(label, (list, dict)) or label is None or label_name(label) == "":
            raise ValueError(f"{path}: record {i}: label {label!r} is not a class name or index")
        out.append({"text": text, "label": label_name(label)})
    if labels is not None:  # read as finetune reads them: names first (data.sft.label_ids)
        for r, y in zip(out, label_ids([r["label"] for r in out], list(labels), str(path))):
            r["label"] = y
    return out


@torch.inference_mode()
def evaluate_classify(lm, data, text_field="text", label_field="label", limit=None, batch_size=32,
                      progress=False, plots: str | None = None) -> dict:
    """Accuracy, per-class and macro P/R/F1, confusion matrix and calibration of a classification model."""
    model, tok = lm.model, _need_tokenizer(lm)
    cfg = model.config
    if not cfg.num_labels:
        raise ValueError(f"{lm.path} has no classification head (num_labels = 0): fine-tune a classifier first, "
                         "or score label words with `llmkit eval choice`")
    labels = [(cfg.id2label or {}).get(str(i), str(i)) for i in range(cfg.num_labels)]
    _check_limit(limit)
    records = load_classify_records(data, text_field, label_field, labels)
    if limit:
        records = records[:limit]
    t0 = time.time()
    probs = predict_proba(model, tok, [r["text"] for r in records], cfg.max_position_embeddings, batch_size,
                          progress).tolist()
    golds = [r["label"] for r in records]
    preds = [int(np.argmax(p)) for p in probs]
    m = metrics.classification_metrics(golds, preds, labels)
    res = {"task": "classify", "model": str(lm.path), "data": str(data), "n": len(records)}
    res["acc"] = m.pop("acc")
    res["acc_ci"] = list(metrics.bootstrap_ci([float(g == p) for g, p in zip(golds, preds)]))
    res.update(m)
    res.update(_calibration(probs, golds, Path(plots) / "reliability.png" if plots else None))
    if plots:
        metrics.plot_confusion_matrix(m["confusion_matrix"], labels, Path(plots) / "confusion.png")
        res["confusion_png"] = str(Path(plots) / "confusion.png")
    res["seconds"] = time.time() - t0
    res["predictions"] = preds
    return res


# ---------------------------------------------------------------------------------------------------------------
# Output


def _need_causal_lm(lm, what: str):
    """Log-likelihoods and generation need a causal LM: an encoder's or a classifier's numbers would mean nothing."""
    cfg = lm.model.config
    if not cfg.causal:
        raise ValueError(f"{lm.path} is a masked (encoder, BERT-style) language model: {what} needs a causal "
                         "(decoder) model; a masked LM's validation loss is in its training metrics.jsonl")
    if cfg.num_labels:
        raise ValueError(f"{lm.path} is a classifier ({cfg.num_labels} labels): {what} needs a language model; "
                         "score it with `llmkit eval classify`")


def _check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit {limit!r} must be a positive number of records; use None for all of them")


def _need_tokenizer(lm):
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer; evaluation needs tokenizer.json beside the weights")
    return lm.tokenizer


def _progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


HEADLINE = ["acc", "acc_norm", "acc_bytes", "macro_f1", "macro_f1_present", "macro_precision", "macro_recall",
            "bits_per_byte", "token_perplexity", "word_perplexity", "byte_perplexity", "mean_token_entropy",
            "mean_top1_prob", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "ece", "mce",
            "brier", "masked_acc", "masked_top5_acc", "masked_loss", "pseudo_perplexity", "pll_per_token"]


def markdown_table(results: dict) -> str:
    """The headline metrics of a result dict as a markdown table (metric, value, 95 % CI)."""
    lines = ["| metric | value | 95% CI |", "|---|---:|---|"]
    for k in HEADLINE:
        if k in results:
            ci = results.get(k + "_ci")
            ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            lines.append(f"| {k} | {results[k]:.4f} | {ci_text} |")
    return "\n".join(lines)
