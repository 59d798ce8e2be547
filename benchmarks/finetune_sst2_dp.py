"""SST-2 with differential privacy: the default model + LoRA + head at epsilon 8 and 1 against the non-private run.

All runs share the data subset, the step budget, the (expected) batch size and the learning rate; the DP runs use
DP-SGD through Opacus (Poisson sampling, per-example clipping, calibrated noise; PRV accountant). Reports dev accuracy
(on a dev subset), the epsilon actually spent, and time per step. A subset keeps it under ~8 minutes on a shared
2-core CPU, so accuracies are far below a full run's (the field's reference, Yu et al. 2022: RoBERTa-large MNLI 87.8 %
at epsilon 6.7 vs 90.2 % without privacy, after full training on 393k examples).

--max-grad-norm matters more than anything else here: the head's per-example gradients have norms of tens (the last
hidden state is large), and clipping them to 1 makes every example weigh the same however well it is classified, so
the runs drift to one class (README, "Choosing --max-grad-norm"). The recorded run uses 40.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/finetune_sst2_dp.py
"""
import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmkit.utils.io import write_results
from llmkit.data.sft import read_classification
from llmkit.train.finetune import finetune, report_classification
from llmkit.train.setup import FinetuneConfig
from llmkit.train.dp import DPConfig
from llmkit.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst"
RESULTS = ROOT / "benchmarks" / "results"


def subset(src: Path, dst: Path, n: int, seed: int):
    lines = src.read_text().splitlines()
    body = lines[1:]
    random.Random(seed).shuffle(body)
    dst.write_text("\n".join([lines[0], *body[:n]]) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=2000, help="SST-2 training examples used (random subset)")
    ap.add_argument("--dev-size", type=int, default=150, help="SST-2 dev examples scored (random subset)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16, help="(expected, under Poisson sampling) batch size")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=4, help="adapters on the top N blocks only")
    ap.add_argument("--lora-targets", default="all", help="comma-separated LoRA targets (fewer parameters: less "
                    "noise in total under DP)")
    ap.add_argument("--epsilons", default="8,1", help="comma-separated target epsilons")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning OpenMP threads on a "
                    "CPU shared with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="llmkit_dp_"))
    train, dev = tmp / "train.tsv", tmp / "dev.tsv"
    subset(DATA / "train.tsv", train, args.train_size, 0)
    subset(DATA / "dev.tsv", dev, args.dev_size, 0)
    n_layer = 30  # SmolLM2-135M
    runs = []
    for eps in [None] + [float(e) for e in args.epsilons.split(",")]:
        name = "non-private" if eps is None else f"epsilon {eps:g}"
        out = tmp / name.replace(" ", "_")
        fc = FinetuneConfig(data=str(train), out=str(out), task="classify", method="lora", max_length=args.max_length,
                            batch_size=args.batch_size, val_fraction=64 / args.train_size, lora_r=args.lora_r,
                            lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                            lora_targets=args.lora_targets.split(","),
                            lora_layers=list(range(n_layer - args.top_layers, n_layer)))
        tc = TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10), weight_decay=0.0,
                         eval_every=0, log_every=10, out=str(out), device="cpu", dtype="float32", progress=False)
        dp = None if eps is None else DPConfig(eps, args.delta, args.max_grad_norm)
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.time()
        res = finetune(fc, tc, dp=dp)
        trainable = sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
        total = time.time() - t0
        from llmkit.model.checkpoint import load_model

        lm = load_model(out)
        texts, golds, _ = read_classification(dev, id2label=lm.config.id2label)
        m = report_classification(lm.model, lm.tokenizer, texts, golds, args.max_length)
        run = {"run": name, "target_epsilon": eps, "epsilon_spent": res.get("epsilon"),
               "dev_accuracy": round(m["val_accuracy"], 4), "dev_macro_f1": round(m["val_macro_f1"], 4),
               "steps": res["step"], "train_seconds": round(res["time"], 1),
               "seconds_per_step": round(res["time"] / res["step"], 3), "wall_seconds": round(total, 1)}
        if dp is not None:
            run["noise_multiplier"] = json.loads((out / "run_config.json").read_text())["dp"]["noise_multiplier"]
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    base = runs[0]
    for r in runs[1:]:
        r["accuracy_gap_vs_non_private"] = round(base["dev_accuracy"] - r["dev_accuracy"], 4)
        r["step_time_ratio_vs_non_private"] = round(r["seconds_per_step"] / base["seconds_per_step"], 2)
    result = {
        "model": f"SmolLM2-135M-Instruct (default) + LoRA ({args.lora_targets}, top {args.top_layers} blocks) + "
                 "classification head",
        "data": f"SST-2 random subsets: {args.train_size} train (64 held out for validation), {args.dev_size} dev",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "delta": args.delta,
        "max_grad_norm": args.max_grad_norm, "accountant": "prv", "lora_r": args.lora_r,
        "lora_targets": args.lora_targets, "trainable_parameters": trainable,
        "top_layers": args.top_layers, "max_length": args.max_length, "threads": torch.get_num_threads(),
        "load_average_after": round(os.getloadavg()[0], 2),
        "reference": "Yu et al. 2022 (RoBERTa-large, MNLI): 87.8 % at epsilon 6.7 vs 90.2 % non-private",
        "runs": runs, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(RESULTS / "finetune_sst2_dp.json", result)
    print(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
