"""Decode speed of the default model: llmkit's engine against transformers' generate on the same weights.

Greedy decoding of 128 new tokens at batch 1 and batch 8 (8 different prompts, left-padded), in this one process.
llmkit runs in several set-ups (float32; bfloat16 weights; bfloat16 with compiled decode steps) against transformers
in float32. Decode tokens/s = new tokens after the first / (time for 128 tokens - time for 1 token), so prompt
processing is excluded for both. Timings alternate between set-ups and take the best of --repeats, because a shared
machine's speed drifts. The headline figures per batch size are the best llmkit set-up's (named in the JSON).
Writes benchmarks/results/generate_speed.json.

    .venv/bin/python benchmarks/generate_speed.py [--setups float32,bfloat16,bfloat16+compile] [--repeats 3]
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a transformer language model works.",
    "List five uses of a paperclip.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Hamlet.",
    "Why is the sky blue?",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: summing a 1 GiB float32 tensor (far larger than any cache), best of 3."""
    x = torch.ones(2**28)
    x.sum()
    return 2**30 / best_of(lambda: x.sum(), 3) / 1e9


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="float32,bfloat16,bfloat16+compile",
                    help="llmkit set-ups, comma-separated: DTYPE or DTYPE+compile")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    args = ap.parse_args()

    import transformers

    from llmkit.checkpoint import default_model_dir, load_model
    from llmkit.engine import Engine, SamplingParams
    from llmkit.evaluate import write_results

    folder = default_model_dir()  # the bf16 safetensors folder converted from the GGUF: both load these weights
    engines = {}
    for setup in args.setups.split(","):
        dtype, _, compiled = setup.partition("+")
        lm = load_model(folder, dtype=dtype)
        engines[setup] = Engine(lm.model, lm.tokenizer, lm.generation_config, compile=compiled == "compile")
    tok = lm.tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    results = {"baseline": f"transformers {transformers.__version__} generate, float32", "cpu": cpu_model(),
               "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "torch": torch.__version__}
    # batch-1 decode reads every weight once per token: bandwidth / weight bytes bounds tokens/s for any engine
    results["memory_read_gbs"] = round(memory_bandwidth_gbs(), 2)
    weights = {}
    for setup, engine in engines.items():
        weights[setup] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    rows = []
    setups = {}
    for batch in (1, 8):
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in PROMPTS[:batch]]
        enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

        def ours(engine, n):
            out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
            assert all(len(c.token_ids) == n for c in out)

        def theirs(n):
            with torch.inference_mode():
                out = hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=hf_tok.pad_token_id)
            assert out.shape[1] == enc["input_ids"].shape[1] + n

        fns = {name: (lambda n, e=e: ours(e, n)) for name, e in engines.items()}
        fns["transformers"] = theirs
        for fn in fns.values():
            fn(2)  # warm-up (and the compile of a compiled set-up)
        first = {name: [] for name in fns}
        whole = {name: [] for name in fns}
        for _ in range(args.repeats):  # alternate, so that drift of the machine's speed hits every set-up alike
            for name, fn in fns.items():
                first[name].append(best_of(lambda: fn(1), 1))
                whole[name].append(best_of(lambda: fn(args.new_tokens), 1))
        tok_s = {name: batch * (args.new_tokens - 1) / (min(whole[name]) - min(first[name])) for name in fns}
        base = tok_s.pop("transformers")
        for name, v in tok_s.items():
            setups.setdefault(name, {"weight_bytes": weights[name]})
            setups[name][f"tok_s_batch{batch}"] = round(v, 2)
            setups[name][f"speedup_batch{batch}"] = round(v / base, 2)
            setups[name][f"weight_read_gbs_batch{batch}"] = round(v / batch * weights[name] / 1e9, 2)
            rows.append((batch, name, v, base, v / base))
        best = max(tok_s, key=tok_s.get)
        results[f"llmkit_setup_batch{batch}"] = best
        results[f"llmkit_tok_s_batch{batch}"] = round(tok_s[best], 2)
        results[f"baseline_tok_s_batch{batch}"] = round(base, 2)
        results[f"speedup_batch{batch}"] = round(tok_s[best] / base, 2)
        if batch == 1:
            results["dtype"] = best.partition("+")[0]
            results["batch1_roofline_tok_s"] = round(results["memory_read_gbs"] * 1e9 / weights[best], 2)
    results["setups"] = setups

    print(f"\ndecode tokens/s, {cpu_model()}, {torch.get_num_threads()} threads, llmkit vs transformers float32")
    print(f"{'batch':>5} {'llmkit set-up':>18} {'llmkit':>8} {'transformers':>13} {'speedup':>8}")
    for b, name, a, t, s in rows:
        print(f"{b:>5} {name:>18} {a:>8.1f} {t:>13.1f} {s:>7.2f}x")
    print(f"memory read bandwidth {results['memory_read_gbs']} GB/s; batch-1 roofline of the best set-up "
          f"{results['batch1_roofline_tok_s']} tok/s")
    results["command"] = " ".join(["python"] + sys.argv)
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
