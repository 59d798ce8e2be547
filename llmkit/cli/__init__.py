"""`llmkit <command>`: thin functions over the library. Each command is an `add_<name>` (its flags) and a
`cmd_<name>`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from llmkit.cli import checks


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16", "int8", "int4"]


def _model_flags(p, dtype="auto"):
    p.add_argument("--model", default="default", help="model folder, .gguf file, adapter folder, or 'default' "
                   "(SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=dtype, choices=DTYPE_CHOICES,
                   help=f"weights (default {dtype}): auto (the fastest format that keeps the model's quality, timed "
                   "once on this machine and cached; see `llmkit info`), float32, bfloat16, float16, int8, int4")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _sampling_flags(p):
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
                   "with this policy (PII, block lists, classifier; see README: Guard)")
    _kv_flag(p)


def _kv_flag(p):
    p.add_argument("--kv-cache-mb", type=float, default=None, help="bound on the KV cache in MB (default: a fifth "
                   "of the free memory)")
    p.add_argument("--batch-invariant", action="store_true", help="each request gets exactly the tokens it would "
                   "get alone, whatever runs beside it (each row its own forward; slower when batched)")


def _device(args):
    import torch

    if args.device:
        checks.device(args.device)
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args, check=None):
    """The --model, checked by check(lm) (if given) before anything is printed."""
    from llmkit.model.checkpoint import load_model

    t0 = time.time()
    lm = load_model(args.model, dtype=args.dtype, device=_device(args))
    if check is not None:
        check(lm)
    print(f"[loaded {lm.path} in {time.time() - t0:.2f} s]", file=sys.stderr)
    return lm


def _params(args, default_temperature=0.0):
    from llmkit.infer.engine import SamplingParams

    t = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=t, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop)


def _engine(lm, args):
    from llmkit.infer.engine import Engine

    return Engine(lm.model, lm.tokenizer, lm.generation_config, compile=args.compile, kv_cache_mb=args.kv_cache_mb,
                  batch_invariant=args.batch_invariant)


# ---------------------------------------------------------------------------------------------------------------
# generate / chat


def add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    _model_flags(p)
    _sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="constrain the output to one JSON object (JSON mode)")
    p.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the output to JSON that validates "
                   "against this JSON schema file (max tokens are kept for closing it)")


def _guard(args):
    from llmkit.trust.guard import Guard

    return Guard.from_file(args.guard) if args.guard else None


def cmd_generate(args):
    params = _params(args)  # bad sampling flags fail before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise ValueError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb}")
    if args.json and args.json_schema:
        raise ValueError("--json and --json-schema exclude each other; --json-schema already asks for JSON")
    schema = _read_schema(args.json_schema) if args.json_schema else None  # before the model loads: fail fast
    guard = _guard(args)  # a bad policy fails before the model loads
    lm = _load(args, checks.generative)
    engine = _engine(lm, args)
    processors = _json_processors(engine, params, schema) if args.json or schema is not None else None
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    if guard is not None:
        from llmkit.trust.guard import check_inputs

        items = msgs if args.chat else [prompt]
        if check_inputs(guard, items, chat=args.chat) is not None:
            print(guard.policy.refusal_message)
            print("[guard: input refused]", file=sys.stderr)
            return 0
        prompt = prompt if args.chat else items[0]
    if args.chat:  # ids, not text: message content is encoded as plain text (no smuggled control tokens)
        prompt = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    t0, n = time.time(), 0
    sg = guard.stream() if guard is not None else None
    pieces = engine.stream(prompt, params, processors)
    for piece in sg.wrap(pieces) if sg else pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    dt = time.time() - t0
    if sg is not None and sg.blocked:
        print("[guard: output stopped (content_filter)]", file=sys.stderr)
    print(f"[{n} pieces in {dt:.2f} s]", file=sys.stderr)
    return 0


def _read_schema(path):
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"--json-schema: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema: {path} is not valid JSON: {e}") from None


def _json_processors(engine, params, schema=None) -> list:
    """--json (any JSON object) or --json-schema: one grammar processor (llmkit.infer.constraints) for the decode core."""
    from llmkit.infer.constraints import json_object, json_schema

    proc = json_object(engine) if schema is None else json_schema(engine, schema)
    need = proc.closing()
    if need is not None and len(need) > params.max_new_tokens:
        raise ValueError(f"--max-new-tokens {params.max_new_tokens} is too small for the shortest JSON this schema "
                         f"allows ({len(need)} tokens)")
    return [proc]


def add_chat(sub):
    p = sub.add_parser("chat", help="multi-turn chat with the model's own template (/reset, /exit)")
    _model_flags(p)
    _sampling_flags(p)
    p.add_argument("--system", default=None, help="system message")


def cmd_chat(args):
    guard = _guard(args)
    params = _params(args, default_temperature=0.0 if not sys.stdin.isatty() else 0.7)
    lm = _load(args, checks.generative)
    engine = _engine(lm, args)
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
        if guard is not None:
            from llmkit.trust.guard import check_inputs

            last = history[-1:]
            if check_inputs(guard, last, chat=True) is not None:
                history.pop()
                print(guard.policy.refusal_message, flush=True)
                continue
            history[-1] = last[0]
        reply = []
        sg = guard.stream() if guard is not None else None
        pieces = None
        try:
            pieces = engine.chat(history, params, stream=True)
            for piece in sg.wrap(pieces) if sg else pieces:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the chat
            pass
        finally:
            if pieces is not None:
                pieces.close()  # an interrupted reply's KV blocks go back now, not when the next turn starts
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
    qc = getattr(m, "quantization_config", None)
    dtype = qc.get("method", "quantized") if qc else str(next(m.parameters()).dtype).split(".")[-1]
    n = m.num_params() + sum(q.in_features * q.out_features for q in {id(x): x for x in m.modules()
                                                                       if hasattr(x, "method")}.values()
                             if type(q).__name__ != "RowSlice")
    rows = [("path", lm.path), ("family", cfg.family), ("architecture", _arch(cfg)),
            ("parameters", f"{n:,} ({n / 1e6:.1f} M)"), ("stored as", _stored_as(p)), ("runs as", dtype),
            ("context length", cfg.max_position_embeddings), ("layers", cfg.n_layer),
            ("heads / kv heads", f"{cfg.n_head} / {cfg.n_kv_head}"), ("hidden size", cfg.n_embd),
            ("vocabulary", cfg.vocab_size), ("size on disk", f"{size / 2**20:.1f} MiB"),
            ("chat template", "yes" if lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None)
             else "no")]
    rows += _auto_rows(args)
    for k, v in rows:
        print(f"{k:<16} {v}")
    return 0


def _stored_as(p) -> str:
    """The weights' format on disk: config.json's torch_dtype (or quantization), or a GGUF's tensor types."""
    import json

    if p.is_dir():
        hf = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
        qc = hf.get("quantization_config")
        return qc.get("method", "quantized") if isinstance(qc, dict) else str(hf.get("torch_dtype", "unknown"))
    import gguf

    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors if len(t.shape) == 2})
    return "GGUF " + ", ".join(kinds)


def _auto_rows(args):
    from pathlib import Path

    from llmkit.model import auto_dtype
    from llmkit.model.checkpoint import default_gguf_path

    path = default_gguf_path() if args.model == "default" else Path(args.model)
    entry = auto_dtype.cached(args.model, path, _device(args)) or {}
    cands = auto_dtype.candidates(path) if "choice" not in entry else []
    rows = []
    if "choice" not in entry and len(cands) == 1:
        rows.append(("dtype auto", f"{cands[0]} (the model's own format, nothing to time)"))
    elif "choice" not in entry:
        why = f"; the last timing was disturbed: {entry['disturbed']}" if entry.get("disturbed") else ""
        rows.append(("dtype auto", f"not timed yet on this machine (the first load with --dtype auto times it{why})"))
    elif not entry["step_ms"]:
        rows.append(("dtype auto", f"{entry['choice']} (an encoder or classifier: no decode step to time)"))
    else:
        kin = f" with {entry['kernel_input']} kernel inputs" if entry.get("kernel_input") else ""
        times = ", ".join(f"{k} {v} ms" for k, v in entry["step_ms"].items())
        load = entry.get("load_avg")
        rows.append(("dtype auto", f"{entry['choice']}{kin} (one decode step: {times}; timed {entry['when']}"
                     + (f", load average {load[0]}-{load[1]}" if load else "") + ")"))
    if entry.get("probe"):
        rows.append(("quality probe", ", ".join(f"{k} {v}" for k, v in entry["probe"].items())
                     + f" top-1 agreement with float32 on {entry.get('probe_tokens', '?')} tokens "
                     f"(at least {auto_dtype.PROBE_MIN_AGREEMENT} to be chosen)"))
    return rows


def _arch(cfg):
    from llmkit.model.checkpoint import config_to_hf

    return config_to_hf(cfg)["architectures"][0]


def add_convert(sub):
    p = sub.add_parser("convert", help="GGUF file or HF folder in, model folder out")
    p.add_argument("src", help="a .gguf file, a model folder, or 'default'")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="hf", choices=["hf", "llmkit", "gguf"],
                   help="output format (llmkit's folder is HF's layout; gguf writes one llama.cpp file, OUT)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF weight type (with --to gguf; q4_*: embedding in q8_0, as llama.cpp does)")


def cmd_convert(args):
    from pathlib import Path

    from llmkit.model.checkpoint import export_hf, load_model

    out = Path(args.out)
    if args.to == "gguf":
        from llmkit.model.gguf_export import export_gguf

        checks.output_file(out, "OUT")
        if out.exists():
            raise ValueError(f"{out} already exists; choose a new output file")
        lm = load_model(args.src, dtype="float32")
        export_gguf(lm, out, quant=args.quant)
        print(f"wrote {out} ({args.quant.upper()}, {out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
        return 0
    checks.output_dir(out, "OUT", empty=True)
    lm = load_model(args.src, dtype="float32")
    export_hf(lm, out, dtype=args.dtype)
    print(f"wrote {out} ({lm.config.family}, {lm.model.num_params():,} parameters)", file=sys.stderr)
    return 0


def add_merge(sub):
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a plain model folder out")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output model folder (must be new or empty)")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")


def cmd_merge(args):
    from llmkit.model.checkpoint import merge_adapter

    checks.output_dir(args.out, empty=True)
    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# serve


def add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, and a web chat at /")
    p.add_argument("--model", action="append", default=None, help="model to serve: 'default', a folder, a .gguf, "
                   "or NAME=PATH; repeat to serve several by name (default: default)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights (see generate --help)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, "
                     "/detokenize and /metrics")
    key.add_argument("--api-key-file", default=None, help="API keys, one per line, each optionally followed by "
                     "rpm=N tpm=N (requests/tokens per minute) and name=LABEL; a file with just a key keeps it "
                     "out of ps")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    _kv_flag(p)
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="most new tokens one request may ask for")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                   "(repeatable)")
    p.add_argument("--guard", default=None, metavar="POLICY.yaml", help="check inputs and guard outputs with this "
                   "policy; refusals end with finish_reason content_filter")
    p.add_argument("--embedding-pooling", default="auto", choices=["auto", "mean", "last", "cls"],
                   help="/v1/embeddings pooling (auto: cls for BERT-style encoders, mean otherwise)")


def serve_config(args):
    """ServeConfig from the parsed `serve` flags."""
    from pathlib import Path

    from llmkit.serve.app import ServeConfig

    models = {}
    for spec in args.model or ["default"]:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).stem or spec, spec
        if name in models:
            raise ValueError(f"model name {name!r} given twice; use NAME=PATH to tell them apart")
        models[name] = path
    if args.api_key_file:
        from llmkit.serve.auth import read_key_file

        checks.input_file(args.api_key_file, "--api-key-file")
        read_key_file(args.api_key_file)  # a mistake in the file is a one-line error now, not at the first request
    if args.max_batch < 1 or args.max_queue < 0 or args.max_tokens_cap < 1:
        raise ValueError("--max-batch and --max-tokens-cap must be >= 1 and --max-queue >= 0")
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise ValueError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb}")
    if args.guard:
        from llmkit.trust.guard import load_policy

        load_policy(args.guard)  # a bad policy is a one-line error before anything loads
    return ServeConfig(models=models, host=args.host, port=args.port, api_key=args.api_key,
                       api_key_file=args.api_key_file, max_batch=args.max_batch,
                       max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap, cors_origins=args.cors_origin,
                       embedding_pooling=args.embedding_pooling, dtype=args.dtype, device=_device(args),
                       kv_cache_mb=args.kv_cache_mb, guard=args.guard, batch_invariant=args.batch_invariant)


def cmd_serve(args):
    from llmkit.model.checkpoint import load_model
    from llmkit.serve.app import serve

    checks.port(args.port)
    cfg = serve_config(args)
    sock = _bind(cfg.host, cfg.port)  # a taken port fails now, not after the models load
    for name, spec in cfg.models.items():  # a missing or unusable model fails at start, not as 503s later
        lm = load_model(spec, dtype=cfg.dtype, device=cfg.device)
        checks.generative(lm, "serving")
        cfg.models[name] = lm
    serve(cfg, sock=sock)
    return 0


def _bind(host: str, port: int):
    """A TCP socket bound to host:port (uvicorn listens on it later), or one clear error."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}; give an address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock


# ---------------------------------------------------------------------------------------------------------------
# tokenizer train / pretrain


def add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
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


def add_pretrain(sub):
    # defaults live in PretrainConfig/TrainConfig: None here means "not given", so --config YAML can fill it
    p = sub.add_parser("pretrain", help="pretrain a causal (GPT-style) or masked (BERT-style) LM from text")
    a = p.add_argument
    a("--data", nargs="+", help="training text files (.txt/.jsonl/.json/.csv/.tsv/.parquet)")
    a("--out", help="output model folder (checkpoints/, metrics.jsonl, loss.png inside)")
    a("--config", help="YAML file of flags (keys as flag names); command-line flags win")
    a("--model-config", help="preset name or config.json (default: llama-tiny for clm, bert-tiny for mlm)")
    a("--tokenizer", help="tokenizer folder (default: train one on --data, saved in --out)")
    a("--vocab-size", type=int, help="vocabulary of a tokenizer trained here (default 4096)")
    a("--char", action="store_true", default=None, help="train a character-level tokenizer here")
    a("--objective", choices=["clm", "mlm"], help="clm: next-token prediction (default); mlm: BERT masking")
    a("--val-data", nargs="+", help="validation files (default: the last --val-fraction of --data)")
    a("--val-fraction", type=float, help="validation share of the token stream (default 0.1)")
    a("--text-field", help="field/column holding the text (default: text)")
    a("--lines", action="store_true", default=None, help=".txt files hold one document per line")
    a("--block-size", type=int, help="tokens per sequence (default min(256, max positions))")
    a("--batch-size", type=int, help="sequences per process per micro-step (default 16)")
    a("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    a("--max-steps", type=int, help="optimizer steps, also the cosine schedule length (default 1000)")
    a("--max-tokens", type=int, help="train on this many tokens (sets --max-steps)")
    a("--max-time", type=float, help="stop after this many seconds")
    a("--lr", type=float, help="peak learning rate (default 3e-4)")
    a("--min-lr", type=float, help="final learning rate of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    a("--weight-decay", type=float, help="AdamW weight decay on >= 2-D weights (default 0.1)")
    a("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    a("--grad-clip", type=float, help="gradient norm clip, 0 = off (default 1.0)")
    a("--dropout", type=float, help="dropout (default: the model config's)")
    a("--n-layer", type=int, help="override the config's number of layers")
    a("--n-head", type=int, help="override the number of attention heads")
    a("--n-kv-head", type=int, help="override the number of key/value heads")
    a("--n-embd", type=int, help="override the width")
    a("--eval-every", type=int, help="evaluate every N steps (default 250)")
    a("--eval-steps", type=int, help="validation batches per evaluation (default 20)")
    a("--log-every", type=int, help="log train loss every N steps (default 10)")
    a("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    a("--keep-last", type=int, help="checkpoints to keep besides the best (default 2)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--device", help="cpu, cuda ... (default: cuda when available)")
    a("--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 only on GPUs with it)")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--fsdp", action="store_true", default=None, help="shard with FSDP2 (under torchrun) instead of DDP")
    a("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--clean", action="store_true", help="clean --data first with `llmkit data clean`'s pipeline (its flags "
      "below; cleaned files and reports go to OUT/clean/)")
    from llmkit.cli.trust import CLEAN_FLAGS, add_clean_flags

    add_clean_flags(p.add_argument_group("cleaning (with --clean)"), with_io=False)
    p.set_defaults(clean_flags=CLEAN_FLAGS)


def cmd_pretrain(args):
    from llmkit.train.pretrain import config_from_flags, pretrain

    checks.device(args.device)
    skip = {"command", "handler", "clean", "clean_flags", *args.clean_flags}
    pc = config_from_flags({k: v for k, v in vars(args).items() if k not in skip})
    if args.clean:
        from llmkit.data.clean import clean_for_training
        from llmkit.cli.trust import clean_config

        pc.data = clean_for_training(pc.data, pc.out, clean_config(args), text_field=pc.text_field,
                                     unit="line" if pc.lines else "doc")
    pretrain(pc)


# ---------------------------------------------------------------------------------------------------------------
# eval / lm-eval


def add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a model: perplexity, choice, generate, classify, bias (JSON + tables)")
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)

    def common(q, batch_size):
        _model_flags(q, dtype="float32")  # scores in float32 (lm-eval parity) unless --dtype says otherwise
        q.add_argument("--data", required=True, help="data file")
        q.add_argument("--out", default=None, help="write the results JSON here (plots go beside it)")
        q.add_argument("--limit", type=int, default=None, help="first N records (perplexity: first N lines)")
        q.add_argument("--batch-size", type=int, default=batch_size, help="rows per forward pass")
        q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    q = esub.add_parser("perplexity", help="rolling-window perplexity, bits per byte (lm-eval wikitext semantics)")
    common(q, 8)
    q.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's)")
    q.add_argument("--stride", type=int, default=None, help="tokens scored per window after the first (default: "
                   "--context, i.e. disjoint windows exactly as lm-eval)")
    q.set_defaults(handler=cmd_eval_perplexity)

    q = esub.add_parser("choice", help="multiple choice over {query, choices, label} JSONL (lm-eval multiple_choice)")
    common(q, 32)
    q.add_argument("--num-fewshot", type=int, default=0, help="solved examples drawn from the same file")
    q.add_argument("--query-field", default="query")
    q.add_argument("--choices-field", default="choices")
    q.add_argument("--label-field", default="label", help="0-based index of the right choice")
    q.set_defaults(handler=cmd_eval_choice)

    q = esub.add_parser("generate", help="generate for prompts and score BLEU, chrF, ROUGE, exact match")
    common(q, 16)
    _sampling_flags(q)
    q.set_defaults(max_new_tokens=128)
    q.add_argument("--prompt-field", default="prompt")
    q.add_argument("--reference-field", default="reference", help="a string or a list of strings "
                   "('references' is also accepted)")
    q.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    q.set_defaults(handler=cmd_eval_generate)

    q = esub.add_parser("classify", help="accuracy, P/R/F1, confusion matrix, calibration of a classifier")
    common(q, 32)
    q.add_argument("--text-field", default="text")
    q.add_argument("--label-field", default="label", help="label index or label name")
    q.set_defaults(handler=cmd_eval_classify)
    importlib.import_module("llmkit.cli.private").add_eval_bias(esub)


def _eval_finish(args, res):
    from llmkit.eval.evaluate import markdown_table, write_results

    if args.out:
        write_results(args.out, res)
        print(f"[wrote {args.out}]", file=sys.stderr)
    for key in ("bleu_signature", "chrf_signature"):
        if key in res:
            print(f"{key.split('_')[0]}: {res[key]}")
    size = f"{res['n_tokens']} tokens" if "n_tokens" in res else f"{res['n']} items"
    print(f"{res['task']} on {res['data']} ({size}, {res['seconds']:.1f} s)")
    print(markdown_table(res))
    return 0


def _plot_path(args, name):
    from pathlib import Path

    if not args.out:
        return None
    out = Path(args.out)
    return out.with_name(f"{out.stem}.{name}.png")


def _eval_checks(args):
    checks.limit(args)
    checks.at_least(args, 1, "--batch-size", "--context", "--stride", "--max-new-tokens")
    checks.at_least(args, 0, "--num-fewshot")
    checks.output_file(args.out)


def cmd_eval_perplexity(args):
    from llmkit.eval.evaluate import evaluate_perplexity, read_text

    _eval_checks(args)
    read_text(args.data)  # bad data fails before the model loads
    lm = _load(args, lambda lm: checks.generative(lm, "perplexity"))
    res = evaluate_perplexity(lm, args.data, context=args.context, stride=args.stride,
                              batch_size=args.batch_size, limit=args.limit, progress=args.progress)
    return _eval_finish(args, res)


def cmd_eval_choice(args):
    from llmkit.eval.evaluate import evaluate_choice, load_choice_records

    _eval_checks(args)
    load_choice_records(args.data, args.query_field, args.choices_field, args.label_field)  # fail before loading
    lm = _load(args, lambda lm: checks.generative(lm, "multiple-choice scoring"))
    res = evaluate_choice(lm, args.data, args.query_field, args.choices_field, args.label_field,
                          num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          progress=args.progress, plot=_plot_path(args, "reliability"))
    return _eval_finish(args, res)


def cmd_eval_generate(args):
    from llmkit.eval.evaluate import evaluate_generate, load_generate_records

    _eval_checks(args)
    params = _params(args)
    load_generate_records(args.data, args.prompt_field, args.reference_field)  # fail before loading
    lm = _load(args, lambda lm: checks.generative(lm, "eval generate"))
    res = evaluate_generate(lm, args.data, params, args.prompt_field, args.reference_field,
                            chat=args.chat, limit=args.limit, batch_size=args.batch_size, progress=args.progress)
    return _eval_finish(args, res)


def cmd_eval_classify(args):
    from llmkit.eval.evaluate import evaluate_classify, load_classify_records

    _eval_checks(args)
    load_classify_records(args.data, args.text_field, args.label_field)  # bad data fails before loading
    plots = None
    if args.out:
        from pathlib import Path

        plots = str(Path(args.out).with_suffix("")) + "_plots"
    lm = _load(args, checks.classifier)
    res = evaluate_classify(lm, args.data, args.text_field, args.label_field, limit=args.limit,
                            batch_size=args.batch_size, progress=args.progress, plots=plots)
    return _eval_finish(args, res)


def add_lm_eval(sub):
    # prefix_chars that never occur: every argument, --help included, goes through untouched to lm-eval
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness with llmkit registered as `--model llmkit`",
                       add_help=False, prefix_chars="\x00")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's own arguments")
    p.set_defaults(handler=cmd_lm_eval)


def cmd_lm_eval(args):
    from llmkit.eval.lm_eval import main as lm_eval_main

    return lm_eval_main(args.args)


# ---------------------------------------------------------------------------------------------------------------
# finetune / classify


def add_finetune(sub):
    p = sub.add_parser("finetune", help="fine-tune a model (full or LoRA) for chat, instruct, classify or text")
    a = p.add_argument
    _model_flags(p)
    a("--data", required=True, help="chat JSONL ({messages}), Alpaca JSON/JSONL, CSV/TSV/JSONL (text, label) or .txt")
    a("--out", required=True, help="output folder (adapter or model, checkpoints/, metrics.jsonl, loss.png)")
    a("--val-data", help="validation file (default: hold out --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.1, help="share of --data held out for validation (default 0.1)")
    a("--task", choices=["chat", "instruct", "classify", "text"], help="default: detected from the file")
    a("--method", choices=["lora", "full"], default="lora", help="LoRA adapters (default) or all weights")
    a("--text-column", help="classify: column with the text (default: text/sentence/...)")
    a("--label-column", help="classify: column with the label (default: label/labels/...)")
    a("--lora-r", type=int, default=8, help="LoRA rank")
    a("--lora-alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    a("--lora-rslora", action="store_true", help="rank-stabilized LoRA: scale the update by alpha / sqrt(r)")
    a("--lora-targets", default="q,k,v,o", help="comma-separated: q,k,v,o,gate,up,down or all")
    a("--lora-layers", type=int, default=None, help="adapters on the top N blocks only (faster backward)")
    a("--epochs", type=float, default=None, help="passes over the training data (sets --max-steps)")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    a("--max-time", type=float, default=None, help="stop after this many seconds")
    a("--batch-size", type=int, default=8, help="examples per micro-step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate (default 2e-4 for LoRA, 2e-5 for full)")
    a("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 3%% of the steps)")
    a("--max-length", type=int, default=512,
      help="tokens per example, at most the model's context; longer ones are truncated (counted)")
    a("--eval-every", type=int, default=100, help="validate every N steps")
    a("--early-stopping", type=int, default=0, metavar="PATIENCE",
      help="stop after PATIENCE evaluations without a better validation loss (0: off)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--seed", type=int, default=0, help="random seed")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--clean", action="store_true", help="clean --data first with `llmkit data clean`'s pipeline (flags below; "
      "the cleaned file and its report go to OUT/clean/)")
    from llmkit.cli.trust import add_clean_flags

    add_clean_flags(p.add_argument_group("cleaning (with --clean)"), with_io=False)
    a("--dp-epsilon", type=float, default=None, help="train with DP-SGD (Opacus) to this epsilon (LoRA only)")
    a("--dp-delta", type=float, default=1e-5, help="DP delta (default 1e-5; keep it below 1 / examples)")
    a("--max-grad-norm", type=float, default=1.0, help="DP: per-example gradient clipping norm (default 1.0)")
    a("--dp-accountant", choices=["prv", "rdp"], default="prv", help="DP: privacy accountant (default prv)")


def cmd_finetune(args):
    if args.clean:
        from llmkit.cli.trust import clean_finetune_data

        args.data = clean_finetune_data(args)
    from llmkit.train.finetune import FinetuneConfig, finetune
    from llmkit.train.loop import TrainConfig

    if args.epochs is not None and args.max_steps is not None:
        raise ValueError("give --epochs or --max-steps, not both (--epochs sets the number of steps)")
    checks.at_least(args, 1, "--lora-r", "--lora-layers", "--max-steps", "--batch-size", "--grad-accum",
                    "--max-length")
    checks.at_least(args, 0, "--warmup-steps", "--early-stopping", "--save-every", "--eval-every")
    checks.in_range(args, "--val-fraction", 0, 1, lo_open=True, hi_open=True)
    checks.in_range(args, "--lora-dropout", 0, 1, hi_open=True)
    for flag in ("--lora-alpha", "--lr", "--epochs", "--max-time"):
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None and not v > 0:
            raise ValueError(f"{flag} {v} must be > 0")
    for flag, path in (("--data", args.data), ("--val-data", args.val_data)):
        checks.input_file(path, flag)
    checks.output_dir(args.out)
    targets = [t for t in args.lora_targets.split(",") if t.strip()]
    fc = FinetuneConfig(data=args.data, out=args.out, model=args.model, task=args.task, method=args.method,
                        val_data=args.val_data, val_fraction=args.val_fraction, max_length=args.max_length,
                        batch_size=args.batch_size, text_column=args.text_column, label_column=args.label_column,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        lora_rslora=args.lora_rslora, lora_targets=targets, lora_layers=args.lora_layers,
                        seed=args.seed, device=_device(args))
    lr = args.lr if args.lr is not None else (2e-4 if args.method == "lora" else 2e-5)
    tc = TrainConfig(max_steps=args.max_steps or 0, max_time=args.max_time, lr=lr,
                     warmup_steps=args.warmup_steps if args.warmup_steps is not None else -1, weight_decay=0.0,
                     grad_accum=args.grad_accum, eval_every=args.eval_every, save_every=args.save_every,
                     early_stopping=args.early_stopping,
                     seed=args.seed, device=_device(args), dtype=args.dtype or "auto", out=args.out,
                     resume=args.resume, progress=args.progress)
    dp = None
    if args.dp_epsilon is not None:
        from llmkit.train.dp import DPConfig

        dp = DPConfig(args.dp_epsilon, args.dp_delta, args.max_grad_norm, args.dp_accountant)
    res = finetune(fc, tc, epochs=args.epochs, dp=dp)
    keys = ("step", "train_loss", "val_loss", "val_acc", "val_accuracy", "val_macro_f1", "epsilon")
    print(" ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}" for k in keys if k in res))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_classify(sub):
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier (label and probability per line)")
    p.add_argument("texts", nargs="*", help="texts to classify")
    _model_flags(p, dtype="float32")
    p.add_argument("--input", help="file with one text per line ('-' reads stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: text, label, probability, probs")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (longer ones are cut)")


def cmd_classify(args):
    import json

    from llmkit.data.corpus import read_utf8

    checks.at_least(args, 1, "--batch-size", "--max-length")
    texts = list(args.texts)
    if args.input:
        checks.input_file(args.input, "--input")
        src = sys.stdin.read() if args.input == "-" else read_utf8(args.input)
        texts += [line for line in src.splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to classify: give texts as arguments or --input FILE")
    lm = _load(args, checks.classifier)
    from llmkit.train.finetune import predict_proba

    probs = predict_proba(lm.model, lm.tokenizer, texts, args.max_length, args.batch_size)
    names = [lm.config.id2label.get(str(i), str(i)) for i in range(lm.config.num_labels)]
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        if args.json:
            print(json.dumps({"text": text, "label": names[best], "probability": round(p[best], 6),
                              "probs": {n: round(x, 6) for n, x in zip(names, p)}}, ensure_ascii=False))
        else:
            print(f"{names[best]}\t{p[best]:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------------------------

COMMANDS = ["generate", "chat", "info", "convert", "merge", "serve", "tokenizer", "pretrain", "eval", "lm-eval",
            "finetune", "classify"]
# commands that live in modules of their own (cli_<area>.py): each module has register(sub), whose parsers set
# `handler=` with set_defaults; they import heavy libraries inside their handlers, so `llmkit --help` stays fast
COMMAND_MODULES: list[str] = ["llmkit.cli.quantize", "llmkit.cli.trust", "llmkit.cli.compress", "llmkit.cli.private"]


def build_parser():
    parser = _Parser(prog="llmkit", description="llmkit: data, tokenizer, training, fine-tuning, evaluation, serving")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        globals()[f"add_{name.replace('-', '_')}"](sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _version():
    from llmkit import __version__

    return f"llmkit {__version__}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or globals()[f"cmd_{args.command.replace('-', '_')}"]
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
            _remove_partial(out)
        return 2


def _remove_partial(out):
    """Remove what a failed command left at an --out path that did not exist before it (never a run's checkpoints)."""
    import shutil
    from pathlib import Path

    p = Path(out)
    if p.is_dir() and not (p / "checkpoints").exists():
        shutil.rmtree(p, ignore_errors=True)
    elif p.is_file():
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
