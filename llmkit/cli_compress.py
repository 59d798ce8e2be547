"""`llmkit compare`, `llmkit prune`, `llmkit distill`: model compression with one before/after report."""
from __future__ import annotations

import sys


def report_flags(p):
    """Flags of the before/after report (compress_report.measure), shared by compare, prune, distill, quantize."""
    a = p.add_argument
    a("--eval-limit", type=int, default=100, help="HellaSwag items scored (default 100)")
    a("--ppl-chars", type=int, default=100_000, help="characters of WikiText-2 test scored (default 100,000)")
    a("--ppl-context", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    a("--wikitext", help="perplexity text (default: shared WikiText-2 test, else the tests/data excerpt)")
    a("--hellaswag", help="HellaSwag-style {query, choices, label} JSONL (default: the shared 1,000-item sample)")
    a("--decode-tokens", type=int, default=64, help="tokens decoded to time the decode rate (default 64)")


def report_kwargs(args) -> dict:
    """measure() keyword arguments from report_flags."""
    for name in ("eval_limit", "ppl_chars", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ppl_context < 2:
        raise ValueError(f"--ppl-context must be >= 2, got {args.ppl_context}")
    return dict(wikitext=args.wikitext, hellaswag=args.hellaswag, eval_limit=args.eval_limit,
                ppl_chars=args.ppl_chars, context=args.ppl_context, decode_tokens=args.decode_tokens)


def register(sub):
    p = sub.add_parser("compare", help="the compression report table (size, sparsity, RSS, speed, perplexity, "
                       "HellaSwag) for model folders")
    p.add_argument("models", nargs="+", help="model folders, .gguf files or 'default'")
    p.add_argument("--out", help="also write compress_report.json and compress_report.md into this folder")
    report_flags(p)
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args):
    from pathlib import Path

    from llmkit import compress_report as cr

    kw = report_kwargs(args)
    for m in args.models:  # every path checked before minutes of measuring
        if m != "default" and not Path(m).exists():
            raise FileNotFoundError(f"model not found: {m}")
    rows = []
    for m in args.models:
        print(f"measuring {m} ...", file=sys.stderr)
        rows.append(cr.measure(m, **kw))
    print(cr.render(rows))
    if args.out:
        print(f"wrote {cr.write_report(args.out, rows)}", file=sys.stderr)
    return 0
