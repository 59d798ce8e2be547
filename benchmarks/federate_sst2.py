"""Federated vs centralised SST-2, round by round: 4 Flower clients with non-IID shards (Dirichlet 0.5 over labels)
against one run on the union of their data, compared at the same number of examples seen.

Both start from the default model + the same LoRA + head initialisation, use the same batch size, constant learning
rate and LoRA set-up, and are scored on the same 64 held-out validation examples (every round / every
clients x local-steps steps) and, at the end, on the same SST-2 dev subset. The federated run is `llmkit federate`
(the Flower App in Flower's Simulation Engine: a SuperLink with --simulation, 4 virtual SuperNodes as Ray actors,
FedAvg, full participation); the centralised one is `llmkit finetune` for rounds x clients x local steps steps. The
rounds go on until the federated validation accuracy has stopped rising (the report says where it peaked). On one
2-core CPU the virtual clients and the server share the cores: wall times are this machine's, not a deployment's.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/federate_sst2.py
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

from llmkit.utils.io import write_results
from llmkit.train.federated import FederateConfig, federate
from llmkit.data.sft import read_classification
from llmkit.train.finetune import finetune, report_classification
from llmkit.train.setup import FinetuneConfig
from llmkit.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst"
RESULTS = ROOT / "benchmarks" / "results"


def subset(src: Path, dst: Path, n: int, seed: int):
    lines = src.read_text().splitlines()
    body = lines[1:]
    random.Random(seed).shuffle(body)
    dst.write_text("\n".join([lines[0], *body[:n]]) + "\n")


def dev_accuracy(out: Path, dev: Path, max_length: int) -> float:
    from llmkit.model.checkpoint import load_model

    lm = load_model(out)
    texts, golds, _ = read_classification(dev, id2label=lm.config.id2label)
    return round(report_classification(lm.model, lm.tokenizer, texts, golds, max_length)["val_accuracy"], 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=1000, help="SST-2 training examples (random subset)")
    ap.add_argument("--dev-size", type=int, default=150, help="SST-2 dev examples scored (random subset)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--split", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=2, help="adapters on the top N blocks only")
    ap.add_argument("--name", default="federate_sst2", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="llmkit_fed_"))
    train, dev = tmp / "train.tsv", tmp / "dev.tsv"
    subset(DATA / "train.tsv", train, args.train_size, 0)
    subset(DATA / "dev.tsv", dev, args.dev_size, 0)
    val_fraction = 64 / args.train_size

    # ---- federated
    fed_out = tmp / "federated"
    fc = FederateConfig(model="default", data=str(train), out=str(fed_out), clients=args.clients, rounds=args.rounds,
                        split=args.split, strategy="fedavg", local_steps=args.local_steps, batch_size=args.batch_size,
                        lr=args.lr, max_length=args.max_length, val_fraction=val_fraction, task="classify",
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_targets=["all"],
                        lora_layers=args.top_layers)
    t0 = time.time()
    fed = federate(fc, verbose=False)
    fed_wall = time.time() - t0
    rows = [json.loads(x) for x in (fed_out / "metrics.jsonl").read_text().splitlines()]
    shards = json.loads((fed_out / "run_config.json").read_text())["federate"]["shard_sizes"]
    seen = sum(r.get("clients_ok", 0) for r in rows) * args.local_steps * args.batch_size
    fed_acc = dev_accuracy(fed_out, dev, args.max_length)
    RESULTS.mkdir(parents=True, exist_ok=True)

    # ---- centralised on the union, the same number of examples seen
    cen_out = tmp / "centralised"
    steps = seen // args.batch_size
    ft = FinetuneConfig(data=str(train), out=str(cen_out), task="classify", method="lora", max_length=args.max_length,
                        batch_size=args.batch_size, val_fraction=val_fraction, lora_r=args.lora_r,
                        lora_alpha=2 * args.lora_r, lora_dropout=0.0, lora_targets=["all"], lora_layers=args.top_layers)
    per_round = args.clients * args.local_steps  # centralised steps per federated round at full participation
    tc = TrainConfig(max_steps=steps, lr=args.lr, min_lr=args.lr, warmup_steps=0, weight_decay=0.0,
                     eval_every=per_round, out=str(cen_out), device="cpu", dtype="float32", progress=False)
    t0 = time.time()
    cen = finetune(ft, tc)
    cen_wall = time.time() - t0
    cen_acc = dev_accuracy(cen_out, dev, args.max_length)
    cen_rows = [json.loads(x) for x in (cen_out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cen_curve = {r["step"] * args.batch_size: r["val_acc"] for r in cen_rows if "val_acc" in r}
    fed_curve = {}
    seen_so_far = 0
    for r in rows:
        seen_so_far += r.get("clients_ok", 0) * args.local_steps * args.batch_size
        fed_curve[seen_so_far] = r["val_acc"]
    fed_accs = [r["val_acc"] for r in rows]
    peak = max(range(len(fed_accs)), key=lambda i: (fed_accs[i], -i))
    plot(fed_curve, cen_curve, RESULTS / f"{args.name}.png")

    result = {
        "model": f"SmolLM2-135M-Instruct (default) + LoRA (all linears, top {args.top_layers} blocks) + "
                 "classification head",
        "data": f"SST-2 random subsets: {args.train_size} train (64 held out for the server's validation), "
                f"{args.dev_size} dev",
        "clients": args.clients, "split": args.split, "shard_sizes": shards, "rounds": args.rounds,
        "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr, "top_layers": args.top_layers,
        "examples_seen": seen,
        "federated": {"dev_accuracy": fed_acc, "wall_seconds": round(fed_wall, 1),
                      "val_acc_per_round": fed_accs, "best_round": peak,
                      "val_acc_by_examples_seen": fed_curve,
                      "bytes_sent": fed["bytes_sent"], "bytes_received": fed["bytes_received"]},
        "centralised": {"dev_accuracy": cen_acc, "wall_seconds": round(cen_wall, 1), "steps": steps,
                        "val_acc_by_examples_seen": cen_curve,
                        "train_seconds": round(cen["time"], 1)},
        "accuracy_gap": round(cen_acc - fed_acc, 4),
        "wall_time_ratio_federated_vs_centralised": round(fed_wall / cen_wall, 2),
        "machine": "one 2-core CPU shared with other jobs: the federated run's server and Ray actors share its cores",
        "load_average_before": load_before,
        "load_average_after": round(os.getloadavg()[0], 2),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    write_results(RESULTS / f"{args.name}.json", result)
    print(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


def plot(fed: dict, cen: dict, path: Path) -> None:
    """Validation accuracy against examples seen: federated (per round) and centralised (same examples seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit.utils.plot import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(fed), list(fed.values()), "o-", label="federated (4 clients, Dirichlet 0.5), one point a round")
    ax.plot(list(cen), list(cen.values()), "s--", label="centralised (union of the shards)")
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("validation accuracy (64 held-out)")
    ax.set_title("SST-2, SmolLM2-135M + LoRA: federated vs centralised")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
