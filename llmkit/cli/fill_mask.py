"""`llmkit fill-mask`: the most likely tokens at each mask of a text, from a masked (BERT-style) language model."""
from __future__ import annotations

import json
import sys

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import model_flags

ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def add_fill_mask(sub):
    p = sub.add_parser("fill-mask", help="top-k tokens at each mask of a text, from a masked (BERT-style) model")
    p.add_argument("texts", nargs="*", help="texts with the model's mask token ([MASK] and <mask> work too); none "
                   "or '-' reads one a line from stdin")
    model_flags(p, dtype="float32")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask")
    p.add_argument("--json", action="store_true", help="one JSON object per text: text, predictions (a list per "
                   "mask of token, token_str, score, sequence: transformers' fill-mask fields)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.set_defaults(handler=cmd_fill_mask)


def cmd_fill_mask(args):
    checks.at_least(args, 1, "--top-k", "--batch-size")
    texts = []
    for t in args.texts or ["-"]:
        texts += [line for line in sys.stdin.read().splitlines() if line.strip()] if t == "-" else [t]
    if not texts:
        raise ValueError("nothing to fill: give texts with a mask as arguments or one a line on stdin")
    from llmkit.infer.fill_mask import check_masked_lm, fill_mask

    lm = common.load(args, lambda lm: check_masked_lm(lm.model, lm.tokenizer))
    for r in fill_mask(lm.model, lm.tokenizer, texts, top_k=args.top_k, batch_size=args.batch_size):
        if args.json:
            print(json.dumps(r, ensure_ascii=False), flush=True)
            continue
        print(r["text"].translate(ESCAPES))
        n = len(r["predictions"])
        for m, cands in enumerate(r["predictions"], 1):
            print(f"  mask {m} of {n}" if n > 1 else "  mask")
            width = max(len(repr(c["token_str"])) for c in cands)
            for rank, c in enumerate(cands, 1):  # tokens quoted, line breaks escaped: one row per candidate
                seq = c["sequence"].translate(ESCAPES)
                print(f"  {rank:>3}  {c['score']:.4f}  {repr(c['token_str']):<{width}}  {seq}")
    return 0
