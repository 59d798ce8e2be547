"""Classification metrics, calibration and bootstrap intervals: plain NumPy functions shared by evaluate and finetune.

Calibration follows Guo et al. 2017 ("On Calibration of Modern Neural Networks"): equal-width confidence bins,
ECE = sum_b |acc_b - conf_b| * n_b / N, MCE = max_b |acc_b - conf_b| over non-empty bins. The Brier score is the
multi-class one (mean over items of the squared distance between the probability vector and the one-hot label), the
same formula as lm-evaluation-harness's `brier_score`.
"""
from __future__ import annotations

import numpy as np

from llmkit.utils.plot import save_figure

# ---------------------------------------------------------------------------------------------------------------
# Classification


def confusion_matrix(golds, preds, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are the true class, columns the predicted one."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(golds, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return m


def classification_metrics(golds, preds, labels: list[str] | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1/support, their macro averages and the confusion matrix.

    The macro averages run over every class of `labels`: a class absent from both golds and predictions counts 0
    (sklearn with labels=all classes, zero_division=0). macro_f1_present averages over the classes that occur in
    golds or predictions only (sklearn's default, labels=None); both are reported, and macro_over says which is which.
    """
    golds, preds = np.asarray(golds, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    n = int(max(golds.max(initial=-1), preds.max(initial=-1)) + 1)
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    m = confusion_matrix(golds, preds, max(n, len(labels)))
    tp = np.diag(m).astype(float)
    predicted, actual = m.sum(0).astype(float), m.sum(1).astype(float)
    # a class never predicted (or never present) scores 0 rather than NaN, as sklearn's zero_division=0 does
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (predicted > 0) | (actual > 0)
    per_class = {
        lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
              "support": int(actual[i])}
        for i, lab in enumerate(labels)
    }
    return {
        "acc": float((golds == preds).mean()) if len(golds) else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "macro_f1_present": float(f1[present].mean()) if present.any() else 0.0,
        "macro_over": f"all {len(tp)} classes (absent ones count 0); macro_f1_present: the {int(present.sum())} "
                      "classes in golds or predictions",
        "per_class": per_class,
        "confusion_matrix": m.tolist(),
        "labels": labels,
    }


# ---------------------------------------------------------------------------------------------------------------
# Calibration


def calibration(confidences, correct, n_bins: int = 15) -> dict:
    """ECE and MCE over equal-width confidence bins (lower edge open, upper closed), plus the bins for a diagram."""
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        sel = idx == b
        count = int(sel.sum())
        if count:
            acc_b, conf_b = float(ok[sel].mean()), float(conf[sel].mean())
            gap = abs(acc_b - conf_b)
            ece += gap * count / len(conf)
            mce = max(mce, gap)
        else:
            acc_b = conf_b = None
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count, "acc": acc_b, "conf": conf_b})
    return {"ece": ece, "mce": mce, "bins": bins}


def brier_score(probs, golds) -> float:
    """Multi-class Brier score: mean over items of sum_k (p_k - [k == gold])^2."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(golds, dtype=np.int64)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def softmax(x, axis=-1) -> np.ndarray:
    """Numerically stable softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_ci(values, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (deterministic for a given seed)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // len(v))  # resample in chunks to bound memory on large sets
    for s in range(0, n_resamples, step):
        k = min(step, n_resamples - s)
        means[s:s + k] = v[rng.integers(0, len(v), size=(k, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return (float(lo), float(hi))


def bootstrap_ratio_ci(num, den, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling (num, den) pairs together."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_resamples, len(num)))
    lo, hi = np.percentile(num[idx].sum(1) / den[idx].sum(1), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def means_with_ci(per_item: dict) -> dict:
    """{name: mean, name_ci: [lo, hi]} for each list of per-item values."""
    out = {}
    for name, values in per_item.items():
        out[name] = float(np.mean(values)) if len(values) else float("nan")
        out[name + "_ci"] = list(bootstrap_ci(values))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text generation: sacrebleu and rouge-score, called as their authors intend


def text_metrics(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, with signatures), mean ROUGE-1/2/L/Lsum F1 and exact match per item."""
    import sacrebleu
    from rouge_score import rouge_scorer

    # sacrebleu wants reference streams of equal length: items with fewer references are padded with None
    n_refs = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(n_refs)]
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hypotheses, streams), chrf.corpus_score(hypotheses, streams)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_item = {"rouge1": [], "rouge2": [], "rougeL": [], "rougeLsum": [], "exact_match": []}
    for hyp, refs in zip(hypotheses, references):
        s = scorer.score_multi(refs, hyp)  # best over references; rouge-score takes the target (reference) first
        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            per_item[k].append(s[k].fmeasure)
        per_item["exact_match"].append(float(any(hyp.strip() == r.strip() for r in refs)))
    out = {"bleu": b.score, "bleu_signature": str(bleu.get_signature()),
           "chrf": c.score, "chrf_signature": str(chrf.get_signature())}
    out.update(means_with_ci(per_item))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg backend: no display needed)


def plot_confusion_matrix(matrix, labels: list[str], path, title: str = "Confusion matrix"):
    """Write the confusion matrix as a PNG heat map with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    save_figure(fig, path)
    plt.close(fig)


def plot_reliability(cal: dict, path, title: str = "Reliability diagram"):
    """Write a reliability diagram (accuracy per confidence bin against the diagonal) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = cal["bins"]
    width = bins[0]["hi"] - bins[0]["lo"]
    centers = [b["lo"] + width / 2 for b in bins]
    accs = [b["acc"] or 0.0 for b in bins]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, accs, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gaps = [(b["conf"] - b["acc"]) if b["count"] else 0.0 for b in bins]
    ax.bar(centers, gaps, bottom=accs, width=width, edgecolor="red", color="tab:red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {cal['ece']:.4f}  MCE {cal['mce']:.4f}")
    ax.legend(loc="upper left")
    save_figure(fig, path)
    plt.close(fig)
