"""`llmkit generate` and `llmkit chat`: text from a prompt, and a multi-turn chat, streamed to stdout."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import model_flags, sampling_flags


def add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    model_flags(p)
    sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="constrain the output to one JSON object (JSON mode)")
    p.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the output to JSON that validates "
                   "against this JSON schema file (max tokens are kept for closing it)")
    p.set_defaults(handler=cmd_generate)


def _guard(args):
    from llmkit.trust.guard import Guard

    return Guard.from_file(args.guard) if args.guard else None


def cmd_generate(args):
    params = common.params(args)  # bad sampling flags fail before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise ValueError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb}")
    if args.json and args.json_schema:
        raise ValueError("--json and --json-schema exclude each other; --json-schema already asks for JSON")
    schema = _read_schema(args.json_schema) if args.json_schema else None  # before the model loads: fail fast
    guard = _guard(args)  # a bad policy fails before the model loads
    lm = common.load(args, checks.generative)
    engine = common.engine(lm, args)
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
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"--json-schema: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema: {path} is not valid JSON: {e}") from None


def _json_processors(engine, params, schema=None) -> list:
    """--json (any JSON object) or --json-schema: one grammar processor (llmkit.infer.constraints) for the decode
    core."""
    from llmkit.infer.constraints import json_object, json_schema

    proc = json_object(engine) if schema is None else json_schema(engine, schema)
    need = proc.closing()
    if need is not None and len(need) > params.max_new_tokens:
        raise ValueError(f"--max-new-tokens {params.max_new_tokens} is too small for the shortest JSON this schema "
                         f"allows ({len(need)} tokens)")
    return [proc]



def add_chat(sub):
    p = sub.add_parser("chat", help="multi-turn chat with the model's own template (/reset, /exit)")
    model_flags(p)
    sampling_flags(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(handler=cmd_chat)


def cmd_chat(args):
    guard = _guard(args)
    params = common.params(args, default_temperature=0.0 if not sys.stdin.isatty() else 0.7)
    lm = common.load(args, checks.generative)
    engine = common.engine(lm, args)
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
