"""Pruning the default model: WikiText-2 perplexity of magnitude vs Wanda vs SparseGPT, N:M, structured, sparsity sweep.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32) is pruned in memory, each method from a
fresh copy of the dense weights, and scored on the first --ppl-chars characters of WikiText-2 test
(../shared/data/wikitext-2/test.txt) in disjoint windows of --context tokens (evaluate.rolling_loglikelihood, the
same arithmetic as `llmkit eval perplexity`). Calibration (Wanda, SparseGPT, structured importances, recovery) uses
--calib-samples windows of 128 tokens from WikiText-2 *validation*, never the scored text.

Rows: dense; magnitude / Wanda / SparseGPT at 50 % unstructured and at 2:4; structured 25 % (KV groups + MLP
channels) with and without --recover steps of full fine-tuning on the validation text; and a sweep of sparsity
0.3-0.7 (--sweep, --sweep-methods, default magnitude and Wanda) (compress_prune.png). Defaults are small so that a run
fits in ~15 minutes on a 2-core machine loaded by other jobs (the papers calibrate on 128 x 2048 tokens and score
all of the test set; use e.g. --ppl-chars 100000 --calib-samples 128 --calib-len 512 --sweep 0.1,0.2,...,0.7 on a
quiet machine). The paper reference (Sun et al. 2023, LLaMA-2-7B, 50 %
unstructured): dense 5.12, magnitude 14.89, Wanda 6.42. The machine is shared by several jobs (2 cores): seconds are
indicative only. Writes benchmarks/results/compress_prune.json and compress_prune.png.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/compress_prune.py \
        [--ppl-chars 2000] [--calib-samples 8] [--calib-len 64] [--recover 3] [--sweep 0.3,0.5,0.7] [--sparsegpt-nm] \
        [--sweep-methods magnitude,wanda]
"""
import argparse
import copy
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", default=str(SHARED / "test.txt"))
    ap.add_argument("--calib", default=str(SHARED / "valid.txt"))
    ap.add_argument("--ppl-chars", type=int, default=2000, help="characters of the test text scored")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--recover", type=int, default=3, help="recovery steps after structured pruning")
    ap.add_argument("--sweep", default="0.3,0.5,0.7")
    ap.add_argument("--sweep-methods", default="magnitude,wanda", help="SparseGPT takes ~1-2 min a run here")
    ap.add_argument("--sparsegpt-nm", action="store_true", help="also SparseGPT at 2:4 (a few minutes more)")
    ap.add_argument("--calib-len", type=int, default=64, help="tokens per calibration sample")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_prune.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a machine loaded by other jobs, fewer thread hand-offs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmkit.eval import evaluate
    from llmkit.compress import prune as P
    from llmkit.compress import sparsity as S
    from llmkit.compress.report import non_embedding_params
    from llmkit.utils.io import read_utf8, write_results
    from llmkit.model.checkpoint import load_model

    t_start = time.time()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lm = load_model("default", dtype="float32")
    dense, tok = lm.model, lm.tokenizer
    text = read_utf8(args.test)[: args.ppl_chars]
    tokens = evaluate.tok_encode(tok, text)
    prefix = evaluate.prefix_token_id(tok)
    calib = S.calibration_samples(tok, args.calib, args.calib_samples, args.calib_len, seed=0)

    def ppl(model) -> float:
        r = evaluate.rolling_loglikelihood(model, tokens, prefix, args.context, batch_size=4)
        return math.exp(-r["loglikelihood"] / r["tokens"])

    rows = []

    def record(name, model, seconds, **extra):
        t0 = time.time()
        row = {"name": name, "ppl": ppl(model), "params": model.num_params(),
               "nonzero_block_params": sum(int((lin.weight != 0).sum()) for _, lin in S.block_linears(model)),
               "block_params": sum(lin.weight.numel() for _, lin in S.block_linears(model)),
               "prune_seconds": round(seconds, 1), "eval_seconds": round(time.time() - t0, 1), **extra}
        rows.append(row)
        print(f"{name:<34} ppl {row['ppl']:9.2f}  ({seconds:.0f} s prune)", file=sys.stderr, flush=True)
        return row

    def pruned(method, sparsity, nm=None):
        m = copy.deepcopy(dense)
        t0 = time.time()
        S.prune_unstructured(m, method, sparsity, nm, None if method == "magnitude" else calib, progress=False)
        return m, time.time() - t0

    record("dense", dense, 0.0)
    for method in S.METHODS:
        for nm, label in ((None, "50% unstructured"), ((2, 4), "2:4")):
            if method == "sparsegpt" and nm is not None and not args.sparsegpt_nm:
                continue
            m, s = pruned(method, 0.5, nm)
            record(f"{method} {label}", m, s, method=method, pattern=label)
            del m

    # structured 25 %: KV groups (1 of 3 in SmolLM2-135M) and MLP channels, then a short recovery
    plan = P.plan_structured(dense.config, ["heads", "mlp"], 0.25)
    t0 = time.time()
    small = P.prune_structured(copy.deepcopy(dense), plan, calib)
    s = time.time() - t0
    record("structured 25% heads+mlp", small, s, plan=plan,
           non_embedding_params=non_embedding_params(small), dense_non_embedding=non_embedding_params(dense))
    if args.recover:
        rec = P._recovery_examples(tok, args.calib, 128, 2)
        rec = (rec[0], rec[1][:4])  # a small validation slice: the benchmark scores WikiText-2 test itself
        for how, lr in (("full", 5e-5), ("lora", 5e-4)):  # the same steps and data; LoRA: r 16 on every linear
            pc = P.PruneConfig(model="default", out=None, method="structured", calib_data=args.calib,
                               recover=args.recover, recover_method=how, recover_lr=lr, recover_batch_size=2,
                               progress=False)
            m = copy.deepcopy(small)
            t0 = time.time()
            res = P._recover(m, lm, rec, pc, keep_zeros=False)
            record(f"structured 25% + {how} recover {args.recover}", m, s + time.time() - t0,
                   recovery={"method": how, "lr": lr, **{k: res.get(k) for k in ("train_loss", "val_loss")}})
            del m
    del small

    # sweep
    sweep = {}
    for method in args.sweep_methods.split(","):
        sweep[method] = []
        for sp in [float(x) for x in args.sweep.split(",")]:
            if sp == 0.5 and f"{method} 50% unstructured" in {r["name"] for r in rows}:  # measured above
                sweep[method].append({"sparsity": sp, "ppl": next(r["ppl"] for r in rows
                                                                  if r["name"] == f"{method} 50% unstructured")})
                continue
            m, _ = pruned(method, sp)
            sweep[method].append({"sparsity": sp, "ppl": ppl(m)})
            print(f"sweep {method} {sp:.1f}: {sweep[method][-1]['ppl']:.2f}", file=sys.stderr, flush=True)
            del m
    png = Path(args.out).with_suffix(".png")
    plot(rows[0]["ppl"], sweep, png)

    by = {r["name"]: r["ppl"] for r in rows}
    result = {
        "benchmark": f"WikiText-2 test token perplexity, first {args.ppl_chars} characters ({len(tokens)} tokens), "
                     f"{args.context}-token windows; calibration {args.calib_samples} x {args.calib_len} tokens of "
                     f"WikiText-2 valid; "
                     f"recovery {args.recover} steps of 2 x 128 tokens (full: lr 5e-5; LoRA r 16: lr 5e-4)",
        "model": "SmolLM2-135M-Instruct (default, Q4_1 GGUF dequantized, float32)",
        "command": "flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/compress_prune.py"
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                             if v != ap.get_default(k)),
        "paper_reference": {"model": "LLaMA-2-7B", "dense": 5.12, "magnitude_50": 14.89, "wanda_50": 6.42},
        "rows": rows,
        "wanda_vs_magnitude_50": by["wanda 50% unstructured"] / by["magnitude 50% unstructured"],
        "sparsegpt_vs_magnitude_50": by["sparsegpt 50% unstructured"] / by["magnitude 50% unstructured"],
        "sweep": sweep, "plot": str(png.relative_to(ROOT)),
        "storage_note": "pruned weights are stored dense: file size and decode speed equal the dense model's",
        "semi_structured": S.semi_structured_support(),
        "torch_threads": torch.get_num_threads(), "load_before": load_before,
        "load_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "seconds": round(time.time() - t_start, 1),
    }
    write_results(args.out, result)
    print("\n| model | WikiText-2 ppl | prune s |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['prune_seconds']:.0f} |")


def plot(dense_ppl, sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sweep.items():
        ax.plot([p["sparsity"] for p in pts], [p["ppl"] for p in pts], "o-", label=method)
    ax.axhline(dense_ppl, color="gray", ls="--", label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity of every block linear layer")
    ax.set_ylabel("WikiText-2 token perplexity (log scale)")
    ax.set_title("Pruning SmolLM2-135M-Instruct: perplexity vs sparsity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
