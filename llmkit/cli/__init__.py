"""`llmkit <command>`: thin functions over the library. Each command group is a module of this package (generate,
model, serve, data, train, eval, compress, trust, fill_mask, tag) with an `add_<name>` per command (its flags; it sets
`handler=`) and a `cmd_<name>` (the handler); flags.py holds the flags they share, common.py the helpers their
handlers share and checks.py the argument checks. Handlers import torch and the heavy library inside, so `llmkit
--help` stays fast."""
from __future__ import annotations

import os
import sys

from llmkit.cli import compress, data, fill_mask, generate, model, serve, tag, train, trust
from llmkit.cli import eval as evaluate
from llmkit.cli.common import remove_partial
from llmkit.cli.flags import Parser

# every command, in the order `llmkit --help` lists them: name -> the function that adds its parser
COMMANDS = {
    "generate": generate.add_generate,
    "chat": generate.add_chat,
    "info": model.add_info,
    "convert": model.add_convert,
    "merge": model.add_merge,
    "serve": serve.add_serve,
    "tokenizer": data.add_tokenizer,
    "pretrain": train.add_pretrain,
    "eval": evaluate.add_eval,
    "lm-eval": evaluate.add_lm_eval,
    "finetune": train.add_finetune,
    "classify": evaluate.add_classify,
    "fill-mask": fill_mask.add_fill_mask,
    "tag": tag.add_tag,
    "quantize": model.add_quantize,
    "explain": trust.add_explain,
    "guard": trust.add_guard,
    "data": data.add_data,
    "compare": compress.add_compare,
    "prune": compress.add_prune,
    "distill": compress.add_distill,
    "federate": train.add_federate,
}


def build_parser():
    parser = Parser(prog="llmkit", description="llmkit: data, tokenizer, training, fine-tuning, evaluation, serving")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS.values():
        add(sub)
    return parser


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version (pyproject.toml), which llmkit.__version__ repeats
        return f"llmkit {version('llmkit')}"
    except PackageNotFoundError:
        return "llmkit (not installed: run `make install`)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    out = getattr(args, "out", None)
    fresh = out is not None and not os.path.lexists(out)
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # user errors; OSError: a path, permission or full disk, said in one line
        msg = str(e) if isinstance(e, ValueError) or not e.strerror else \
            f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        print(f"llmkit {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        if fresh:
            remove_partial(out)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
