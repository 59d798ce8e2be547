"""WikiANN English NER: the default model (SmolLM2-135M-Instruct) + LoRA + a token-classification head, on a CPU,
beside the same run through transformers + peft (LlamaForTokenClassification).

Both runs train on the same first --n-train sentences of ../shared/data/ner/wikiann_en/train.conll, tokenized once by
llmkit's pipeline (each word's tag on its first sub-token, the rest ignored), in the same batches and order (llmkit's
ExampleLoader, same seed), for the same steps with the same optimizer (AdamW, betas 0.9/0.95, no weight decay), the
same warmup + cosine schedule (llmkit's lr_at), gradient clipping at 1.0 and the same LoRA (r, alpha, dropout, all
linear layers of the top --top-layers blocks, the head trained fully). Both are scored on the first --n-dev sentences
of dev.conll with entity-level micro F1 (llmkit's eval.tag, seqeval's default mode; seqeval itself is checked on the
llmkit run's predictions when installed). Writes benchmarks/results/ner_wikiann.json.

    flock /tmp/llmkit-bench.lock .venv/bin/python benchmarks/ner_wikiann.py
"""
import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmkit.data.conll import read_tagged, tag_examples
from llmkit.data.sft import ExampleLoader
from llmkit.eval.tag import entity_scores, score_tagger
from llmkit.infer.classify import pad_id_for
from llmkit.infer.tag import encode_words
from llmkit.model.checkpoint import load_model, save_model
from llmkit.train.finetune import finetune
from llmkit.train.loop import TrainConfig, lr_at
from llmkit.train.setup import FinetuneConfig
from llmkit.utils.io import write_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ner" / "wikiann_en"
RESULTS = ROOT / "benchmarks" / "results"
N_LAYER = 30  # SmolLM2-135M


def write_conll(path, sents):
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in sents))


def run_llmkit(args, train_file, val_file, out):
    fc = FinetuneConfig(data=str(train_file), val_data=str(val_file), out=str(out), task="tag", method="lora",
                        max_length=args.max_length, batch_size=args.batch_size, lora_r=args.lora_r,
                        lora_alpha=2 * args.lora_r, lora_dropout=0.05, lora_targets=["all"],
                        lora_layers=list(range(N_LAYER - args.top_layers, N_LAYER)), seed=0)
    tc = TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0, eval_every=0,
                     log_every=10, out=str(out), device="cpu", dtype="float32", seed=0, progress=False)
    if out.exists():
        shutil.rmtree(out)
    result = finetune(fc, tc)
    train_seconds = result["time"]  # the training loop's own clock (no loading, saving, final validation)
    lm = load_model(out, dtype="float32")  # the adapter as saved: base + merged adapter
    return lm, result, train_seconds


def run_transformers(args, train_sents, id2label, tok, hf_dir):
    """The same run with transformers' LlamaForTokenClassification and peft's LoRA, in a plain torch loop."""
    import peft
    import transformers

    label2id = {v: int(k) for k, v in id2label.items()}
    config = transformers.AutoConfig.from_pretrained(hf_dir, num_labels=len(id2label), label2id=label2id,
                                                     id2label={int(k): v for k, v in id2label.items()})
    config.classifier_dropout = 0.0  # llmkit's head has no dropout on a Llama (its config's dropout is 0)
    model = transformers.LlamaForTokenClassification.from_pretrained(hf_dir, config=config, dtype=torch.float32)
    model.config.pad_token_id = pad_id_for(tok, model.config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = peft.LoraConfig(task_type=peft.TaskType.TOKEN_CLS, r=args.lora_r, lora_alpha=2 * args.lora_r,
                           lora_dropout=0.05, target_modules=targets,
                           layers_to_transform=list(range(N_LAYER - args.top_layers, N_LAYER)))
    torch.manual_seed(0)
    model = peft.get_peft_model(model, lcfg)
    examples, _, _, _, _ = tag_examples(tok, train_sents, args.max_length, id2label)
    loader = iter(ExampleLoader(examples, args.batch_size, pad_id_for(tok, model.config), seed=0))
    tc = TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0, losses = time.time(), []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        b = next(loader)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            print(f"[transformers] step {step + 1} loss {sum(losses[-10:]) / 10:.4f}", file=sys.stderr)
    return model.eval(), time.time() - t0, sum(losses[-10:]) / min(10, len(losses))


@torch.inference_mode()
def hf_predict(model, tok, sents, id2label, max_length, batch_size=32):
    from llmkit.infer.classify import pad_batch

    pad, preds = pad_id_for(tok, model.config), []
    for s in range(0, len(sents), batch_size):
        enc = [encode_words(tok, ws, max_length) for ws, _ in sents[s:s + batch_size]]
        ids, mask = pad_batch([e[0] for e in enc], pad)
        arg = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        preds += [[id2label[str(int(arg[r, t]))] if t >= 0 else "O" for t in e[1]] for r, e in enumerate(enc)]
    return preds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/llmkit_ner_wikiann", help="work folder (llmkit run, exported base)")
    ap.add_argument("--n-train", type=int, default=1280, help="first N training sentences")
    ap.add_argument("--n-val", type=int, default=32, help="next N training sentences: llmkit's validation")
    ap.add_argument("--n-dev", type=int, default=400, help="first N dev sentences scored")
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps (80 x 16 = one pass)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=8, help="adapters on the top N blocks only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    train_all = read_tagged(DATA / "train.conll")
    train = train_all[:args.n_train]
    val = train_all[args.n_train:args.n_train + args.n_val]
    dev = read_tagged(DATA / "dev.conll")[:args.n_dev]
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        write_conll(tmp / "train.conll", train)
        write_conll(tmp / "val.conll", val)
        lm, result, llmkit_seconds = run_llmkit(args, tmp / "train.conll", tmp / "val.conll", work / "llmkit_run")
    tok, id2label = lm.tokenizer, lm.config.id2label
    t1 = time.time()
    m, preds = score_tagger(lm.model, tok, [w for w, _ in dev], [t for _, t in dev], args.max_length)
    llmkit_eval = time.time() - t1
    golds = [t for _, t in dev]
    out = {
        "task": "WikiANN English NER (PER/LOC/ORG, IOB2), entity-level micro F1 on dev (seqeval default mode)",
        "model": "SmolLM2-135M-Instruct (default, Q4_1 GGUF dequantized), float32",
        "method": "LoRA (all linears of the top blocks) + token-classification head; word tag on the first sub-token",
        "n_train": len(train), "n_val": len(val), "n_dev": len(dev), "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup, "max_length": args.max_length,
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05, "targets": "all linears",
                 "layers": list(range(N_LAYER - args.top_layers, N_LAYER))},
        "threads": torch.get_num_threads(),
        "llmkit": {"dev_f1": round(m["f1"], 4), "dev_precision": round(m["precision"], 4),
                   "dev_recall": round(m["recall"], 4),
                   "dev_f1_per_type": {t: round(v["f1"], 4) for t, v in m["per_type"].items()},
                   "final_train_loss": result.get("train_loss"), "train_seconds": round(llmkit_seconds, 1),
                   "dev_eval_seconds": round(llmkit_eval, 1)},
    }
    try:
        from seqeval.metrics import f1_score

        out["llmkit"]["dev_f1_seqeval"] = round(f1_score(golds, preds), 4)
    except ImportError:
        pass
    if not args.skip_transformers:
        hf_dir = work / "base_hf"
        save_model(hf_dir, load_model("default", dtype="float32").model, tok)  # the same weights as a HF folder
        model, hf_seconds, hf_loss = run_transformers(args, train, id2label, tok, hf_dir)
        t2 = time.time()
        hf_preds = hf_predict(model, tok, dev, id2label, args.max_length)
        hm = entity_scores(golds, hf_preds)
        out["transformers_peft"] = {
            "dev_f1": round(hm["f1"], 4), "dev_precision": round(hm["precision"], 4),
            "dev_recall": round(hm["recall"], 4),
            "dev_f1_per_type": {t: round(v["f1"], 4) for t, v in hm["per_type"].items()},
            "final_train_loss": round(hf_loss, 4), "train_seconds": round(hf_seconds, 1),
            "dev_eval_seconds": round(time.time() - t2, 1)}
        out["f1_ratio_llmkit_over_transformers"] = round(m["f1"] / hm["f1"], 4) if hm["f1"] else None
        out["train_speed_ratio_transformers_over_llmkit"] = round(hf_seconds / llmkit_seconds, 3)
    out["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "ner_wikiann.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
