"""Masked-LM evaluation: masked-token accuracy and loss under the pretraining masking, and pseudo-perplexity.

(a) The text is tokenized exactly as `llmkit pretrain` tokenizes its data (`tokenize_files`), cut into windows of
`context` tokens and masked by the pretraining validation loader (`BlockLoader`, objective mlm: 15 % of non-special
tokens, 80/10/10, each window's mask a pure function of (seed, window index)), so a model's figure here is the one its
pretraining validation reports on the same tokens, and the same masks score every model with the same tokenizer.

(b) Pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"): each sentence (a line, or a record)
is wrapped in the tokenizer's [CLS] ... [SEP], each non-special token is masked in turn (one row per masked
position, rows batched) and log p(token | the rest) is summed; pseudo-perplexity = exp(-PLL / scored tokens).
"""
from __future__ import annotations

import math
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.data.corpus import IGNORE, BlockLoader, read_texts, tokenize_files
from llmkit.eval import metrics


def need_masked_lm(lm):
    """A masked (encoder) LM with an MLM head and a tokenizer that has a mask token; else one clear error."""
    cfg = lm.model.config
    if cfg.causal:
        raise ValueError(f"{lm.path} is a causal (decoder) language model; eval mlm needs a masked (encoder, "
                         "BERT-style) model, e.g. one from `llmkit pretrain --objective mlm` (use `llmkit eval "
                         "perplexity` for a causal model)")
    if cfg.num_labels:
        raise ValueError(f"{lm.path} is a classifier ({cfg.num_labels} labels), not a masked language model; "
                         "score it with `llmkit eval classify`")
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer; eval mlm needs tokenizer.json beside the weights")
    if lm.tokenizer.mask_id is None:
        raise ValueError(f"{lm.path}: its tokenizer has no mask token; eval mlm needs one")


def _bar(total, enabled, desc, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False)


def _device(model):
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# (a) masked-token accuracy under the pretraining masking


def masked_windows(tok, data, context: int, seed: int = 0, limit: int | None = None):
    """The pretraining token stream of `data` cut into windows of `context` tokens, masked as pretraining validation
    masks them: a list of (input_ids, labels) pairs of 1-D tensors, labels IGNORE where nothing is scored."""
    with tempfile.TemporaryDirectory() as cache:
        tokens = np.array(tokenize_files([data], tok, cache, progress=False))
    context = min(context, len(tokens))
    # batch_size 1: window i is masked with seed (seed, 0, i) whatever --batch-size is, and no window is dropped
    loader = BlockLoader(tokens, context, 1, objective="mlm", seed=seed, shuffle=False, mask_id=tok.mask_id,
                         vocab_size=tok.vocab_size, special_ids=tok.all_special_ids)
    out = []
    for batch in loader:
        if limit is not None and len(out) >= limit:
            break
        out.append((batch["input_ids"][0], batch["labels"][0]))
    return out, context


@torch.inference_mode()
def masked_accuracy(model, windows, batch_size: int = 8, progress: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy over the masked positions of `windows` (equal lengths)."""
    dev = _device(model)
    n = loss = top1 = top5 = 0.0
    per_window = []  # (loss sum, masked count) per window, for the interval
    bar = _bar(len(windows), progress, "masked accuracy", "window")
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        ids = torch.stack([w[0] for w in chunk]).to(dev)
        labels = torch.stack([w[1] for w in chunk]).to(dev)
        logits = model(ids).float()  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
        nll = nll.view(labels.shape)
        scored = labels != IGNORE
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, T, 5)
        hit1 = (best[..., 0] == labels) & scored
        hit5 = (best == labels[..., None]).any(-1) & scored
        for r in range(len(chunk)):
            per_window.append((float(nll[r].sum()), int(scored[r].sum())))
        n += int(scored.sum())
        loss += float(nll.sum())
        top1 += int(hit1.sum())
        top5 += int(hit5.sum())
        bar.update(len(chunk))
    bar.close()
    if not n:
        raise ValueError("no token was masked: the data is too short (give more text or a larger --context)")
    res = {"masked_tokens": int(n), "masked_loss": loss / n, "masked_perplexity": math.exp(min(loss / n, 50)),
           "masked_acc": top1 / n, "masked_top5_acc": top5 / n}
    w = np.array(per_window)
    w = w[w[:, 1] > 0]  # a window with no masked token weighs nothing
    if len(w) > 1:
        res["masked_loss_ci"] = list(metrics.bootstrap_ratio_ci(w[:, 0], w[:, 1]))
    return res


# ---------------------------------------------------------------------------------------------------------------
# (b) pseudo-log-likelihood


def sentence_windows(tok, data, context: int, limit: int | None = None) -> list[list[int]]:
    """Each non-blank line (a record for .jsonl/.csv/...) as [CLS] tokens [SEP]; a longer one cut into windows of at
    most `context` tokens, each wrapped the same way."""
    prefix = [tok.cls_id] if tok.cls_id is not None else []
    suffix = [tok.sep_id] if tok.sep_id is not None else []
    room = context - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"--context {context} leaves no room for a token between [CLS] and [SEP]")
    out = []
    for text in read_texts(data, lines=True):
        if not text.strip():
            continue
        ids = tok.encode(text, add_special_tokens=False)
        for s in range(0, len(ids), room):
            out.append(prefix + ids[s:s + room] + suffix)
            if limit is not None and len(out) >= limit:
                return out
    return out


@torch.inference_mode()
def pseudo_loglikelihood(model, windows: list[list[int]], mask_id: int, special_ids, pad_id: int = 0,
                         batch_size: int = 64, progress: bool = False) -> list[tuple[float, int]]:
    """(PLL, scored tokens) of each window: every non-special token masked in turn, one row per masked position."""
    dev = _device(model)
    special = set(special_ids)
    rows = [(w, j) for w, ids in enumerate(windows) for j, t in enumerate(ids) if t not in special]
    pll = [[0.0, 0] for _ in windows]
    bar = _bar(len(rows), progress, "pseudo-log-likelihood", "token")
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(windows[w]) for w, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (w, j) in enumerate(chunk):
            seq = windows[w]
            ids[r, :len(seq)] = torch.tensor(seq)
            attn[r, :len(seq)] = 1
            ids[r, j] = mask_id
        pos = torch.tensor([j for _, j in chunk])
        target = torch.tensor([windows[w][j] for w, j in chunk])
        logits = model(ids.to(dev), attention_mask=attn.to(dev))  # (B, T, V)
        at = logits[torch.arange(len(chunk), device=dev), pos.to(dev)].float()  # (B, V)
        lp = at.log_softmax(-1).gather(-1, target.to(dev)[:, None])[:, 0].tolist()
        for (w, _), x in zip(chunk, lp):
            pll[w][0] += x
            pll[w][1] += 1
        bar.update(len(chunk))
    bar.close()
    return [(a, b) for a, b in pll]


# ---------------------------------------------------------------------------------------------------------------
# the task


def evaluate_mlm(lm, data, context: int | None = None, seed: int = 0, batch_size: int = 8, limit: int | None = None,
                 progress: bool = False) -> dict:
    """Masked-token accuracy and loss (pretraining masking, `seed`) and pseudo-perplexity of a text file.

    context: window length in tokens (default: the pretraining default, min(256, the model's positions));
    limit: the first N windows of each part (masked windows, sentence windows)."""
    need_masked_lm(lm)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit {limit!r} must be a positive number of windows; omit it to score everything")
    tok, model = lm.tokenizer, lm.model
    positions = model.config.max_position_embeddings
    context = context or min(256, positions)
    if context > positions:
        raise ValueError(f"--context {context} exceeds the model's {positions} positions")
    was = model.training
    model.eval()
    t0 = time.time()
    try:
        windows, used = masked_windows(tok, data, context, seed, limit)
        res = {"task": "mlm", "model": str(lm.path), "data": str(data), "seed": seed, "context": used,
               "mask_prob": 0.15, "n_windows": len(windows)}
        res.update(masked_accuracy(model, windows, batch_size, progress))
        sentences = sentence_windows(tok, data, context, limit)
        pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0
        # PLL rows are short and cheap next to a full window: several per window of the accuracy batch
        per = pseudo_loglikelihood(model, sentences, tok.mask_id, tok.all_special_ids, pad,
                                   batch_size=max(1, batch_size * max(1, context // 32)), progress=progress)
    finally:
        model.train(was)
    total, n = sum(p for p, _ in per), sum(c for _, c in per)
    if not n:
        raise ValueError(f"{data}: no token to score for the pseudo-log-likelihood")
    res.update({"n_sentence_windows": len(sentences), "n_tokens": n, "pseudo_loglikelihood": total,
                "pll_per_token": total / n, "pseudo_perplexity": math.exp(-total / n)})
    if len(per) > 1:
        lo, hi = metrics.bootstrap_ratio_ci([-p for p, _ in per], [c for _, c in per])
        res["pseudo_perplexity_ci"] = [math.exp(lo), math.exp(hi)]
    res["seconds"] = time.time() - t0
    return res
