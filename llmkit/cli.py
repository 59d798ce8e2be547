"""`llmkit <command>`: thin functions over the library. Each command is an `add_<name>` (its flags) and a `cmd_<name>`."""
from __future__ import annotations

import argparse
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _model_flags(p):
    p.add_argument("--model", default="default", help="model folder, .gguf file, adapter folder, or 'default' "
                   "(SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _sampling_flags(p):
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 means greedy (default: 0 for generate, "
                   "the model's generation_config or 0.7 for chat)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top token)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty (> 1 fewer repeats)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _device(args):
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args):
    from llmkit.checkpoint import load_model

    t0 = time.time()
    lm = load_model(args.model, dtype=args.dtype, device=_device(args))
    print(f"[loaded {lm.path} in {time.time() - t0:.2f} s]", file=sys.stderr)
    return lm


def _params(args, default_temperature=0.0):
    from llmkit.engine import SamplingParams

    t = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=t, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop)


def _engine(lm):
    from llmkit.engine import Engine

    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer.json; generation needs one")
    return Engine(lm.model, lm.tokenizer, lm.generation_config)


# ---------------------------------------------------------------------------------------------------------------
# generate / chat


def add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    _model_flags(p)
    _sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")


def cmd_generate(args):
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    lm = _load(args)
    engine, params = _engine(lm), _params(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": prompt}]
        prompt = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    t0, n = time.time(), 0
    for piece in engine.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    dt = time.time() - t0
    print(f"[{n} pieces in {dt:.2f} s]", file=sys.stderr)
    return 0


def add_chat(sub):
    p = sub.add_parser("chat", help="multi-turn chat with the model's own template (/reset, /exit)")
    _model_flags(p)
    _sampling_flags(p)
    p.add_argument("--system", default=None, help="system message")


def cmd_chat(args):
    lm = _load(args)
    engine = _engine(lm)
    params = _params(args, default_temperature=0.0 if not sys.stdin.isatty() else 0.7)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    if interactive:
        print("llmkit chat: type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in engine.chat(history, params, stream=True):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the chat
            pass
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


# ---------------------------------------------------------------------------------------------------------------
# info / convert


def add_info(sub):
    p = sub.add_parser("info", help="family, parameters, dtype, context length and size of a model")
    _model_flags(p)


def cmd_info(args):
    from pathlib import Path

    lm = _load(args)
    cfg, m = lm.config, lm.model
    p = Path(lm.path)
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
    dtype = next(m.parameters()).dtype
    rows = [("path", lm.path), ("family", cfg.family), ("architecture", _arch(cfg)),
            ("parameters", f"{m.num_params():,} ({m.num_params() / 1e6:.1f} M)"), ("dtype", str(dtype).split(".")[-1]),
            ("context length", cfg.max_position_embeddings), ("layers", cfg.n_layer),
            ("heads / kv heads", f"{cfg.n_head} / {cfg.n_kv_head}"), ("hidden size", cfg.n_embd),
            ("vocabulary", cfg.vocab_size), ("size on disk", f"{size / 2**20:.1f} MiB"),
            ("chat template", "yes" if lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None)
             else "no")]
    for k, v in rows:
        print(f"{k:<16} {v}")
    return 0


def _arch(cfg):
    from llmkit.checkpoint import config_to_hf

    return config_to_hf(cfg)["architectures"][0]


def add_convert(sub):
    p = sub.add_parser("convert", help="GGUF file or HF folder in, model folder out")
    p.add_argument("src", help="a .gguf file, a model folder, or 'default'")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="hf", choices=["hf", "llmkit"], help="output format (llmkit's folder is HF's layout)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")


def cmd_convert(args):
    from pathlib import Path

    from llmkit.checkpoint import export_hf, load_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new output folder")
    lm = load_model(args.src, dtype="float32")
    export_hf(lm, out, dtype=args.dtype)
    print(f"wrote {out} ({lm.config.family}, {lm.model.num_params():,} parameters)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------

COMMANDS = ["generate", "chat", "info", "convert"]


def build_parser():
    parser = _Parser(prog="llmkit", description="llmkit: data, tokenizer, training, fine-tuning, evaluation, serving")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        globals()[f"add_{name.replace('-', '_')}"](sub)
    return parser


def _version():
    from llmkit import __version__

    return f"llmkit {__version__}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or globals()[f"cmd_{args.command.replace('-', '_')}"]
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"llmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
