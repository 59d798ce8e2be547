"""Decode-step cost of three KV-cache layouts on the default model (why kvcache.RowKV is contiguous per row).

- contiguous: each row's K/V contiguous (kvcache.RowKV), new tokens packed (kvcache.PackedKV), one attention per row;
- batched: one (B, n_kv_head, L, head_dim) tensor for the batch, one masked attention per layer (the old KVCache);
- paged: K/V in a pool of 16-token blocks; every layer gathers each row's blocks into a contiguous tensor (what a
  paged cache costs when the attention kernel needs contiguous K/V, as torch's CPU SDPA does), then as "batched".
Best of --repeats timed steps per case, the layouts alternating. Writes benchmarks/results/kv_layout.json.

    python benchmarks/kv_layout.py [--repeats 5]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16


def best(fns, repeats):
    """Best time of each function, run alternately (the machine's load changes over a run)."""
    out = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(repeats):
        for f, times in zip(fns, out):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return [min(t) for t in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_layout.json"))
    args = ap.parse_args()
    from llmkit.model.checkpoint import load_model
    from llmkit.utils.io import write_results
    from llmkit.model.transformer import KVCache, PackedKV, RowKV

    model = load_model("default", dtype="float32").model.eval().fuse_for_decode()
    cfg = model.config
    cases = []
    for B, L in ((1, 1000), (16, 300)):
        torch.manual_seed(0)
        rows = [RowKV(cfg, L + 8) for _ in range(B)]
        for r in rows:
            r.k.normal_(), r.v.normal_()
        cache = KVCache(cfg, B, L + 8)
        for i in range(cfg.n_layer):
            cache.k[i].normal_(), cache.v[i].normal_()
        ids = torch.randint(0, cfg.vocab_size, (B, 1))
        # uneven lengths force the masked path the real batch takes (rows joined at different times)
        lengths = [L - (j % 4) for j in range(B)]

        def contiguous():
            for r, n in zip(rows, lengths):
                r.length = n
            model(ids.view(1, B), cache=PackedKV(rows, [1] * B), head="hidden")

        def batched():
            cache.length = list(lengths)
            cache.valid[:] = True
            cache.n_tokens[:] = torch.tensor(lengths)
            model(ids, cache=cache, head="hidden")

        n_blocks = (L + 8) // BLOCK + 1
        pool = torch.randn(B * n_blocks, cfg.n_kv_head, BLOCK, cfg.head_dim)
        table = torch.randperm(B * n_blocks).view(B, n_blocks)

        def gather():  # the extra work of a paged layout: K and V of every layer gathered once per step
            for _ in range(2 * cfg.n_layer):
                pool[table].transpose(1, 2).reshape(B, cfg.n_kv_head, -1, cfg.head_dim)

        with torch.inference_mode():
            t_c, t_b, t_g = best((contiguous, batched, gather), args.repeats)
        case = {"rows": B, "context": L, "contiguous_ms": round(1e3 * t_c, 2), "batched_ms": round(1e3 * t_b, 2),
                "paged_ms": round(1e3 * (t_b + t_g), 2), "paged_gather_ms": round(1e3 * t_g, 2)}
        print(case, file=sys.stderr)
        cases.append(case)
    write_results(args.out, {"benchmark": "decode-step cost per KV layout, default model, float32",
                             "command": "python benchmarks/kv_layout.py --repeats %d" % args.repeats,
                             "cases": cases, "torch_threads": torch.get_num_threads(),
                             "loadavg_1m": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
