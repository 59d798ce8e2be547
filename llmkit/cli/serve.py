"""`llmkit serve`: the OpenAI-compatible HTTP server, its flags checked and its models loaded before it listens."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import DTYPE_CHOICES, check_speculative, compile_mode, kv_flag


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
    kv_flag(p)
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="most new tokens one request may ask for")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                   "(repeatable)")
    p.add_argument("--guard", default=None, metavar="POLICY.yaml", help="check inputs and guard outputs with this "
                   "policy; refusals end with finish_reason content_filter")
    p.add_argument("--review-db", default=None, metavar="PATH", help="with --guard: SQLite file where inputs and "
                   "outputs the policy flags wait for review (`llmkit guard review`; default: "
                   "$LLMKIT_HOME/review.db)")
    p.add_argument("--embedding-pooling", default="auto", choices=["auto", "mean", "last", "cls"],
                   help="/v1/embeddings pooling (auto: mean over non-padding tokens, for decoders and "
                   "encoders alike; cls: BERT's first token)")
    p.set_defaults(handler=cmd_serve)


def serve_config(args):
    """ServeConfig from the parsed `serve` flags."""
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
    check_speculative(args)
    if args.guard:
        from llmkit.trust.guard import load_policy

        load_policy(args.guard)  # a bad policy is a one-line error before anything loads
    review_db = None
    if args.guard:
        from llmkit.trust.review import ReviewQueue, default_review_db

        review_db = str(args.review_db or default_review_db())
        ReviewQueue(review_db).close()  # an unwritable database fails now
    elif args.review_db:
        raise ValueError("--review-db needs --guard: only a policy flags texts for review")
    return ServeConfig(models=models, host=args.host, port=args.port, api_key=args.api_key,
                       api_key_file=args.api_key_file, max_batch=args.max_batch,
                       max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap, cors_origins=args.cors_origin,
                       embedding_pooling=args.embedding_pooling, dtype=args.dtype, device=common.device(args),
                       kv_cache_mb=args.kv_cache_mb, guard=args.guard, review_db=review_db,
                       batch_invariant=args.batch_invariant, speculative=args.speculative,
                       draft_tokens=args.draft_tokens, compile=compile_mode(args))


def cmd_serve(args):
    from llmkit.model.checkpoint import load_model
    from llmkit.serve.app import serve

    checks.port(args.port)
    cfg = serve_config(args)
    sock = _bind(cfg.host, cfg.port)  # a taken port fails now, not after the models load

    def load_all():  # a missing or unusable model fails at start, not as 503s later
        for name, spec in cfg.models.items():
            lm = load_model(spec, dtype=cfg.dtype, device=cfg.device)
            if lm.config.causal or lm.config.num_labels:
                checks.generative(lm, "serving")
            elif lm.tokenizer is None:  # an encoder serves /v1/embeddings only, and reads text through its tokenizer
                raise ValueError(f"{lm.path} has no tokenizer.json; serving needs one beside the weights")
            cfg.models[name] = lm

    # loaded in a thread that ends before serving: torch's OpenMP runtime (libgomp) keeps a team of threads for each
    # thread that ran parallel work, and once team threads outnumber the cores it stops spinning between parallel
    # regions. Weights loaded in this (main) thread left its team beside the scheduler thread's, and every decode
    # step of the server took 1.8x as long as in `llmkit chat` (issue 23: 21.1 against 11.8 ms a token)
    with ThreadPoolExecutor(1) as ex:
        ex.submit(load_all).result()
    serve(cfg, sock=sock)
    return 0


def _bind(host: str, port: int):
    """A TCP socket bound to host:port (uvicorn listens on it later), or one clear error."""
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
