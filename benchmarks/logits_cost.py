"""The cost of float32 logits per decoded token: the default model's LM head (49,152 x 576, int8 from Q8_0 blocks)
through the bf16 kernel alone (bf16-rounded logits, what decoding used before issue 20) against logits.head_logits
(the same kernel, then every logit that may lie within HEAD_MARGIN of the best recomputed exactly in float32), and
against the whole head in float32. One row (batch-1 decode), on hidden states of 64 positions of held-out WikiText-2
text; per position the three alternate, best of --repeats; reports medians and the number of exact recomputations.
Writes benchmarks/results/logits_cost.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/logits_cost.py [--repeats 30]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.model import logits as M  # noqa: E402
from llmkit.model.checkpoint import load_model  # noqa: E402


def best_ms(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--positions", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model("default", dtype="int4")
    model, head = lm.model, lm.model.lm_head
    ids = lm.tokenizer.encode((ROOT / "tests/data/wikitext2_test_2k_tokens.txt").read_text())[:args.positions]
    counts = []
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), head="hidden")[0]
        exact_w = head.exact_rows(slice(None))
        rows = {"bf16_kernel_ms": [], "float32_logits_ms": [], "whole_head_float32_ms": []}
        for h in hidden:
            x = h[None]
            model.logits(x)  # row norms computed once
            for _ in range(2):  # alternating rounds
                rows["bf16_kernel_ms"].append(best_ms(lambda: head(x), args.repeats // 2))
                rows["float32_logits_ms"].append(best_ms(lambda: model.logits(x), args.repeats // 2))
                rows["whole_head_float32_ms"].append(best_ms(lambda: x @ exact_w.T, 3))
            y = head(x).float()  # how many logits the bound leaves within the margin (recomputed exactly)
            b = y.abs().mul_(M.ROUNDING).addcmul_(M._row_norms(head, head.exact_rows, x.device)[None],
                                                  x.norm(dim=1, keepdim=True))
            b.addcmul_(head.kernel_step[None], x.abs().sum(1, keepdim=True), value=0.5)
            near = (y + b >= (y - b).amax(1, keepdim=True) - M.HEAD_MARGIN)
            counts.append(int(near.sum()))
    med = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    result = {
        "benchmark": "logits_cost", "model": "default (int4, Q8_0 head)", "positions": len(ids),
        "torch_threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0],
        "command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/logits_cost.py " + " ".join(sys.argv[1:]),
        "median": med,
        "float32_logits_cost_ms": round(med["float32_logits_ms"] - med["bf16_kernel_ms"], 3),
        "exact_recomputed_per_token": {"median": statistics.median(counts), "max": max(counts)},
        "head_margin": M.HEAD_MARGIN, "target_ms": 0.5,
    }
    out = ROOT / "benchmarks/results/logits_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
