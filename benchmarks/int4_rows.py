"""Cost of one decode product by row count: torch's int4 kernel (the default model's fused gate/up layer, 3,072 x 576,
bf16 inputs) against the same weights dequantized to bf16 through a dense GEMM, 1-32 rows (issue 23, "Batches").

Alternating, best of --repeats rounds of 200 calls each. Writes benchmarks/results/int4_rows.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/int4_rows.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit.model.checkpoint import load_model  # noqa: E402
from llmkit.utils.io import write_results  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32)


def per_call_ms(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int4_rows.json"))
    args = ap.parse_args()
    layer = load_model("default", dtype="int4").model.layers[0].mlp.qfused
    dense = layer.dequantize().bfloat16()
    best = {m: {"int4_ms": float("inf"), "bf16_dense_ms": float("inf")} for m in ROWS}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for m in ROWS:
                x = torch.randn(m, layer.in_features).bfloat16()
                best[m]["int4_ms"] = min(best[m]["int4_ms"], per_call_ms(lambda: layer._mm(x)))
                best[m]["bf16_dense_ms"] = min(best[m]["bf16_dense_ms"], per_call_ms(lambda: F.linear(x, dense)))
    one = best[1]["int4_ms"]
    rows = {m: {k: round(v, 4) for k, v in r.items()} | {"int4_vs_1_row": round(r["int4_ms"] / one, 2)}
            for m, r in best.items()}
    for m, r in rows.items():
        print(f"rows {m:3d}: int4 {r['int4_ms']:.3f} ms ({r['int4_vs_1_row']:.1f}x one row), "
              f"bf16 dense {r['bf16_dense_ms']:.3f} ms")
    results = {"layer": f"{layer.out_features} x {layer.in_features}", "threads": torch.get_num_threads(),
               "rows": rows, "command": " ".join(["python"] + sys.argv)}
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
