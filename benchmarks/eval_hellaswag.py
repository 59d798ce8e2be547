"""HellaSwag (0-shot) with the default model: llmkit's `eval choice` against lm-evaluation-harness, same run.

Both score the same items of ../shared/data/hellaswag/val_1000.jsonl with the same float32 weights: llmkit loads the
default model, exports it as a transformers folder, and lm-eval's HF backend (batch 8) runs a local multiple_choice
task over the same JSONL (doc_to_text = query, doc_to_choice = choices, target_delimiter " "). Reported: acc,
acc_norm, per-item agreement, seconds per item for each, and the speed-up.
Writes benchmarks/results/eval_hellaswag.json.

    .venv/bin/python benchmarks/eval_hellaswag.py [--limit N] [--no-baseline] [--batch-size 32]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval must never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hellaswag" / "val_1000.jsonl"

TASK_YAML = """task: llmkit_hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_lm_eval(hf_dir: Path, data: Path, work: Path, batch_size: int) -> dict:
    """lm-eval's HF backend on a local copy of the task; returns metrics, per-item acc and seconds."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    (work / "task").mkdir(exist_ok=True)
    (work / "task" / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["llmkit_hellaswag_local"],
        batch_size=batch_size, device="cpu", task_manager=TaskManager(include_path=str(work / "task")),
        log_samples=True)
    seconds = time.perf_counter() - t0
    res = out["results"]["llmkit_hellaswag_local"]
    samples = sorted(out["samples"]["llmkit_hellaswag_local"], key=lambda s: s["doc_id"])
    preds = [int(max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0]))) for s in samples]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "seconds": seconds, "predictions": preds,
            "acc_per_item": [s["acc"] for s in samples], "acc_norm_per_item": [s["acc_norm"] for s in samples]}


def matmul_gmacs_per_item(lm, records) -> dict:
    """Multiply-adds of the weight products per item (attention and elementwise work left out), for both schemes.

    lm-eval's HF backend runs each (context + ending)[:-1] through the whole model and the LM head at every position;
    llmkit runs each context once, each ending from a copy of its context's cache, and the LM head only where an
    ending token is scored. The ratio bounds the speed-up of any implementation doing the same arithmetic.
    """
    from llmkit.eval.evaluate import encode_pair

    body = sum(p.numel() for n, p in lm.model.named_parameters() if ".layers." in f".{n}")
    head = lm.model.lm_head.weight.numel()
    ours = theirs = 0
    for r in records:
        for choice in r["choices"]:
            ctx, cont = encode_pair(lm.tokenizer, r["query"], " " + choice)
            theirs += (len(ctx) + len(cont) - 1) * (body + head)
            ours += (len(cont) - 1) * body + len(cont) * head
        ours += len(ctx) * body
    n = len(records)
    return {"llmkit": ours / n / 1e9, "lm_eval": theirs / n / 1e9, "ratio": theirs / ours}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=None, help="first N items (default: all)")
    ap.add_argument("--no-baseline", action="store_true", help="skip lm-eval")
    ap.add_argument("--batch-size", type=int, default=32, help="llmkit: continuation rows per forward")
    ap.add_argument("--baseline-batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_hellaswag.json"))
    args = ap.parse_args()

    from llmkit.eval import evaluate
    from llmkit.utils.io import read_json_records, write_results
    from llmkit.model.checkpoint import export_hf, load_model

    load_before = load_avg()
    lm = load_model("default", dtype="float32")
    records = read_json_records(args.data)[: args.limit or None]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "items.jsonl"  # the exact items both sides score
        data.write_text("".join(json.dumps(r) + "\n" for r in records))

        ours = evaluate.evaluate_choice(lm, data, batch_size=args.batch_size)
        gmacs = matmul_gmacs_per_item(lm, records)
        result = {
            "benchmark": "hellaswag 0-shot, first %d items of val_1000.jsonl" % len(records),
            "model": "SmolLM2-135M-Instruct (default, Q4_1 GGUF dequantized, float32)",
            "command": "python benchmarks/eval_hellaswag.py" + (f" --limit {args.limit}" if args.limit else "")
                       + (" --no-baseline" if args.no_baseline else ""),
            "n": len(records), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "llmkit": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "acc_ci": ours["acc_ci"],
                       "acc_norm_ci": ours["acc_norm_ci"], "acc_bytes": ours["acc_bytes"], "ece": ours["ece"],
                       "brier": ours["brier"], "seconds": ours["seconds"],
                       "seconds_per_item": ours["seconds"] / len(records), "batch_size": args.batch_size,
                       "matmul_gmacs_per_item": round(gmacs["llmkit"], 2),
                       "matmul_gflops_achieved": round(2 * gmacs["llmkit"] * len(records) / ours["seconds"], 1)},
            "lm_eval_matmul_gmacs_per_item": round(gmacs["lm_eval"], 2),
            "arithmetic_ratio": round(gmacs["ratio"], 2),
        }
        print(f"llmkit: acc {ours['acc']:.4f} acc_norm {ours['acc_norm']:.4f} "
              f"{ours['seconds'] / len(records):.3f} s/item", file=sys.stderr)
        if not args.no_baseline:
            hf_dir = export_hf(lm, tmp / "hf")
            base = run_lm_eval(hf_dir, data, tmp, args.baseline_batch_size)
            agree = sum(a == b for a, b in zip(base["predictions"], ours["predictions"]))
            result["lm_eval"] = {"acc": base["acc"], "acc_norm": base["acc_norm"], "seconds": base["seconds"],
                                 "seconds_per_item": base["seconds"] / len(records),
                                 "batch_size": args.baseline_batch_size, "backend": "hf, float32, cpu"}
            result["identical_acc"] = base["acc"] == ours["acc"] and base["acc_norm"] == ours["acc_norm"]
            result["argmax_agreement"] = agree / len(records)
            result["speedup"] = base["seconds"] / ours["seconds"]
            lm_eval_gflops = 2 * gmacs["lm_eval"] * len(records) / base["seconds"]
            result["lm_eval"]["matmul_gflops_achieved"] = round(lm_eval_gflops, 1)
            print(f"lm-eval: acc {base['acc']:.4f} acc_norm {base['acc_norm']:.4f} "
                  f"{base['seconds'] / len(records):.3f} s/item; speed-up {result['speedup']:.2f}x", file=sys.stderr)
    result["load_after"] = load_avg()
    write_results(args.out, result)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
