"""Load test for `llmkit serve`: 1, 4 and 16 concurrent streaming clients on loopback.

Starts the server as a subprocess on a free loopback port, then for each concurrency level runs that many clients,
each sending a bounded number of streaming chat requests from a fixed prompt set (128 new tokens each, greedy,
ignore_eos so every request generates exactly that many). Reports time to first token (p50/p99), inter-token latency
(p50/p99 of the gaps between streamed tokens), requests/s and aggregate generated tokens/s per level, and
speedup_16_vs_1 (aggregate tokens/s at 16 clients over 1 client).

Shared system prompt: a ~1,000-token system prompt the server has not seen (cold: prefilled in full) against the same
system prompt with another question (repeated: its blocks come from the prefix cache), alternating, --prefix-trials
each; reported as median TTFTs and their ratio (target <= 0.2, cold <= 1 s on a quiet machine).
Memory: the server's RSS when idle before the load, after all levels, and after the shared-prefix case.
Writes benchmarks/results/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py                 # the default model, levels 1 4 16
    .venv/bin/python benchmarks/serve_load.py --levels 1 4 --requests-per-client 1 --max-tokens 16   # quick check
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the seasons on Earth?",
    "Give me a recipe for pancakes.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "List some tips for learning a new language.",
    "What does a compiler do?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": msgs, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    arrivals = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                first = first or arrivals[-1]
    end = time.perf_counter()
    first = first or end
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": first - t0, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "gaps": gaps}


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def system_prompt(k: int, tok_target: int = 1000) -> str:
    """A ~tok_target-token system prompt; k makes its very first words differ, so nothing of it is cached yet."""
    rules = [f"Rule {i}: answer politely, cite the handbook section {i}.{k}, and keep replies under {i + 20} words."
             for i in range(1, 400)]
    words = f"Session {k} ({k * 7919 % 10007}). You are a helpful assistant for the Example Company. " + " ".join(rules)
    return " ".join(words.split()[:int(tok_target * 0.5)])


async def shared_prefix(base: str, model: str, trials: int) -> dict:
    """Cold TTFT (a new ~1,000-token system prompt) against repeated (the same one, another question)."""
    url = base + "/v1/chat/completions"
    cold, warm = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for k in range(trials):
            sp = system_prompt(1000 + k)
            cold.append((await one_request(client, url, model, "What is rule 3?", 4, sp))["ttft"])
            warm.append((await one_request(client, url, model, "Summarize rule 12.", 4, sp))["ttft"])
    c, w = pct(cold, 50), pct(warm, 50)
    return {"trials": trials, "cold_ttft_s": [round(x, 4) for x in cold],
            "repeated_ttft_s": [round(x, 4) for x in warm],
            "cold_ttft_p50_s": round(c, 4), "repeated_ttft_p50_s": round(w, 4), "repeated_over_cold": round(w / c, 3)}


async def run_level(base: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    url = base + "/v1/chat/completions"
    results = []

    async def client_loop(k: int, client: httpx.AsyncClient):
        for j in range(per_client):
            prompt = PROMPTS[(k * per_client + j) % len(PROMPTS)]
            results.append(await one_request(client, url, model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
        wall = time.perf_counter() - t0
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
    gaps = [g for r in results for g in r["gaps"]] or [0.0]
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3),
            "ttft_p50_s": round(pct(ttft, 50), 4), "ttft_p99_s": round(pct(ttft, 99), 4),
            "itl_p50_s": round(pct(gaps, 50), 5), "itl_p99_s": round(pct(gaps, 99), 5),
            "tpot_mean_s": round(sum(tpot) / len(tpot), 5), "tpot_p50_s": round(pct(tpot, 50), 5),
            "requests_per_s": round(len(results) / wall, 3), "generated_tokens": total,
            "tokens_per_s": round(total / wall, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model to serve (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    ap.add_argument("--requests-per-client", type=int, default=2, help="sequential requests each client sends")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch")
    ap.add_argument("--prefix-trials", type=int, default=3, help="cold/repeated pairs in the shared-prompt case "
                    "(0 skips it)")
    ap.add_argument("--kv-cache-mb", type=float, default=None, help="server --kv-cache-mb")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", f"bench={args.model}", "--port", str(port),
           "--max-batch", str(args.max_batch)] + (["--kv-cache-mb", str(args.kv_cache_mb)] if args.kv_cache_mb else [])
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while True:  # /health is 503 while the model loads
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() - t0 > 300:
                raise SystemExit("server did not become ready in 300 s")
            time.sleep(0.25)
        print(f"server ready in {time.time() - t0:.1f} s", file=sys.stderr)
        asyncio.run(run_level(base, "bench", 1, 1, 8))  # warm-up
        memory = {"rss_mb_idle_before": rss_mb(server.pid)}
        levels = []
        for c in args.levels:
            r = asyncio.run(run_level(base, "bench", c, args.requests_per_client, args.max_tokens))
            levels.append(r)
            print(json.dumps(r), file=sys.stderr)
        memory["rss_mb_after_levels"] = rss_mb(server.pid)
        prefix = None
        if args.prefix_trials:
            prefix = asyncio.run(shared_prefix(base, "bench", args.prefix_trials))
            print(json.dumps(prefix), file=sys.stderr)
            memory["rss_mb_after_shared_prefix"] = rss_mb(server.pid)
        metrics = httpx.get(base + "/metrics", timeout=10).text
        memory.update({line.split("{")[0].replace("llmkit_", ""): int(float(line.split()[-1]))
                       for line in metrics.splitlines() if line.startswith("llmkit_kv_cache_blocks")})
    finally:
        server.terminate()
        server.wait(timeout=30)

    by = {r["clients"]: r for r in levels}
    hi = max(by)
    out = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
        "max_batch": args.max_batch, "levels": levels, "shared_system_prompt": prefix, "memory": memory,
        f"speedup_{hi}_vs_1": round(by[hi]["tokens_per_s"] / by[1]["tokens_per_s"], 2) if 1 in by else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_after": round(os.getloadavg()[0], 2)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in out.items() if k != "levels"}, indent=2))


if __name__ == "__main__":
    main()
