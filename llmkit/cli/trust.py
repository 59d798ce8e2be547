"""Trust commands: `llmkit explain` (attention maps, token view, attributions) and `llmkit guard check|eval|review`
(PII and content-policy checks, the review queue of flagged texts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import Parser, model_flags

# ---------------------------------------------------------------------------------------------------------------
# explain


def add_explain(sub):
    p = sub.add_parser("explain", help="attention maps, token view and attributions of a text (PNG, HTML, JSON)")
    p.add_argument("text", help="the text to explain ('-' reads stdin)")
    model_flags(p)
    p.add_argument("--out", default="explain", help="output folder (default: ./explain)")
    p.add_argument("--layers", default=None, help="layers to show, e.g. 0,1,5 or 0-3 (default: all)")
    p.add_argument("--heads", default=None, help="heads to show, e.g. 0,2 or 0-7 (default: all)")
    p.add_argument("--attributions", choices=["ig", "gxi", "none"], default="ig",
                   help="integrated gradients (captum, with convergence delta), gradient x input, or none; a "
                   "quantized model (int4/int8, as --dtype auto loads the default) is dequantized to float32 for them")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    p.add_argument("--target", default=None, help="classifier: label to explain (default: the predicted one); "
                   "causal LM: next token to explain (default: the most likely one)")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens greedily and show "
                   "them in the token view")
    p.add_argument("--top-k", type=int, default=5, help="alternatives per token in the token view")
    p.set_defaults(handler=cmd_explain)


def _indices(spec: str | None, n: int, name: str) -> list[int]:
    if spec is None:
        return list(range(n))
    out = []
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"--{name} {spec!r}: use numbers like 0,2 or 0-3") from None
        if not 0 <= lo <= hi < n:
            raise ValueError(f"--{name} {spec!r} out of range: the model has {n} {name} (0-{n - 1})")
        out += range(lo, hi + 1)
    return sorted(set(out))


def cmd_explain(args):
    from llmkit.eval.explain import explain_to_folder

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise ValueError("nothing to explain: the text is empty")
    if args.steps < 1 or args.steps > 1024 or args.top_k < 1 or args.top_k > 20 or args.generate < 0:
        raise ValueError("--steps must be in 1..1024, --top-k in 1..20 and --generate >= 0")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out")
    lm = common.load(args)
    cfg = lm.config
    layers, heads = _indices(args.layers, cfg.n_layer, "layers"), _indices(args.heads, cfg.n_head, "heads")
    written = explain_to_folder(lm, text, out, layers=layers, heads=heads, attributions=args.attributions,
                                steps=args.steps, target=args.target, generate=args.generate, top_k=args.top_k)
    for f in written:
        print(f"wrote {f}", file=sys.stderr)
    attr = json.loads((out / "explain.json").read_text(encoding="utf-8")).get("attributions")
    if attr:
        print(f"attributions ({attr['method']}) computed in {attr['precision']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# guard


def add_guard(sub):
    g = sub.add_parser("guard", help="PII and content-policy checks")
    gsub = g.add_subparsers(dest="guard_command", required=True, parser_class=Parser)
    q = gsub.add_parser("check", help="print the findings in a file or a text")
    q.add_argument("input", help="a file path, a text, or '-' for stdin")
    q.add_argument("--policy", default=None, help="policy YAML (default: every built-in PII recogniser)")
    q.add_argument("--direction", choices=["input", "output"], default="input", help="which actions apply")
    q.add_argument("--json", action="store_true", help="one JSON object: findings, action, redacted text")
    q.add_argument("--review-db", nargs="?", const="", default=None, metavar="PATH", help="queue the text for "
                   "review if the policy flags it (default PATH: $LLMKIT_HOME/review.db)")
    q.set_defaults(handler=cmd_guard_check)
    q = gsub.add_parser("eval", help="precision/recall per type on labelled JSONL ({text, entities})")
    q.add_argument("--data", required=True, help="JSONL: {\"text\": ..., \"entities\": [{\"type\", \"start\", "
                   "\"end\"}]}")
    q.add_argument("--policy", default=None, help="policy YAML (default: every built-in PII recogniser)")
    q.add_argument("--out", default=None, help="write the results JSON here")
    q.set_defaults(handler=cmd_guard_eval)
    q = gsub.add_parser("review", help="a web page to mark flagged texts allowed or blocked, or --export them")
    q.add_argument("--review-db", default=None, metavar="PATH", help="the review database (default: "
                   "$LLMKIT_HOME/review.db, where `llmkit serve --guard` queues flagged texts)")
    q.add_argument("--export", default=None, metavar="LABELED.jsonl", help="write the decided items as `guard eval` "
                   "data ({text, entities}: a blocked item's findings, none for an allowed one) and exit")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    q.add_argument("--port", type=int, default=8001, help="TCP port (default 8001)")
    q.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the page's API")
    q.set_defaults(handler=cmd_guard_review)


def _read_arg_text(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    p = Path(value)
    if p.is_file():
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{value} is not UTF-8 text") from None
        if not text.strip():
            raise ValueError(f"{value} is empty")
        return text
    return value


def _guard_of(policy):
    from llmkit.trust.guard import Guard

    return Guard.from_file(policy) if policy else Guard()


def cmd_guard_check(args):
    text = _read_arg_text(args.input)
    guard = _guard_of(args.policy)
    if args.review_db is not None:
        from llmkit.trust.review import ReviewQueue, default_review_db

        guard.review = ReviewQueue(args.review_db or default_review_db(), policy=args.policy)
    v = guard.check(text, args.direction)
    if args.json:
        print(json.dumps({"action": v.action, "categories": v.categories,
                          "findings": [f.to_dict() for f in v.findings], "text": v.text}, ensure_ascii=False))
        return 0
    for f in v.findings:
        print(f"{f.type}\t{f.start}-{f.end}\t{f.score:.2f}\t{f.text}")
    print(f"action: {v.action}" + (f" ({', '.join(v.categories)})" if v.categories else ""))
    if v.action == "redact":
        print(v.text)
    return 0


def cmd_guard_eval(args):
    from llmkit.trust.guard import evaluate_guard, read_labeled

    records = read_labeled(args.data)
    res = evaluate_guard(_guard_of(args.policy), records)
    res.update(task="guard_eval", data=str(args.data), policy=args.policy)
    if args.out:
        from llmkit.utils.io import write_results

        write_results(args.out, res)
    print("| type | precision | recall | f1 | tp | fp | fn |\n|---|---:|---:|---:|---:|---:|---:|")
    for t, m in {**res["per_type"], "all (micro)": res["micro"]}.items():
        print(f"| {t} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['tp']} | {m['fp']} | {m['fn']} |")
    print(f"{res['n']} records, {res['mb_per_s']} MB/s", file=sys.stderr)
    return 0


def cmd_guard_review(args):
    from llmkit.trust.review import ReviewQueue, default_review_db

    path = Path(args.review_db) if args.review_db else default_review_db()
    if not path.is_file():
        raise ValueError(f"no review database at {path}: `llmkit serve --guard POLICY` (or `guard check --review-db`)"
                         " creates it when the policy flags a text; give --review-db")
    queue = ReviewQueue(path)
    if args.export:
        n = queue.export_labeled(args.export)
        print(f"wrote {n} reviewed items to {args.export} (`llmkit guard eval --data {args.export}` reads it)",
              file=sys.stderr)
        return 0
    import uvicorn

    from llmkit.serve.review import create_review_app

    checks.port(args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving the review page on {args.host} without --api-key", file=sys.stderr)
    import socket

    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port or --host") \
            from None
    c, port = queue.counts(), sock.getsockname()[1]
    print(f"llmkit review of {path} ({c['pending']} pending) on http://{args.host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_review_app(queue, args.api_key), log_level="warning"))
    server.run(sockets=[sock])
    return 0
