"""Chat SFT: LoRA on the default model (SmolLM2-135M-Instruct) with the 175 Alpaca seed tasks as chat records.

The last 20 records of ../shared/data/instructions/seed_tasks_chat.jsonl are held out. Reports the held-out loss
(assistant tokens only) before and after, and greedy answers to three held-out prompts before and after.
Writes benchmarks/results/finetune_chat.json.

    .venv/bin/python benchmarks/finetune_chat.py --epochs 1 --threads 1
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmkit.model.checkpoint import load_model

from llmkit.utils.io import write_json
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.data.sft import ExampleLoader, encode_chat
from llmkit.train.finetune import finetune
from llmkit.train.losses import clm_loss
from llmkit.train.setup import FinetuneConfig
from llmkit.train.loop import TrainConfig, evaluate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "instructions" / "seed_tasks_chat.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
HOLD_OUT = 20


def val_loss(lm, records, max_length, batch_size=4) -> float:
    """Mean assistant-token loss on the records (train.py's evaluate over the same batches finetune validates on)."""
    ex = []
    for r in records:
        ids, labels, _ = encode_chat(lm.tokenizer, r["messages"], max_length)
        ex.append({"input_ids": ids, "labels": labels})
    data = ExampleLoader(ex, batch_size, lm.tokenizer.pad_id, shuffle=False)
    return evaluate(lm.model, data, clm_loss, len(data), None, torch.device("cpu"))["val_loss"]


def answers(lm, records, max_new_tokens):
    engine = Engine(lm.model, lm.tokenizer, lm.generation_config)
    prompts = [lm.tokenizer.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"][:2],
                                                add_generation_prompt=True) for r in records]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [c.text.strip() for c in engine.generate(prompts, params)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/llmkit_chat_sft", help="run folder (adapter, checkpoints, metrics)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-time", type=float, default=None, help="training seconds at most")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a shared CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = [json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]
    train_recs, held = records[:-HOLD_OUT], records[-HOLD_OUT:]
    tmp = Path(tempfile.mkdtemp(prefix="llmkit_chat_"))
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_recs))
    (tmp / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    samples = held[:3]

    base = load_model("default", dtype="float32")
    loss_before = val_loss(base, held, args.max_length)
    before = answers(base, samples, args.max_new_tokens)
    del base

    fc = FinetuneConfig(data=str(tmp / "train.jsonl"), val_data=str(tmp / "val.jsonl"), out=args.out, task="chat",
                        method="lora", max_length=args.max_length, batch_size=args.batch_size, lora_r=8,
                        lora_alpha=16, lora_dropout=0.05, lora_targets=["q", "k", "v", "o"])
    tc = TrainConfig(max_steps=0, max_time=args.max_time, lr=args.lr, warmup_steps=-1, weight_decay=0.0,
                     eval_every=0, log_every=5, out=args.out, device="cpu", dtype="float32")
    t0 = time.time()
    result = finetune(fc, tc, epochs=args.epochs)
    train_seconds = time.time() - t0

    tuned = load_model(args.out, dtype="float32")  # the adapter folder: base + merged adapter
    loss_after = val_loss(tuned, held, args.max_length)
    after = answers(tuned, samples, args.max_new_tokens)
    out = {
        "model": "SmolLM2-135M-Instruct (default) + LoRA r=8 on q,k,v,o", "n_train": len(train_recs),
        "n_heldout": len(held), "epochs": args.epochs, "steps": result["step"], "batch_size": args.batch_size,
        "lr": args.lr, "val_loss_before": round(loss_before, 4), "val_loss_after": round(loss_after, 4),
        "train_seconds": round(train_seconds, 1),
        "samples": [{"prompt": s["messages"][0]["content"], "reference": s["messages"][-1]["content"],
                     "before": b, "after": a} for s, b, a in zip(samples, before, after)],
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "finetune_chat.json", out)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
