"""Decode speed of the default model: llmkit in each weight format against llama.cpp on the same GGUF and prompt.

Set-ups: llmkit int4 (the shipped Q4_1 blocks loaded as they are, embedding/head Q8_0 -> int8), float32 and bfloat16
(the same weights dequantized), and llama.cpp (prebuilt v0.5.0 CPU binaries through node-llama-cpp, see
../shared/tools/llamacpp-bench; skipped with a note when it is not installed). Prompt: the chat-templated "Write a
short story about a robot who learns to paint." (42 tokens), greedy, EOS ignored, --new-tokens new tokens, batch 1.
Decode tokens/s = tokens after the first / time after the first token (llama.cpp's bench reports the same).
Rounds alternate between set-ups and each keeps its best of --repeats, because a shared machine's speed drifts.

Per set-up also: peak RSS and time from process start to the first token of a fresh `llmkit chat` process (warm
disk caches; llama.cpp: its load + prefill), and for llmkit's fastest set-up the batch-16 aggregate decode rate.
When a target is missed the JSON carries a profile of one decode step (time per op kind) and bytes of weights read
per token against the measured memory bandwidth. Writes benchmarks/results/generate_speed.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/generate_speed.py \
        [--setups int4,float32,bfloat16] [--repeats 3] [--new-tokens 128] [--llamacpp /tmp/llamacpp-bench]
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
USER_PROMPT = "Write a short story about a robot who learns to paint."
TARGETS = {"decode_vs_llamacpp": 1.2, "chat_peak_rss_mb": 400, "start_to_first_token_s": 2.5, "batch16_vs_batch1": 6}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: summing a 512 MiB float32 tensor (far larger than any cache), best of 3."""
    x = torch.ones(2**27)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(3))
    return 2**29 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp


def find_llamacpp(arg) -> Path | None:
    for p in [arg, "/tmp/llamacpp-bench", ROOT.parent / "shared" / "tools" / "llamacpp-bench"]:
        if p and (Path(p) / "node_modules" / "node-llama-cpp").exists() and shutil.which("node"):
            return Path(p)
    return None


def llamacpp_run(folder: Path, gguf: Path, tokens: int) -> dict:
    r = subprocess.run(["node", "bench.mjs", "--model", str(gguf), "--tokens", str(tokens), "--repeats", "1",
                        "--ban-eos", "--threads", str(torch.get_num_threads())], cwd=folder, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp bench failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------------------------
# llmkit


def decode_rate(engine, ids, tokens: int, batch: int = 1) -> float:
    from llmkit.infer.engine import SamplingParams

    prompts = [ids] * batch
    first = _timed(lambda: engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)))
    whole = _timed(lambda: engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=tokens,
                                                                    ignore_eos=True)))
    return batch * (tokens - 1) / max(whole - first, 1e-9)


def chat_process(dtype: str) -> dict:
    """A fresh `llmkit chat` process answering one message: peak RSS, and process start to the first output byte."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # GNU time reports the chat process's own peak: a child forked straight from this (large) process would count
    # the pages it shared before exec in its ru_maxrss
    timer = ["/usr/bin/time", "-f", "maxrss_kb=%M"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    p = subprocess.Popen(timer + [sys.executable, "-m", "llmkit", "chat", "--dtype", dtype, "--max-new-tokens", "8",
                                  "--temperature", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdin.write((USER_PROMPT + "\n").encode())
    p.stdin.close()
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.stdout.read()
    err = p.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    kb = next((int(ln.split("=")[1]) for ln in err.splitlines() if ln.startswith("maxrss_kb=")), usage.ru_maxrss)
    return {"start_to_first_token_s": round(first, 2), "chat_peak_rss_mb": round(kb / 1024, 1),
            "exit_status": status}


def profile_step(model) -> dict:
    """ms per op kind of one batch-1 decode step (torch.profiler), the largest first."""
    from torch.profiler import ProfilerActivity, profile

    from llmkit.model.transformer import KVCache

    cache = KVCache(model.config, 1, 64, dtype=model.activation_dtype)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 42)), cache=cache, last_only=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(torch.tensor([[5]]), cache=cache)
    ops = {e.key: e.self_cpu_time_total / 5 / 1e3 for e in prof.key_averages()}
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {k: round(v, 3) for k, v in top}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.dim() < 2:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def missed_targets(results) -> list[str]:
    return [k for k, v in TARGETS.items() if results.get(k) is not None and
            (results[k] > v if k in ("chat_peak_rss_mb", "start_to_first_token_s") else results[k] < v)]


def chat_only(args):
    from llmkit.utils.io import write_results

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = json.loads(Path(args.out).read_text())
    for s, row in results["setups"].items():
        row.update(min((chat_process(s) for _ in range(2)), key=lambda r: r["start_to_first_token_s"]))
    best = results["llmkit_best_setup"]
    results["chat_peak_rss_mb"] = results["setups"][best]["chat_peak_rss_mb"]
    results["start_to_first_token_s"] = results["setups"][best]["start_to_first_token_s"]
    results["targets_missed"] = missed_targets(results)
    results["command"] += " ; python " + " ".join(sys.argv)
    write_results(args.out, results)
    print(json.dumps({k: results[k] for k in ("chat_peak_rss_mb", "start_to_first_token_s", "targets_missed")}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="int4,float32,bfloat16", help="llmkit weight formats (load_model dtypes)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="best of N alternating rounds")
    ap.add_argument("--llamacpp", default=None, help="llamacpp-bench folder with node_modules installed")
    ap.add_argument("--threads", type=int, default=None, help="threads for llmkit and llama.cpp alike (default: "
                    "torch's); 1 is fairer on a machine other jobs load (spinning thread pools stall there)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    ap.add_argument("--chat-only", action="store_true", help="re-measure only the fresh `llmkit chat` processes "
                    "(peak RSS, start to first token) and update them in the existing results JSON")
    args = ap.parse_args()
    if args.chat_only:
        return chat_only(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the `llmkit chat` processes too

    from llmkit.model.checkpoint import default_gguf_path, load_model
    from llmkit.infer.engine import Engine
    from llmkit.utils.io import write_results

    gguf = default_gguf_path()
    setups = args.setups.split(",")
    engines, ids = {}, None
    for s in setups:
        lm = load_model("default", dtype=s)
        engines[s] = Engine(lm.model, lm.tokenizer, lm.generation_config)
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": USER_PROMPT}],
                                               add_generation_prompt=True, tokenize=True)
    llamacpp = find_llamacpp(args.llamacpp)
    results = {"cpu": cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "targets": TARGETS,
               "machine_note": "shared 2-core machine loaded by other jobs during the run: compare ratios only",
               "memory_read_gbs": round(memory_bandwidth_gbs(), 2)}
    rates = {s: [] for s in setups}
    lc_runs = []
    for e in engines.values():
        decode_rate(e, ids, 4)  # warm-up
    for _ in range(args.repeats):  # alternate, so the machine's drift hits every set-up alike
        for s, e in engines.items():
            rates[s].append(decode_rate(e, ids, args.new_tokens))
        if llamacpp:
            lc_runs.append(llamacpp_run(llamacpp, gguf, args.new_tokens))
    setup_rows = {s: {"decode_tok_s": round(max(r), 2), "weight_bytes": weight_bytes(engines[s].model)}
                  for s, r in rates.items()}
    best = max(setup_rows, key=lambda s: setup_rows[s]["decode_tok_s"])
    results["llmkit_best_setup"] = best
    results["llmkit_decode_tok_s"] = setup_rows[best]["decode_tok_s"]
    if llamacpp:
        lc_best = max(lc_runs, key=lambda r: r["best_by_decode_tok_s"]["decode_tok_s"])
        lc = lc_best["best_by_decode_tok_s"]
        results["llamacpp"] = {"decode_tok_s": round(lc["decode_tok_s"], 2),
                               "peak_rss_mb": lc_best.get("peak_rss_mb_vmhwm"), "load_s": lc_best.get("load_s"),
                               "load_to_first_token_s": round(lc_best.get("load_s", 0) + lc.get("prefill_s", 0), 3),
                               "prompt_tokens": lc.get("prompt_tokens"), "version": "node-llama-cpp 3.22.1 (v0.5.0)"}
        results["decode_vs_llamacpp"] = round(results["llmkit_decode_tok_s"] / results["llamacpp"]["decode_tok_s"], 2)
    else:
        results["llamacpp"] = None
        results["llamacpp_note"] = ("llama.cpp baseline skipped: copy ../shared/tools/llamacpp-bench to /tmp and run "
                                    "`NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund` there")
    # batch 16 on the fastest set-up
    b1 = setup_rows[best]["decode_tok_s"]
    b16 = max(decode_rate(engines[best], ids, min(args.new_tokens, 64), 16) for _ in range(2))
    results["batch16_tok_s"], results["batch16_vs_batch1"] = round(b16, 2), round(b16 / b1, 2)
    del engines
    for s in setups:  # fresh processes: peak RSS and start to first token of `llmkit chat`
        setup_rows[s].update(min((chat_process(s) for _ in range(2)), key=lambda r: r["start_to_first_token_s"]))
    results["setups"] = setup_rows
    results["chat_peak_rss_mb"] = setup_rows[best]["chat_peak_rss_mb"]
    results["start_to_first_token_s"] = setup_rows[best]["start_to_first_token_s"]
    missed = missed_targets(results)
    results["targets_missed"] = missed
    if missed:
        lm = load_model("default", dtype=best)
        wb = weight_bytes(lm.model)
        results["profile"] = {"setup": best, "ms_per_op_kind_per_token": profile_step(lm.model),
                              "weight_bytes_read_per_token": wb,
                              "bandwidth_bound_tok_s": round(results["memory_read_gbs"] * 1e9 / wb, 1),
                              "measured_weight_read_gbs": round(results["llmkit_decode_tok_s"] * wb / 1e9, 2)}
    results["command"] = " ".join(["python"] + sys.argv)
    write_results(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
