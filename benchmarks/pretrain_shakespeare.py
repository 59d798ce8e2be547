"""Character-level Tiny Shakespeare, nanoGPT's CPU configuration; writes benchmarks/results/pretrain_shakespeare.json.

nanoGPT (config/train_shakespeare_char.py, CPU variant): 4 layers, 4 heads, 128 wide, context 64, batch 12,
2,000 iterations, lr 1e-3 -> 1e-4 cosine, warmup 100, dropout 0, beta2 0.99; about 100 s on the 2-core CI machine,
validation loss 1.886. Target here: validation loss <= 1.88 in <= 70 s.

    python benchmarks/pretrain_shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.model.checkpoint import load_model  # noqa: E402
from llmkit.utils.io import write_results  # noqa: E402
from llmkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from llmkit.train.loop import TrainConfig  # noqa: E402


def matmul_peak(n: int = 1024, reps: int = 30) -> float:
    """The machine's float32 matmul throughput (FLOP/s, best of several runs) on all threads torch uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    ap.add_argument("--model-config", default="llama-tiny", help="preset whose family (block layout) is used")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sample-tokens", type=int, default=200, help="greedy sample length at each evaluation")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "pretrain_shakespeare.json"))
    args = ap.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data} not found: pass --data path/to/tinyshakespeare.txt")
    out = args.out or tempfile.mkdtemp(prefix="llmkit-shakespeare-")

    peak = matmul_peak()
    tc = TrainConfig(max_steps=args.max_steps, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                     grad_clip=1.0, eval_every=250, eval_steps=20, log_every=100, seed=1337, compile=args.compile,
                     progress=sys.stderr.isatty())
    pc = PretrainConfig(data=[args.data], out=out, model_config=args.model_config, char=True, val_fraction=0.1,
                        block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                        sample_tokens=args.sample_tokens, train=tc)
    t0 = time.time()
    res = pretrain(pc)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_time = rows[-1]["time"]  # the loop only: tokenizer training, tokenizing and saving excluded
    cfg = json.loads((Path(out) / "config.json").read_text())["llmkit"]
    n_params = sum(p.numel() for p in load_model(out).model.parameters())
    L, C, T = cfg["n_layer"], cfg["n_embd"], 64
    flops_per_token = 6 * n_params + 12 * L * C * T  # PaLM appendix B, as nanoGPT's estimate_mfu
    tok_s = res["tokens"] / train_time
    # validation is estimated on 20 batches every 250 steps, as nanoGPT's CPU run does (--eval_iters=20)
    hit = next((r for r in rows if r.get("val_loss", 9e9) <= 1.88), None)
    result = {
        "name": "pretrain_shakespeare",
        "val_loss": round(res["val_loss"], 4),
        "target_val_loss": 1.88,
        "train_seconds": round(train_time, 1),
        "wall_seconds": round(wall, 1),
        "target_seconds": 70,
        "step_at_target": hit and hit["step"],
        "seconds_to_target": hit and hit["time"],
        "val_curve": [[r["step"], r["time"], r["val_loss"]] for r in rows if "val_loss" in r],
        "steps": res["step"],
        "tokens": res["tokens"],
        "tokens_per_s": round(tok_s),
        "params": n_params,
        "model": {k: cfg[k] for k in ("family", "n_layer", "n_head", "n_embd", "intermediate_size", "mlp", "norm",
                                      "position", "tie_word_embeddings")},
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu": round(flops_per_token * tok_s / peak, 4),
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "nanogpt_reference": {"val_loss": 1.886, "seconds": 100},
        "sample": next((r["sample"] for r in reversed(rows) if "sample" in r), None),
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "python benchmarks/pretrain_shakespeare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    write_results(args.result, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
