"""What the command parsers share: the parser class (one-line errors) and the flags several commands take."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16", "int8", "int4"]


def model_flags(p, dtype="auto"):
    p.add_argument("--model", default="default", help="model folder, .gguf file, adapter folder, or 'default' "
                   "(SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=dtype, choices=DTYPE_CHOICES,
                   help=f"weights (default {dtype}): auto (the fastest format that keeps the model's quality, timed "
                   "once on this machine and cached; see `llmkit info`), float32, bfloat16, float16, int8, int4")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def sampling_flags(p):
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 means greedy (default: 0 for generate, "
                   "the model's generation_config or 0.7 for chat)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top token)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF-style repetition penalty (> 1 fewer repeats)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--compile", action="store_true", help="compile decode steps with torch.compile: faster "
                   "tokens after a compile at the first step (30-60 s on a 2-core CPU)")
    p.add_argument("--guard", default=None, metavar="POLICY.yaml", help="check the input and guard the output "
                   "with this policy (PII, block lists, classifier; see docs/guide/guard.md)")
    kv_flag(p)


def kv_flag(p):
    p.add_argument("--kv-cache-mb", type=float, default=None, help="bound on the KV cache in MB (default: a fifth "
                   "of the free memory)")
    p.add_argument("--batch-invariant", action="store_true", help="each request gets exactly the tokens it would "
                   "get alone, whatever runs beside it (each row its own forward; slower when batched)")


CLEAN_FLAGS = ("dedup", "near_threshold", "shingle", "num_perm", "min_chars", "quality", "lang", "lang_threshold",
               "pii")


def add_clean_flags(c, with_io: bool):
    """The cleaning flags, shared by `data clean` and pretrain/finetune --clean."""
    if with_io:
        c.add_argument("inputs", nargs="+", help=".txt/.jsonl/.json/.csv/.tsv/.parquet files")
        c.add_argument("--out", required=True, help="output file (.txt one document per line, or .jsonl)")
        c.add_argument("--report", default=None, help="write the report JSON here")
        c.add_argument("--text-field", default="text", help="field/column holding the text")
        c.add_argument("--unit", choices=["line", "doc"], default="line", help=".txt: one document per line "
                       "(default) or per blank-line-separated block")
    c.add_argument("--dedup", default="exact,near", help="comma list of exact, near (MinHash LSH) or none")
    c.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity for near duplicates")
    c.add_argument("--shingle", type=int, default=5, help="word n-gram size of the MinHash shingles")
    c.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    c.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    c.add_argument("--quality", choices=["gopher", "c4", "both", "none"], default="none",
                   help="quality rules to apply (Gopher and/or C4)")
    c.add_argument("--lang", default=None, help="keep only these languages (comma list of ISO 639-1, e.g. en)")
    c.add_argument("--lang-threshold", type=float, default=0.5, help="keep a document when one of --lang has at "
                   "least this probability (py3langid, normalised)")
    c.add_argument("--pii", choices=["redact", "mask", "hash", "none"], default="none", help="PII in documents")
