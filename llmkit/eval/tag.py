"""Entity-level scores of a tagger (named entities) with seqeval's default-mode semantics, and `llmkit eval tag`.

An entity is a (sentence, type, first word, last word) chunk read by infer.tag.entity_spans (conlleval's lenient
rules, as seqeval's default mode); a predicted entity counts only when gold has the same one. Precision, recall and
F1 micro (over all entities) and per type, with macro and support-weighted means; a denominator of 0 gives 0
(seqeval's zero_division default). Token accuracy is over every word.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from llmkit.data.conll import read_tagged
from llmkit.infer.tag import entity_spans, predict_tags
from llmkit.utils.io import write_atomic


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_scores(golds: list[list[str]], preds: list[list[str]]) -> dict:
    """precision, recall, f1 (micro), macro_* and weighted_* means, per_type {precision, recall, f1, support},
    accuracy (tokens), n_gold, n_pred, n_correct; tag lists per sentence, gold and predicted of equal lengths."""
    if len(golds) != len(preds) or any(len(g) != len(p) for g, p in zip(golds, preds)):
        raise ValueError("gold and predicted tags differ in number of sentences or of tokens")
    true, pred = set(), set()
    for i, (g, p) in enumerate(zip(golds, preds)):
        true |= {(t, i, a, b) for t, a, b in entity_spans(g)}
        pred |= {(t, i, a, b) for t, a, b in entity_spans(p)}
    hit = true & pred
    n_true, n_pred, n_hit = (Counter(e[0] for e in s) for s in (true, pred, hit))
    per_type = {}
    for t in sorted(set(n_true) | set(n_pred)):
        p, r, f = _prf(n_hit[t], n_pred[t], n_true[t])
        per_type[t] = {"precision": p, "recall": r, "f1": f, "support": n_true[t]}
    p, r, f = _prf(len(hit), len(pred), len(true))
    res = {"precision": p, "recall": r, "f1": f}
    k = len(per_type)
    support = sum(v["support"] for v in per_type.values())
    for m in ("precision", "recall", "f1"):
        res[f"macro_{m}"] = sum(v[m] for v in per_type.values()) / k if k else 0.0
        res[f"weighted_{m}"] = sum(v[m] * v["support"] for v in per_type.values()) / support if support else 0.0
    n_tok = sum(len(g) for g in golds)
    res["accuracy"] = sum(a == b for g, p in zip(golds, preds) for a, b in zip(g, p)) / n_tok if n_tok else 0.0
    res.update(n_gold=len(true), n_pred=len(pred), n_correct=len(hit), per_type=per_type)
    return res


def format_scores(m: dict) -> str:
    """A plain-text report: micro P/R/F1, then a row per entity type."""
    w = max(8, *(len(t) for t in m["per_type"])) if m["per_type"] else 8
    lines = [f"{'type':<{w}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for t, r in m["per_type"].items():
        lines.append(f"{t:<{w}} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} {r['support']:>8}")
    lines.append(f"{'micro':<{w}} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['n_gold']:>8}")
    lines.append(f"{'macro':<{w}} {m['macro_precision']:>9.4f} {m['macro_recall']:>7.4f} {m['macro_f1']:>7.4f}")
    return "\n".join(lines)


def score_tagger(model, tok, sentences: list[list[str]], golds: list[list[str]], max_length: int = 512,
                 batch_size: int = 32, progress: bool = False) -> tuple[dict, list[list[str]]]:
    """(entity_scores of the model's word tags against golds, the predicted tags)."""
    preds = [[t for t, _ in s] for s in predict_tags(model, tok, sentences, max_length, batch_size, progress)]
    return entity_scores(golds, preds), preds


def write_predictions(path, sentences, golds, preds):
    """conlleval's layout: `token<TAB>gold<TAB>predicted` a line, a blank line after each sentence."""
    rows = ("".join(f"{w}\t{g}\t{p}\n" for w, g, p in zip(ws, gs, ps)) + "\n"
            for ws, gs, ps in zip(sentences, golds, preds))
    write_atomic(path, "".join(rows))


def evaluate_tag(lm, data, max_length: int = 512, batch_size: int = 32, limit: int | None = None,
                 progress: bool = True, predictions=None) -> dict:
    """Entity-level scores of a tagger on a CoNLL/JSONL file (the first `limit` sentences); the predicted tags go to
    `predictions` in conlleval's layout when given."""
    t0 = time.time()
    sents = read_tagged(data)[:limit]
    words, golds = [w for w, _ in sents], [t for _, t in sents]
    m, preds = score_tagger(lm.model, lm.tokenizer, words, golds, max_length, batch_size, progress)
    labels = set((lm.config.id2label or {}).values())
    unseen = sorted({t for g in golds for t in g} - labels)
    res = {"task": "tag", "model": str(lm.path), "data": str(data), "n": len(sents),
           "n_tokens": sum(len(w) for w in words), **m}
    if unseen:  # gold tags the model cannot predict: their entities count as missed
        res["tags_not_in_model"] = unseen
    if predictions:
        write_predictions(predictions, words, golds, preds)
        res["predictions"] = str(Path(predictions))
    res["seconds"] = time.time() - t0
    return res
