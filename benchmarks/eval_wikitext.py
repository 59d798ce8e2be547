"""WikiText-2 perplexity of the default model: llmkit's `eval perplexity` against lm-eval's rolling log-likelihood.

Both score the same text (../shared/data/wikitext-2/test.txt, or its first --limit lines) with the same float32
weights in disjoint windows of --context tokens: llmkit through `evaluate_perplexity`, lm-eval through its HF
backend's `loglikelihood_rolling` (HFLM, batch 8, max_length = --context) on a transformers export of the same
model. Word/byte perplexity and bits per byte use lm-eval's wikitext formulas (words = len(re.split(r"\\s+", text)),
bytes = UTF-8 length). Writes benchmarks/results/eval_wikitext.json.

    .venv/bin/python benchmarks/eval_wikitext.py [--limit LINES] [--context 1024] [--no-baseline]
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lm-eval must never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=None, help="first N lines of the file (default: all)")
    ap.add_argument("--context", type=int, default=1024, help="window length in tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true", help="skip lm-eval")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_wikitext.json"))
    args = ap.parse_args()

    from llmkit.eval import evaluate
    from llmkit.utils.io import read_utf8, write_results
    from llmkit.model.checkpoint import export_hf, load_model

    load_before = load_avg()
    lm = load_model("default", dtype="float32")
    text = read_utf8(args.data)
    if args.limit:
        text = "".join(text.splitlines(keepends=True)[: args.limit])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.txt"
        data.write_text(text, encoding="utf-8")
        ours = evaluate.evaluate_perplexity(lm, data, context=args.context, batch_size=args.batch_size)
        keys = ["n_tokens", "n_words", "n_bytes", "loglikelihood", "token_perplexity", "word_perplexity",
                "byte_perplexity", "bits_per_byte", "mean_token_entropy", "mean_top1_prob", "seconds"]
        result = {
            "benchmark": f"wikitext-2 test.txt{f' (first {args.limit} lines)' if args.limit else ''}, "
                         f"disjoint windows of {args.context} tokens",
            "model": "SmolLM2-135M-Instruct (default, Q4_1 GGUF dequantized, float32)",
            "command": "python benchmarks/eval_wikitext.py" + (f" --limit {args.limit}" if args.limit else "")
                       + (f" --context {args.context}" if args.context != 1024 else "")
                       + (" --no-baseline" if args.no_baseline else ""),
            "torch_threads": torch.get_num_threads(), "load_before": load_before,
            "llmkit": {k: ours[k] for k in keys},
        }
        print(f"llmkit: bits/byte {ours['bits_per_byte']:.5f} word ppl {ours['word_perplexity']:.3f} "
              f"({ours['seconds']:.1f} s)", file=sys.stderr)
        if not args.no_baseline:
            from lm_eval.api.instance import Instance
            from lm_eval.models.huggingface import HFLM

            hf_dir = export_hf(lm, Path(tmp) / "hf")
            hflm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu",
                        max_length=args.context)
            t0 = time.perf_counter()
            (ll,) = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
            seconds = time.perf_counter() - t0
            n_bytes, words = ours["n_bytes"], ours["n_words"]
            bpb = -ll / n_bytes / math.log(2)
            result["lm_eval"] = {"loglikelihood": ll, "bits_per_byte": bpb, "word_perplexity": math.exp(-ll / words),
                                 "byte_perplexity": math.exp(-ll / n_bytes), "seconds": seconds,
                                 "backend": "hf, float32, cpu, batch 8"}
            result["bits_per_byte_rel_diff"] = abs(ours["bits_per_byte"] - bpb) / bpb
            result["speedup"] = seconds / ours["seconds"]
            print(f"lm-eval: bits/byte {bpb:.5f} ({seconds:.1f} s); relative difference "
                  f"{result['bits_per_byte_rel_diff']:.2e}", file=sys.stderr)
    result["load_after"] = load_avg()
    write_results(args.out, result)
    import json

    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
