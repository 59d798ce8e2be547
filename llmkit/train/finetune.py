"""Fine-tuning recipe: prepare the model and data (setup.py, data.sft), run train.py's loop, save, report.

Tasks: chat (OpenAI-style {"messages": [...]}), instruct (Alpaca instruction/input/output, rendered through the
model's own chat template), classify (CSV/TSV/JSONL text + label), tag (CoNLL/JSONL words + IOB2/IOBES tags),
text (plain-text continued pretraining). Chat and instruct train on assistant tokens only (data.sft builds the loss
masks); classify adds a head and reports accuracy, per-class P/R/F1 and the confusion matrix on the validation set;
tag adds a token-classification head (each word's first sub-token) and reports entity-level P/R/F1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from llmkit.data.sft import ExampleLoader, collate
from llmkit.eval.metrics import classification_metrics, plot_confusion_matrix
from llmkit.eval.tag import format_scores, score_tagger
from llmkit.infer.classify import pad_id_for, predict_proba
from llmkit.model import lora as lora_lib
from llmkit.model.checkpoint import save_model
from llmkit.train import dp as privacy
from llmkit.train.loop import setup_distributed, train
from llmkit.train.losses import classify_loss, clm_loss, tag_loss
from llmkit.train.setup import FinetuneConfig, prepare
from llmkit.utils.io import write_json


def finetune(fc: FinetuneConfig, tc, epochs: float | None = None, dp=None):
    """Fine-tune per `fc` with train.py's loop configured by `tc` (a TrainConfig); returns the final metrics.

    tc.max_steps <= 0 means `epochs` passes over the data (default 1); tc.warmup_steps < 0 means 3% of the steps.
    dp (a privacy.DPConfig) trains with DP-SGD; the epsilon spent is logged, returned and kept in run_config.json.
    """
    out = Path(fc.out)
    if not tc.resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: pass --resume to continue that run, or a new --out")
    if dp is not None:
        dp.check()
        privacy.check_compatible(method=fc.method, grad_accum=tc.grad_accum, resume=tc.resume, compile=tc.compile,
                                 fsdp=tc.fsdp)
        if not fc.val_data:  # a split of the private --data would be scored, logged and used outside epsilon
            if tc.early_stopping:
                raise ValueError("--early-stopping under DP-SGD needs a public --val-data: scoring a held-out part "
                                 "of the private --data is not covered by epsilon")
            fc.val_fraction = 0.0  # no validation: every example trains, nothing private is scored
            print("DP-SGD without --val-data: validation is off (pass a public --val-data to validate)",
                  file=sys.stderr)
    p = prepare(fc)
    if dp is not None and p["task"] == "tag":
        raise ValueError("--dp-epsilon does not support --task tag yet (DP-SGD trains chat, instruct, classify, text)")
    lm, model, tok = p["lm"], p["lm"].model, p["lm"].tokenizer
    pad = pad_id_for(tok, model.config)
    rank, world, _ = setup_distributed(tc.device)  # under torchrun each rank trains on its slice of every batch
    train_data = ExampleLoader(p["train"], fc.batch_size, pad, seed=fc.seed, rank=rank, world_size=world)
    if epochs is not None or tc.max_steps <= 0:
        tc.max_steps = max(1, round((epochs or 1.0) * len(train_data) / max(1, tc.grad_accum)))
    if tc.warmup_steps < 0:
        tc.warmup_steps = max(1, tc.max_steps * 3 // 100)
    val_data = ExampleLoader(p["val"], fc.batch_size, pad, shuffle=False) if p["val"] else None
    base = fc.model if fc.model == "default" else str(Path(fc.model).resolve())

    def save_fn(d, m):
        if fc.method == "lora":
            lora_lib.save_adapter(d, m, p["lora"], base=base, tokenizer=tok, extra=p["extra"])
        else:
            save_model(d, m, tok, lm.generation_config)

    loss = val_loss = {"classify": classify_loss, "tag": tag_loss}.get(p["task"], clm_loss)  # the same validation
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"{p['task']} fine-tuning ({fc.method}): {len(p['train'])} train / {len(p['val'])} val examples, "
          f"{trainable:,} of {model.num_params():,} parameters trainable", file=sys.stderr)
    if val_data is not None:
        tc.eval_steps = max(tc.eval_steps, len(val_data))  # the whole validation set, every time
    run = {"finetune": {**fc.__dict__, "task": p["task"], "n_train": len(p["train"]), "n_val": len(p["val"]),
                        "truncated": p["truncated"]}}
    wrap = None
    if dp is not None:  # DP-SGD: per-example losses, Opacus clips per example (the loop's global clip is off)
        wrap = privacy.DPTraining(dp, p["train"], lambda ex: collate(ex, pad), fc.batch_size, tc.max_steps)
        loss = privacy.per_example_classify_loss if p["task"] == "classify" else privacy.per_example_clm_loss
        tc.grad_clip = 0.0
        run["dp"] = {**wrap.summary(), "validation": "public --val-data (outside epsilon)" if fc.val_data else "off"}
    result = train(model, train_data, loss, tc, val_data=val_data, save_fn=save_fn, run_config=run, wrap=wrap,
                   val_loss_fn=val_loss)
    if dp is not None:
        privacy.undo_dp_ready(model)
        _record_dp(out, {**wrap.summary(), "validation": run["dp"]["validation"]}, result)
    if p["task"] == "classify" and p["val"]:
        result.update(report_classification(model, tok, p["val_texts"], p["val_golds"], fc.max_length, out))
    if p["task"] == "tag" and p["val"]:
        result.update(report_tagging(model, tok, p["val_texts"], p["val_golds"], fc.max_length, out))
    return result


def _record_dp(out: Path, summary: dict, result: dict):
    result["epsilon"] = summary["epsilon_spent"]
    cfg_path = out / "run_config.json"
    if cfg_path.is_file():
        write_json(cfg_path, {**json.loads(cfg_path.read_text()), "dp": summary})
    print(f"differential privacy: spent epsilon {summary['epsilon_spent']:.3f} (target {summary['target_epsilon']:g})"
          f" at delta {summary['delta']:g} over {summary['steps']} steps, noise multiplier "
          f"{summary['noise_multiplier']:.3f}, max grad norm {summary['max_grad_norm']:g}", file=sys.stderr)


def report_classification(model, tok, texts, golds, max_length, out: Path | None = None) -> dict:
    """Accuracy, per-class P/R/F1, macro-F1 and the confusion matrix on labelled texts; printed, and saved under out."""
    probs = predict_proba(model, tok, texts, max_length)
    labels = [model.config.id2label[str(i)] for i in range(model.config.num_labels)]
    m = classification_metrics(golds, probs.argmax(-1).tolist(), labels)
    print(format_classification(m), file=sys.stderr)
    if out is not None:
        write_json(out / "val_metrics.json", m)
        plot_confusion_matrix(m["confusion_matrix"], labels, out / "confusion_matrix.png")
    return {"val_accuracy": m["acc"], "val_macro_f1": m["macro_f1"]}


def report_tagging(model, tok, sentences, golds, max_length, out: Path | None = None) -> dict:
    """Entity-level P/R/F1 (micro and per type) of a tagger on tagged sentences; printed, and saved under out."""
    m, _ = score_tagger(model, tok, sentences, golds, max_length)
    print(format_scores(m), file=sys.stderr)
    if out is not None:
        write_json(out / "val_metrics.json", m)
    return {"val_precision": m["precision"], "val_recall": m["recall"], "val_f1": m["f1"]}


def format_classification(m: dict) -> str:
    """A plain-text report: accuracy, macro-F1, per-class table, confusion matrix."""
    w = max(8, *(len(lab) for lab in m["labels"]))
    lines = [f"accuracy {m['acc']:.4f}   macro-F1 {m['macro_f1']:.4f} over all classes, "
             f"{m['macro_f1_present']:.4f} over the classes present",
             f"{'class':<{w}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for lab, r in m["per_class"].items():
        lines.append(f"{lab:<{w}} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} {r['support']:>8}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (w + 1) + " ".join(f"{lab[:8]:>8}" for lab in m["labels"]))
    for lab, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"{lab:<{w}} " + " ".join(f"{c:>8}" for c in row))
    return "\n".join(lines)
