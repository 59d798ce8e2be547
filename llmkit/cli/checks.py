"""Argument checks the CLI commands run before any work or output: each raises one ValueError/FileNotFoundError line
naming the flag, the problem and the fix (cli.main prints it and exits 2)."""
from __future__ import annotations

from pathlib import Path


def at_least(args, minimum, *flags):
    """Every given (not None) `--flag` in flags is an int/float >= minimum."""
    for flag in flags:
        v = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if v is not None and v < minimum:
            raise ValueError(f"{flag} {v} must be >= {minimum}")


def in_range(args, flag, lo, hi, lo_open=False, hi_open=False):
    """A given `--flag` lies in [lo, hi] (open ends as asked)."""
    v = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if v is None:
        return
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{flag} {v} must lie in {left}{lo}, {hi}{right}")


def limit(args):
    """--limit, when given, is a positive number of records (0 would silently score everything or nothing)."""
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1; omit --limit to use every record")


def input_file(path, flag):
    """`path` exists and is a file ('-' for stdin passes)."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file")
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path} not found")


def output_file(path, flag="--out"):
    """`path` can become a file: not a folder, and its parent is (or can be made) a folder."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {p / 'results.json'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            break


def output_dir(path, flag="--out", empty=False):
    """`path` can become a folder: not a file (and, with empty=True, new or empty)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder (new or empty)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            break
    if empty and p.is_dir() and any(p.iterdir()):
        raise ValueError(f"{flag} {path} exists and is not empty; choose a new output folder")


def port(value: int):
    """A TCP port number: 0 (any free port) to 65535."""
    if not 0 <= value <= 65535:
        raise ValueError(f"--port {value} is not a TCP port; use 1-65535 (e.g. --port 8000)")


def generative(lm, what="generation"):
    """The loaded model can generate text: a causal LM with an LM head and a tokenizer."""
    cfg = lm.config
    if not cfg.causal:
        raise ValueError(f"{lm.path} is a masked (encoder, BERT-style) language model; {what} needs a causal "
                         "(decoder) model such as --model default")
    if cfg.num_labels:
        use = "tag` or `llmkit eval tag" if cfg.tagger else "classify` or `llmkit eval classify"
        raise ValueError(f"{lm.path} is a {'token tagger' if cfg.tagger else 'classifier'} ({cfg.num_labels} labels), "
                         f"not a language model; use `llmkit {use}` (--model {lm.path})")
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer.json; {what} needs one beside the weights")


def classifier(lm):
    """The loaded model has a classification head (and a tokenizer)."""
    if not lm.config.num_labels:
        raise ValueError(f"{lm.path} has no classification head; fine-tune one with `llmkit finetune --task "
                         "classify`, or use `llmkit generate` for a language model")
    if lm.config.tagger:
        raise ValueError(f"{lm.path} is a token tagger, not a text classifier; use `llmkit tag` or `llmkit eval tag`")
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer.json; classification needs one beside the weights")


def device(name):
    """A torch device string this machine has (None: the default), or one clear error."""
    if name in (None, "auto"):
        return
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device on this machine; use --device cpu")
