"""Does a request's greedy answer depend on what runs beside it? The default model, 16 chat prompts, three ways:
alone, in batches of 8, and in batches of 8 beside a long prompt being prefilled; once in the default mode and once
with Engine(batch_invariant=True) (`--batch-invariant`). Counts the prompts whose tokens differ from their alone
answer and where they first differ, and times a batch of 8 in both modes (alternating, best of --repeats) for the
cost of exact equality. Writes benchmarks/results/batch_invariance.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/batch_invariance.py \
        [--new-tokens 48] [--repeats 2] [--kernel-input bfloat16]
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

from llmkit.model import quant as quantize  # noqa: E402
from llmkit.model.checkpoint import load_model  # noqa: E402
from llmkit.infer.engine import Engine, SamplingParams  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Give me a synonym for happy.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is photosynthesis?",
    "List two uses of copper.", "Who wrote Romeo and Juliet?", "What does a thermometer measure?",
    "Suggest a name for a pet cat.", "What is the boiling point of water?", "Describe a rainbow in one sentence.",
    "What is the largest ocean on Earth?",
]
LONG = (ROOT / "tests/data/wikitext2_test_excerpt.txt").read_text()


def run(engine, prompts, params, beside_long=False):
    """Greedy token ids of each prompt, all submitted together (and a long prompt first, if asked)."""
    ids = [engine.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    extra = [engine.tok.encode(LONG)[:1000]] if beside_long else []
    out = engine.generate(extra + ids, [SamplingParams(max_new_tokens=1, temperature=0)] * len(extra)
                          + [params] * len(ids))
    return [c.token_ids for c in out[len(extra):]]


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kernel-input", default=None, choices=quantize.KERNEL_INPUTS,
                    help="the int4 kernels' input dtype (default: this machine's default)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model("default", dtype="int4")
    if args.kernel_input:
        quantize.set_act_dtype(lm.model, getattr(torch, args.kernel_input))
    kin = str(lm.model.lm_head.act_dtype).split(".")[-1]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    result = {"benchmark": "batch_invariance", "model": "default (int4)", "kernel_input": kin,
              "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
              "command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/batch_invariance.py " + " ".join(sys.argv[1:]),
              "loadavg_1m": os.getloadavg()[0], "modes": {}}
    for mode in ("default", "batch_invariant"):
        engine = Engine(lm.model, lm.tokenizer, lm.generation_config, batch_invariant=mode == "batch_invariant",
                        prefix_caching=False)
        alone = [run(engine, [p], params)[0] for p in PROMPTS]
        batched = run(engine, PROMPTS[:8], params) + run(engine, PROMPTS[8:], params)
        beside = run(engine, PROMPTS[:8], params, True) + run(engine, PROMPTS[8:], params, True)
        result["modes"][mode] = {
            "differ_in_batch_of_8": sum(a != b for a, b in zip(alone, batched)),
            "differ_beside_long_prefill": sum(a != b for a, b in zip(alone, beside)),
            "first_differing_token": [first_diff(a, b) for a, b in zip(alone, batched)],
        }
        print(mode, result["modes"][mode], flush=True)
    engines = {m: Engine(lm.model, lm.tokenizer, lm.generation_config, batch_invariant=m == "batch_invariant",
                         prefix_caching=False) for m in ("default", "batch_invariant")}
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.repeats):  # alternating, best of --repeats
        for m, e in engines.items():
            t0 = time.perf_counter()
            run(e, PROMPTS[:8], params)
            best[m] = min(best[m], time.perf_counter() - t0)
    for m in engines:
        result["modes"][m]["batch8_tok_s"] = round(8 * args.new_tokens / best[m], 1)
    result["invariant_cost_ratio"] = round(best["batch_invariant"] / best["default"], 2)
    out = ROOT / "benchmarks/results/batch_invariance.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
