"""`llmkit tag`: named entities (or any IOB2/IOBES tags) of texts, from a token classifier (`finetune --task tag`)."""
from __future__ import annotations

import json
import sys

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import model_flags


def add_tag(sub):
    p = sub.add_parser("tag", help="entities in texts, from a tagger (`finetune --task tag`): type, span, score")
    p.add_argument("texts", nargs="*", help="texts to tag (none, or --input, reads one a line)")
    model_flags(p, dtype="float32")
    p.add_argument("--input", help="file with one text per line ('-' reads stdin; the default without texts)")
    p.add_argument("--json", action="store_true", help="one JSON object per text: text, entities (start, end: "
                   "character offsets; type, text, score)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (words beyond are tagged O)")
    p.set_defaults(handler=cmd_tag)


def cmd_tag(args):
    from llmkit.utils.io import read_utf8

    checks.at_least(args, 1, "--batch-size", "--max-length")
    checks.input_file(args.input, "--input")
    texts = list(args.texts)
    if args.input or not texts:
        src = read_utf8(args.input) if args.input not in (None, "-") else sys.stdin.read()
        texts += [line for line in src.splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to tag: give texts as arguments, one a line on stdin, or --input FILE")
    from llmkit.infer.tag import check_tagger, tag_texts

    lm = common.load(args, check_tagger)
    for r in tag_texts(lm.model, lm.tokenizer, texts, args.max_length, args.batch_size):
        if args.json:
            print(json.dumps(r, ensure_ascii=False), flush=True)
            continue
        ents = "  ".join(f"[{e['type']} {e['text']!r} {e['start']}:{e['end']} {e['score']:.2f}]" for e in r["entities"])
        print(f"{r['text']}\t{ents or '(none)'}", flush=True)
    return 0
