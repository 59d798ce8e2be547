"""What the command parsers share: the parser class (one-line errors) and the flags several commands take."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    p.add_argument("--guard", default=None, metavar="POLICY.yaml", help="check the input and guard the output "
                   "with this policy (PII, block lists, classifier; see docs/guide/guard.md)")
    kv_flag(p)


def kv_flag(p):
    p.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                   help="the compiled batch-1 decode step (about 1.8x eager on the default model, the same tokens): "
                   "auto (default, or $LLMKIT_COMPILE) uses it once built for this machine and model and otherwise "
                   "builds it in the background at low priority (about a minute, once); on builds it first; off "
                   "decodes eagerly")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="bound on the KV cache in MB (default: room "
                   "for --max-batch rows of 1,024 tokens and one whole context, said at start-up)")
    p.add_argument("--batch-invariant", action="store_true", help="each request gets exactly the tokens it would "
                   "get alone, whatever runs beside it (each row its own forward; slower when batched)")
    p.add_argument("--speculative", default=None, type=speculative_method, metavar="ngram|MODEL",
                   help="speculative decoding for greedy requests, the same tokens as without it: ngram drafts by "
                   "prompt lookup (pays on copy-heavy work: summaries, edits, code, RAG); a model folder or .gguf "
                   "(same tokenizer, e.g. a distilled student) drafts with that model; verified k a step")
    p.add_argument("--draft-tokens", default=4, type=draft_tokens, metavar="K", help="with --speculative: tokens "
                   "drafted and verified per step, 1-16 (default 4)")


def speculative_method(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("--speculative must be 'ngram' (prompt lookup) or a draft model folder or "
                                         ".gguf file")
    return value


def compile_mode(args) -> str:
    """--compile, or $LLMKIT_COMPILE when not given, else auto."""
    mode = getattr(args, "compile", None) or os.environ.get("LLMKIT_COMPILE") or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"$LLMKIT_COMPILE must be auto, on or off, got {mode!r}")
    return mode


def check_speculative(args):
    """Before anything loads: a draft model path that exists, and no --compile beside --speculative."""
    spec = getattr(args, "speculative", None)
    if spec and compile_mode(args) == "on":
        raise ValueError("--speculative and --compile exclude each other: choose one")
    if spec not in (None, "ngram", "default") and not Path(spec).exists():
        raise FileNotFoundError(f"--speculative: {spec} is neither 'ngram' nor an existing model folder or .gguf file")


def draft_tokens(value: str) -> int:
    try:
        k = int(value)
    except ValueError:
        k = 0
    if not 1 <= k <= 16:
        raise argparse.ArgumentTypeError(f"--draft-tokens must be an integer in 1..16, got {value!r}")
    return k


CLEAN_FLAGS = ("dedup", "near_threshold", "shingle", "num_perm", "min_chars", "quality", "lang", "lang_threshold",
               "pii", "executor", "tasks", "workers", "work_dir", "partition", "slurm_time", "cpus_per_task",
               "mem_per_cpu_gb")


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
    c.add_argument("--num-perm", type=int, default=256, help="MinHash permutations")
    c.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    c.add_argument("--quality", choices=["gopher", "c4", "both", "none"], default="none",
                   help="quality rules to apply (Gopher and/or C4)")
    c.add_argument("--lang", default=None, help="keep only these languages (comma list of ISO 639-1, e.g. en)")
    c.add_argument("--lang-threshold", type=float, default=0.5, help="keep a document when one of --lang has at "
                   "least this probability (py3langid, normalised)")
    c.add_argument("--pii", choices=["redact", "mask", "hash", "none"], default="none", help="PII in documents")
    c.add_argument("--executor", choices=["local", "slurm", "ray"], default="local", help="where the datatrove "
                   "pipeline runs: local processes (default), a Slurm cluster (sbatch, returns at once) or Ray")
    c.add_argument("--tasks", type=int, default=1, help="tasks per stage (input files are split among them)")
    c.add_argument("--workers", type=int, default=-1, help="tasks running at once (default: local: one per "
                   "CPU; slurm/ray: no limit)")
    c.add_argument("--work-dir", default=None, help="intermediate files: a folder or fsspec URL every node reaches "
                   "(needed for slurm and ray; default: a temporary folder beside --out)")
    c.add_argument("--partition", default=None, help="slurm: partition to submit to")
    c.add_argument("--slurm-time", default="04:00:00", help="slurm: time limit per task")
    c.add_argument("--cpus-per-task", type=int, default=1, help="slurm/ray: CPUs per task")
    c.add_argument("--mem-per-cpu-gb", type=float, default=2.0, help="slurm/ray: memory per CPU in GB")


# the report's default sizes: llmkit.compress.report's EVAL_LIMIT, PPL_CHARS, DECODE_TOKENS (a test checks they agree)
REPORT_EVAL_LIMIT, REPORT_PPL_CHARS, REPORT_DECODE_TOKENS = 20, 4_000, 32


def report_flags(p):
    """Flags of the before/after report (llmkit.compress.report.measure): quantize, prune, distill, compare."""
    a = p.add_argument
    a("--eval-limit", type=int, default=REPORT_EVAL_LIMIT, help=f"HellaSwag items scored (default "
      f"{REPORT_EVAL_LIMIT}; with the defaults a report of two rows of the default model takes about a minute on a "
      "2-core CPU)")
    a("--ppl-chars", type=int, default=REPORT_PPL_CHARS, help="characters (whole lines) of WikiText-2 test scored "
      f"(default {REPORT_PPL_CHARS:,})")
    a("--ppl-context", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    a("--wikitext", help="perplexity text (default: the 4,000-character WikiText-2 excerpt llmkit ships, "
      "llmkit/eval/data)")
    a("--hellaswag", help="HellaSwag-style {query, choices, label} JSONL (default: the 8 items llmkit ships)")
    a("--decode-tokens", type=int, default=REPORT_DECODE_TOKENS, help="tokens decoded to time the decode rate, in a "
      f"fresh process per model, fastest of 3 (default {REPORT_DECODE_TOKENS})")
    a("--no-cache", dest="report_cache", action="store_false", help="measure every model again instead of reading "
      "rows measured before from $LLMKIT_HOME/compress_report (same weights, data and settings)")


def report_kwargs(args) -> dict:
    """measure() keyword arguments from report_flags (and --no-progress)."""
    for name in ("eval_limit", "ppl_chars", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ppl_context < 2:
        raise ValueError(f"--ppl-context must be >= 2, got {args.ppl_context}")
    return dict(wikitext=args.wikitext, hellaswag=args.hellaswag, eval_limit=args.eval_limit,
                ppl_chars=args.ppl_chars, context=args.ppl_context, decode_tokens=args.decode_tokens,
                progress=getattr(args, "progress", True), use_cache=args.report_cache)
