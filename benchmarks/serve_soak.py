"""Soak test for `llmkit serve`: 64 concurrent streaming clients with random parameters and random cancellations.

Starts the server as a subprocess on a free loopback port (default model, --max-batch 16), then runs --clients
clients for --minutes. Each client loops: a streaming chat request with random sampling parameters (temperature,
top_p, seed), and at random JSON mode (json_object or a json_schema), stop strings, logprobs with top_logprobs,
n = 2, include_usage; about --cancel-rate of the streams are dropped after a random number of chunks. Every
request is valid, so any non-200 status, error event, missing [DONE] or finish_reason, unparsable JSON-mode output,
stop string in the output or missing logprobs counts as an error. After the run every cancelled request must have
left the scheduler (running and waiting both 0 on /metrics within 30 s), and the server's RSS must be within 10% of
its RSS after the warm-up (--warmup-s). Prints and saves p50/p99 time to first token and inter-token latency
(between consecutive content chunks of one choice) to benchmarks/results/serve_soak.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_soak.py            # 10 min
    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_soak.py --minutes 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Explain how a bicycle works.", "Write a haiku about the sea.", "List three fruits.",
           "What is the capital of France?", "Describe a cat in one sentence.", "Count from one to ten.",
           "Give me a JSON object describing a book.", "Why is the sky blue?"]
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer"}, "tags": {"type": "array",
                                                                                 "items": {"type": "string"}}},
          "required": ["title", "year"], "additionalProperties": False}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def random_body(rng: random.Random, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
            "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.7, 1.0]), "top_p": rng.choice([1, 0.9]),
            "seed": rng.randrange(2**31), "stream_options": {"include_usage": rng.random() < 0.5}}
    kind = rng.random()
    if kind < 0.15:
        body["response_format"] = {"type": "json_object"}
    elif kind < 0.3:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}
        body["max_tokens"] = rng.randint(24, 64)  # room for the shortest valid answer (else a 400, rightly)
    elif kind < 0.5:
        body["stop"] = rng.sample([".", "\n", " the", ","], rng.randint(1, 2))
    if rng.random() < 0.25:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
    if rng.random() < 0.2:
        body["n"] = 2
    return body


def validate(body: dict, texts: dict, reasons: dict, logprob_chunks: int) -> str | None:
    """Why this finished (uncancelled) stream is wrong, or None."""
    n = body.get("n", 1)
    if sorted(reasons) != list(range(n)) or any(r not in ("stop", "length") for r in reasons.values()):
        return f"finish reasons {reasons}"
    fmt = (body.get("response_format") or {}).get("type")
    for i in range(n):
        text = texts.get(i, "")
        if fmt:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return f"JSON mode output does not parse: {text!r}"
            if fmt == "json_schema" and not (isinstance(obj, dict) and {"title", "year"} <= set(obj)):
                return f"json_schema output misses required keys: {text!r}"
        for s in body.get("stop", []):
            if s in text:
                return f"stop string {s!r} in output {text!r}"
    if body.get("logprobs") and logprob_chunks == 0:
        return "logprobs asked for but none sent"
    return None


async def one_request(client, url, body, rng, cancel_rate, stats) -> None:
    cancel_after = rng.randint(1, 20) if rng.random() < cancel_rate else None
    t0 = time.perf_counter()
    texts, reasons, last, first, chunks, lp = {}, {}, {}, None, 0, 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    stats["errors"].append(f"error event: {ev['error']['message']}")
                    return
                now = time.perf_counter()
                for c in ev.get("choices", []):
                    piece = c["delta"].get("content")
                    if piece:
                        i = c["index"]
                        if first is None:
                            first = now - t0
                        if i in last:
                            stats["itl"].append(now - last[i])
                        last[i] = now
                        texts[i] = texts.get(i, "") + piece
                    if c.get("logprobs"):
                        lp += 1
                    if c.get("finish_reason"):
                        reasons[c["index"]] = c["finish_reason"]
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    stats["cancelled"] += 1
                    return  # leaving the block closes the connection mid-stream
            if not done:
                stats["errors"].append("stream ended without [DONE]")
                return
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    if first is not None:
        stats["ttft"].append(first)
    problem = validate(body, texts, reasons, lp)
    if problem:
        stats["errors"].append(problem)
    stats["completed"] += 1


async def client_loop(i, url, model, deadline, cancel_rate, stats, seed):
    rng = random.Random(seed * 1000 + i)
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        while time.time() < deadline:
            await one_request(client, url, random_body(rng, model), rng, cancel_rate, stats)


async def scheduler_idle(base: str, timeout: float = 30) -> dict:
    """Poll /metrics until no request is running or waiting; returns the last values."""
    pat = re.compile(r'^llmkit:num_requests_(running|waiting)\{[^}]*\} (\S+)$', re.M)
    end = time.time() + timeout
    async with httpx.AsyncClient(timeout=10) as c:
        while True:
            vals = {k: float(v) for k, v in pat.findall((await c.get(base + "/metrics")).text)}
            if (vals.get("running", 1) == 0 and vals.get("waiting", 1) == 0) or time.time() > end:
                return vals
            await asyncio.sleep(0.5)


def kv_blocks(base: str) -> dict:
    """The server's KV pool: blocks reserved by running rows, cached prefixes and in total (from /metrics)."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("llmkit:kv_cache_blocks{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            out[state] = float(line.rsplit(" ", 1)[1])
    return out


async def run(args, base: str, pid: int) -> dict:
    url = base + "/v1/chat/completions"
    warm = {"ttft": [], "itl": [], "errors": [], "cancelled": 0, "completed": 0}
    await asyncio.gather(*(client_loop(i, url, "default", time.time() + args.warmup_s, args.cancel_rate, warm,
                                       args.seed + 1) for i in range(args.clients)))
    await scheduler_idle(base)
    rss_warm, kv_warm = rss_mb(pid), kv_blocks(base)
    stats = {"ttft": [], "itl": [], "errors": [], "cancelled": 0, "completed": 0}
    t0 = time.time()
    await asyncio.gather(*(client_loop(i, url, "default", t0 + args.minutes * 60, args.cancel_rate, stats,
                                       args.seed) for i in range(args.clients)))
    wall = time.time() - t0
    idle = await scheduler_idle(base)
    rss_end, kv_end = rss_mb(pid), kv_blocks(base)
    r3 = lambda x: None if x is None else round(x, 4)
    return {
        "wall_s": round(wall, 1), "requests_completed": stats["completed"], "requests_cancelled": stats["cancelled"],
        "errors": len(stats["errors"]) + len(warm["errors"]), "error_samples": (warm["errors"] + stats["errors"])[:10],
        "slots_freed": idle.get("running") == 0 and idle.get("waiting") == 0, "after_run": idle,
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_after_run_mb": round(rss_end, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4),
        "kv_blocks_after_warmup": kv_warm, "kv_blocks_after_run": kv_end,
        "ttft_p50_s": r3(pct(stats["ttft"], 50)), "ttft_p99_s": r3(pct(stats["ttft"], 99)),
        "itl_p50_s": r3(pct(stats["itl"], 50)), "itl_p99_s": r3(pct(stats["itl"], 99)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--cancel-rate", type=float, default=0.2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="default", help="what `llmkit serve --model` serves")
    ap.add_argument("--kv-cache-mb", type=float, default=None, help="server --kv-cache-mb: the KV pool, prefix cache "
                    "included, grows up to this (default: the server's, a fifth of free memory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_soak.json"))
    args = ap.parse_args()
    from llmkit.utils.io import write_results

    port = free_port()
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", f"default={args.model}", "--port", str(port),
           "--max-batch", str(args.max_batch),
           "--max-queue", str(4 * args.clients)]
    if args.kv_cache_mb is not None:
        cmd += ["--kv-cache-mb", str(args.kv_cache_mb)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not come up")
            time.sleep(0.5)
        result = asyncio.run(run(args, base, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {"command": "python benchmarks/serve_soak.py " + " ".join(sys.argv[1:]), "model": args.model,
           "clients": args.clients, "minutes": args.minutes, "warmup_s": args.warmup_s,
           "cancel_rate": args.cancel_rate, "max_batch": args.max_batch,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **result,
           "passed": result["errors"] == 0 and result["slots_freed"] and abs(result["rss_growth"]) <= 0.10,
           "note": "loopback, one CPU machine shared with other jobs (loaded): latencies are not a speed figure"}
    write_results(args.out, out)
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
