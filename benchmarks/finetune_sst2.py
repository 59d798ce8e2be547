"""SST-2 sentiment: the default model (SmolLM2-135M-Instruct) + LoRA + a classification head, on a CPU.

Trains on ../shared/data/sst/train.tsv (a held-out slice of it for validation during training) with train.py's loop
under a wall-clock budget, then evaluates on ../shared/data/sst/dev.tsv. Writes benchmarks/results/finetune_sst2.json,
the learning curve (finetune_sst2_curve.png) and the dev confusion matrix.

    .venv/bin/python benchmarks/finetune_sst2.py --max-time 1800 --threads 1
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from llmkit.utils.io import write_json
from llmkit.data.sft import read_classification
from llmkit.train.finetune import finetune, report_classification
from llmkit.train.setup import FinetuneConfig
from llmkit.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst"
RESULTS = ROOT / "benchmarks" / "results"


def plot_curve(run_dir: Path, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in rows if "train_loss" in r]
    ax.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], alpha=0.5, label="train loss")
    va = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in va], [r["val_acc"] for r in va], "s-", color="tab:green", label="val accuracy")
    ax2.set_ylim(0.4, 1.0)
    ax2.set_ylabel("accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.45))
    ax.set_title("SST-2: SmolLM2-135M-Instruct + LoRA + classification head")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/llmkit_sst2", help="run folder (adapter, checkpoints, metrics)")
    ap.add_argument("--max-time", type=float, default=1800, help="training seconds at most")
    ap.add_argument("--max-steps", type=int, default=600, help="optimizer steps (length of the cosine schedule)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=10, help="adapters on the top N blocks only: the backward "
                    "pass stops there, about twice as fast a step as adapters everywhere")
    ap.add_argument("--val-size", type=int, default=256, help="training examples held out for validation curves")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a CPU shared with "
                    "other jobs: no spinning OpenMP threads)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layer = 30  # SmolLM2-135M
    fc = FinetuneConfig(data=str(DATA / "train.tsv"), out=args.out, task="classify", method="lora",
                        max_length=args.max_length, batch_size=args.batch_size, val_fraction=args.val_size / 6920,
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, lora_targets=["all"],
                        lora_layers=list(range(n_layer - args.top_layers, n_layer)))
    tc = TrainConfig(max_steps=args.max_steps, max_time=args.max_time, lr=args.lr, warmup_steps=30,
                     weight_decay=0.0, eval_every=100, log_every=10, out=args.out, device="cpu", dtype="float32")
    t0 = time.time()
    result = finetune(fc, tc)
    train_seconds = result["time"]
    print(f"training done in {train_seconds:.0f} s ({time.time() - t0:.0f} s with validation and saving)")

    # ---- dev set, with the adapter as saved (load_model(adapter dir) = base + merged adapter)
    from llmkit.model.checkpoint import load_model

    lm = load_model(args.out)
    texts, golds, _ = read_classification(DATA / "dev.tsv", id2label=lm.config.id2label)
    t1 = time.time()
    dev = report_classification(lm.model, lm.tokenizer, texts, golds, args.max_length, Path(args.out))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curve(Path(args.out), RESULTS / "finetune_sst2_curve.png")
    import shutil

    shutil.copy(Path(args.out) / "confusion_matrix.png", RESULTS / "finetune_sst2_confusion.png")
    steps = result["step"]
    out = {
        "model": "SmolLM2-135M-Instruct (default, Q4_1 GGUF dequantized)", "method": "LoRA + classification head",
        "dev_accuracy": round(dev["val_accuracy"], 4), "dev_macro_f1": round(dev["val_macro_f1"], 4),
        "n_dev": len(texts), "n_train": 6920 - args.val_size, "n_val": args.val_size,
        "steps": steps, "batch_size": args.batch_size, "train_examples_seen": steps * args.batch_size,
        "train_seconds": round(train_seconds, 1), "dev_eval_seconds": round(time.time() - t1, 1),
        "final_val_accuracy": result.get("val_acc"), "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r,
                                                               "targets": "all linears", "layers": fc.lora_layers},
        "max_length": args.max_length, "lr": args.lr, "threads": torch.get_num_threads(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    write_json(RESULTS / "finetune_sst2.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
