"""Per-token cost of grammar-constrained decoding: xgrammar vs llguidance vs outlines-core on the default model's vocab.

For each library: build its tokenizer view of the default model's 49,152-token vocabulary, compile a JSON schema
(and plain JSON for json_object), then walk a valid answer token by token, computing the allowed-token mask before
each token and advancing the matcher with it. Reports the compile time and the mean/p50/p99 per-token time (mask +
advance), best of --repeats walks. Writes benchmarks/results/grammar_mask.json.

    pip install '.[bench]'   # xgrammar and outlines-core, to compare against
    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/grammar_mask.py
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["street", "city"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "role", "active"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
          "address": {"street": "12 St James's Square", "city": "London"}, "role": "admin", "active": True}


def raw_vocab(tok) -> list[bytes]:
    """Each token's bytes (byte-level BPE spelling undone); special tokens as their text."""
    from llmkit.model.tokenizer import bytes_to_unicode

    inv = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    out = []
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i) or ""
        out.append(s.encode() if i in special or any(c not in inv for c in s) else bytes(inv[c] for c in s))
    return out


def walk(step, tokens: list[int]) -> list[float]:
    times = []
    for t in tokens:
        t0 = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - t0)
    return times


def bench_llguidance(tok, schema, tokens, eos, repeats):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.hf.to_str(), n_vocab=tok.vocab_size, eos_token=eos)
    t_tok = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    best = None
    compile_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, grammar)
        compile_s.append(time.perf_counter() - t0)
        mask = lt.allocate_token_bitmask(1, tok.vocab_size)

        def step(t):
            lt.fill_next_token_bitmask(m, mask)
            assert (mask[0, t // 32] >> (t % 32)) & 1, "answer token not allowed"
            assert m.consume_token(t), m.get_error()
        times = walk(step, tokens)
        best = times if best is None or sum(times) < sum(best) else best
    return t_tok, min(compile_s), best


def bench_xgrammar(tok, schema, tokens, eos, repeats, vocab):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t_tok = time.perf_counter() - t0
    best, compile_s = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=(",", ":"))
        m = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - t0)
        mask = xgr.allocate_token_bitmask(1, tok.vocab_size)

        def step(t):
            m.fill_next_token_bitmask(mask)
            assert (mask[0, t // 32] >> (t % 32)) & 1, "answer token not allowed"
            assert m.accept_token(t)
        times = walk(step, tokens)
        best = times if best is None or sum(times) < sum(best) else best
    return t_tok, min(compile_s), best


def bench_outlines(tok, schema, tokens, eos, repeats, vocab):
    import outlines_core as oc

    t0 = time.perf_counter()
    words: dict[bytes, list[int]] = {}
    special = set(tok.all_special_ids)
    for i, b in enumerate(vocab):
        if i not in special:
            words.setdefault(b, []).append(i)
    voc = oc.Vocabulary(eos[0], words)
    t_tok = time.perf_counter() - t0
    regex = oc.json_schema.build_regex_from_schema(json.dumps(schema))
    best, compile_s = None, []
    for _ in range(max(1, repeats // 2)):  # index construction is the slow part: fewer repeats
        t0 = time.perf_counter()
        index = oc.Index(regex, voc)
        compile_s.append(time.perf_counter() - t0)
        g = oc.Guide(index)
        mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)

        def step(t):
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            assert (mask[t // 32] >> (t % 32)) & 1, "answer token not allowed"
            if t != eos[0]:  # the guide is finished once EOS is allowed: nothing to advance
                g.advance(t)
        times = walk(step, tokens)
        best = times if best is None or sum(times) < sum(best) else best
    return t_tok, min(compile_s), best


def summary(t_tok, compile_s, times) -> dict:
    ms = sorted(x * 1e3 for x in times)
    return {"tokenizer_setup_s": round(t_tok, 3), "compile_s": round(compile_s, 4),
            "per_token_mean_ms": round(statistics.mean(ms), 4), "per_token_p50_ms": round(ms[len(ms) // 2], 4),
            "per_token_p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/grammar_mask.json"))
    args = ap.parse_args()
    from llmkit.model.checkpoint import load_model
    from llmkit.utils.io import write_results

    tok = load_model("default").tokenizer
    text = json.dumps(ANSWER, separators=(",", ":"))
    eos = tok.chat_stop_ids()
    tokens = tok.encode(text, add_special_tokens=False) + [eos[0]]
    vocab = raw_vocab(tok)
    results = {}
    for name, fn in (("llguidance", lambda: bench_llguidance(tok, SCHEMA, tokens, eos, args.repeats)),
                     ("xgrammar", lambda: bench_xgrammar(tok, SCHEMA, tokens, eos, args.repeats, vocab)),
                     ("outlines_core", lambda: bench_outlines(tok, SCHEMA, tokens, eos, args.repeats, vocab))):
        try:
            results[name] = summary(*fn())
        except Exception as e:  # a library that cannot do it is a result too
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(results[name]), flush=True)
    ok = {k: v for k, v in results.items() if "error" not in v}
    pick = min(ok, key=lambda k: ok[k]["per_token_mean_ms"] + ok[k]["compile_s"] * 1e3 / len(tokens))
    out = {"command": "python benchmarks/grammar_mask.py " + " ".join(sys.argv[1:]), "vocab_size": tok.vocab_size,
           "answer_tokens": len(tokens), "schema": SCHEMA, "libraries": results,
           "fastest_per_request": pick,
           "used_by_llmkit": "llguidance",
           "why": "llguidance and xgrammar cost about the same per token (tens of microseconds, <0.1% of a decode "
                  "step); llguidance compiles lazily in under 1 ms, needs no transformers tokenizer, and can copy a "
                  "matcher and test tokens without committing them (the max_tokens closing check needs that); "
                  "outlines-core builds a full index per schema (~0.2 s) and masks ~30x slower",
           "note": "per-token = compute the allowed-token bitmask + advance the matcher; machine shared with other "
                   "jobs (loaded), so compare the libraries within this run",
           "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    for k, v in ok.items():
        out[f"{k}_vs_fastest_per_token"] = round(v["per_token_mean_ms"] / ok[pick]["per_token_mean_ms"], 2)
    write_results(args.out, out)
    print("picked (compile + mask per request):", pick)


if __name__ == "__main__":
    main()
