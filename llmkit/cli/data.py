"""Data commands: `llmkit tokenizer train` and `llmkit data clean`."""
from __future__ import annotations

import sys

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import Parser, add_clean_flags


def add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE (or character) tokenizer on text files")
    t.add_argument("files", nargs="+", help=".txt/.jsonl/.json/.csv/.tsv/.parquet files")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    t.add_argument("--out", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    t.add_argument("--char", action="store_true", help="character-level vocabulary instead of byte-level BPE")
    t.add_argument("--text-field", default="text", help="field/column holding the text in json/csv/parquet files")
    t.set_defaults(handler=cmd_tokenizer_train)


def cmd_tokenizer_train(args):
    from llmkit.data.tokenizer_train import describe, train_tokenizer

    for f in args.files:
        checks.input_file(f, "training file")
    checks.output_dir(args.out)
    checks.at_least(args, 1, "--vocab-size")
    tok = train_tokenizer(args.files, args.vocab_size, args.out, char=args.char, text_field=args.text_field)
    print(describe(tok, args.files, args.out, args.text_field))


def add_data(sub):
    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    c = dsub.add_parser("clean", help="normalise, de-duplicate, filter and redact text data (a datatrove pipeline: "
                        "local processes, Slurm or Ray)")
    add_clean_flags(c, with_io=True)
    c.set_defaults(handler=cmd_data_clean)


def cmd_data_clean(args):
    from llmkit.data.pipeline import run_clean

    report = run_clean(args.inputs, args.out, common.clean_config(args), common.run_config(args),
                       text_field=args.text_field, unit=args.unit, report_path=args.report)
    if "submitted" in report:
        print(f"submitted Slurm job {report['submitted']} (the last stage); parts go to {args.out}, logs and "
              f"intermediate files to {report['work_dir']}", file=sys.stderr)
        return 0
    kept, total = report["documents_out"], report["documents_in"]
    print(f"kept {kept} of {total} documents ({report['bytes_out']:,} of {report['bytes_in']:,} bytes, "
          f"{report['mb_per_s']} MB/s); wrote {args.out}", file=sys.stderr)
    for rule, n in report["removed"].items():
        print(f"  {rule}: {n}", file=sys.stderr)
    return 0
