"""Speculative decoding with n-gram (prompt-lookup) drafts: acceptance and speed-up on copy-heavy work and on
open-ended chat. The default model (int4), greedy, batch 1: each prompt decoded without and with
Engine(speculative="ngram") (`--speculative ngram`), alternating, best of --repeats; the greedy tokens must be
identical (counted). The prompt's prefill is cached by a warm-up run, so the times are decode. Writes
benchmarks/results/speculative.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/speculative.py \
        [--new-tokens 96] [--repeats 3] [--draft-tokens 4] [--kernel-input bfloat16]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.infer.engine import Engine, SamplingParams  # noqa: E402
from llmkit.infer.speculative import Speculation  # noqa: E402
from llmkit.model import quant as quantize  # noqa: E402
from llmkit.model.checkpoint import load_model  # noqa: E402

TEXT = (ROOT / "tests/data/wikitext2_test_excerpt.txt").read_text()
PARA = TEXT[:700].rsplit(" ", 1)[0]
CODE = '''def moving_avrage(values, window):
    """Return the moving avrage of values over a window."""
    if window <= 0:
        raise ValueError("window must be posative")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
COPY_HEAVY = {
    "repeat": "Repeat this text exactly:\n\n" + PARA,
    "summarise": "Summarise this paragraph in two sentences, reusing its wording:\n\n" + PARA,
    "fix_typos_code": "Fix the spelling mistakes in the comments and strings of this code and return the whole "
                      "corrected code:\n\n" + CODE,
    "rag_answer": "Context:\n" + PARA + "\n\nUsing only the context, who is Robert Boulter and what has he "
                  "appeared in? Quote the context.",
}
OPEN_CHAT = {
    "poem": "Write a short poem about the sea.",
    "advice": "Give me three tips for learning a new language.",
    "story": "Tell me a short story about a robot who learns to paint.",
}


def timed(eng, ids, params):
    t0 = time.perf_counter()
    out = eng.generate([ids], params)[0]
    return time.perf_counter() - t0, out


def measure(eng, ids, params, k, repeats):
    spec = Speculation("ngram", k)
    eng.speculation = None
    timed(eng, ids, params)  # warm-up: the prompt's blocks go to the prefix cache
    best = {"off": float("inf"), "on": float("inf")}
    for _ in range(repeats):
        for mode in ("off", "on"):
            eng.speculation = spec if mode == "on" else None
            spec.reset()
            dt, out = timed(eng, ids, params)
            best[mode] = min(best[mode], dt)
            if mode == "off":
                base = out
            else:
                same, stats = out.token_ids == base.token_ids, dict(spec.stats)
    n = len(base.token_ids)
    forwards = stats["steps"] + (n - stats["emitted"])  # verified steps + plain one-token steps
    return {"new_tokens": n, "identical": same, "off_s": round(best["off"], 3), "on_s": round(best["on"], 3),
            "off_tok_s": round(n / best["off"], 1), "on_tok_s": round(n / best["on"], 1),
            "speedup": round(best["off"] / best["on"], 2),
            "acceptance": round(stats["accepted"] / stats["drafted"], 3) if stats["drafted"] else None,
            "drafted": stats["drafted"], "accepted": stats["accepted"],
            "tokens_per_forward": round(n / max(forwards, 1), 2), "verified_steps": stats["steps"]}


def summary(rows):
    drafted = sum(r["drafted"] for r in rows)
    return {"speedup_total_time": round(sum(r["off_s"] for r in rows) / sum(r["on_s"] for r in rows), 2),
            "acceptance": round(sum(r["accepted"] for r in rows) / drafted, 3) if drafted else None,
            "all_identical": all(r["identical"] for r in rows)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--kernel-input", default=None, choices=quantize.KERNEL_INPUTS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model("default", dtype="int4")
    if args.kernel_input:
        quantize.set_act_dtype(lm.model, getattr(torch, args.kernel_input))
    eng = Engine(lm.model, lm.tokenizer, lm.generation_config, kv_cache_mb=256)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    load0 = os.getloadavg()[0]
    result = {"benchmark": "speculative", "model": "default (int4)",
              "kernel_input": args.kernel_input or str(quantize.default_act_dtype()).split(".")[-1],
              "draft_tokens": args.draft_tokens, "repeats": args.repeats, "batch": 1,
              "command": "flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/speculative.py "
                         + " ".join(sys.argv[1:]), "cpus": os.cpu_count()}
    for name, prompts in (("copy_heavy", COPY_HEAVY), ("open_chat", OPEN_CHAT)):
        rows = {}
        for key, text in prompts.items():
            ids = eng.chat_prompt_ids([{"role": "user", "content": text}])
            rows[key] = measure(eng, ids, params, args.draft_tokens, args.repeats)
            print(name, key, rows[key], flush=True)
        result[name] = {"prompts": rows, **summary(list(rows.values()))}
    result["loadavg_1m_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    out = ROOT / "benchmarks/results/speculative.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("copy_heavy", "open_chat")}, indent=1)[:2000])


if __name__ == "__main__":
    main()
