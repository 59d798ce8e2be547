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
                ppl_chars=args.ppl_chars, context=args.ppl_context, decode_tokens=args.decode_tokens,
                progress=getattr(args, "progress", True))


def register(sub):
    p = sub.add_parser("compare", help="the compression report table (size, sparsity, RSS, speed, perplexity, "
                       "HellaSwag) for model folders")
    p.add_argument("models", nargs="+", help="model folders, .gguf files or 'default'")
    p.add_argument("--out", help="also write compress_report.json and compress_report.md into this folder")
    report_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=cmd_compare)
    add_prune(sub)


def _common(p):
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the before/after report (it loads and evaluates both models)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


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


# ---------------------------------------------------------------------------------------------------------------
# prune


def add_prune(sub):
    p = sub.add_parser("prune", help="sparsify (magnitude, Wanda, SparseGPT; unstructured or N:M) or shrink "
                       "(structured heads/mlp/layers) a model, with a before/after report")
    a = p.add_argument
    a("--model", default="default", help="model folder, .gguf file or 'default'")
    a("--out", required=True, help="output model folder (with prune_config.json and compress_report.*)")
    a("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt", "structured"],
      help="magnitude (no data), wanda / sparsegpt (calibration text), structured (smaller config)")
    a("--sparsity", type=float, help="share of weights set to zero, in (0, 1); implied by an N:M --pattern")
    a("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8 (N kept of every M)")
    a("--target", default="mlp", help="structured: comma-separated heads (whole GQA groups), mlp, layers")
    a("--ratio", type=float, default=0.25, help="structured: share of heads / channels / layers removed")
    a("--calib-data", help="calibration text file (wanda, sparsegpt, structured, --recover)")
    a("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    a("--calib-seq-len", type=int, default=128, help="tokens per calibration sample (default 128)")
    a("--recover", type=int, default=0, metavar="STEPS",
      help="then fine-tune all weights for STEPS steps on --calib-data (pruned weights stay zero)")
    a("--recover-lr", type=float, default=5e-5, help="recovery learning rate (default 5e-5)")
    a("--recover-batch-size", type=int, default=4, help="recovery batch size (default 4)")
    _common(p)
    report_flags(p)
    p.set_defaults(handler=cmd_prune)


def cmd_prune(args):
    from llmkit.prune import PruneConfig, prune_model

    pc = PruneConfig(model=args.model, out=args.out, method=args.method, sparsity=args.sparsity,
                     pattern=args.pattern, target=args.target, ratio=args.ratio, calib_data=args.calib_data,
                     calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, recover=args.recover,
                     recover_lr=args.recover_lr, recover_batch_size=args.recover_batch_size, seed=args.seed,
                     device=args.device, progress=args.progress, report=args.report,
                     report_kwargs=report_kwargs(args))
    prune_model(pc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
