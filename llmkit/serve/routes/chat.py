"""POST /v1/chat/completions and POST /v1/completions: validate, build the prompt off the event loop, queue the rows
on the model's scheduler, and answer as one JSON body or as server-sent events.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmkit.serve import tools as toolcalls
from llmkit.serve.protocol import ChatRequest, CompletionRequest, Sampling
from llmkit.infer.engine import SamplingParams
from llmkit.trust.guard import RequestGuard, check_inputs, refusal_response
from llmkit.trust.review import REQUEST_ID
from llmkit.infer.scheduler import QueueFull, Request as GenRequest
from llmkit.serve.constraints import Constraint, build_constraint
from llmkit.serve.auth import RateLimited
from llmkit.serve.state import APIError, Served, authorize, error_body, state_of

router = APIRouter()
SAMPLING_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Shared by both routes


def sampling_kwargs(req: Sampling, logprobs: bool, top_logprobs: int) -> dict:
    """SamplingParams fields from a request (OpenAI's defaults where a field is absent)."""
    def get(name, default):
        v = getattr(req, name)
        return default if v is None else v

    # like vLLM: a temperature under 1e-5 means greedy, and top_p is floored at 1e-5; dividing by 1e-300 or a top_p
    # that rounds to 0 in float32 leaves no token to sample (NaN probabilities)
    temperature, top_p = get("temperature", 1.0), get("top_p", 1.0)
    return dict(temperature=0.0 if temperature < SAMPLING_EPS else temperature, top_p=max(top_p, SAMPLING_EPS),
                top_k=max(0, get("top_k", 0)),
                min_p=get("min_p", 0.0), repetition_penalty=get("repetition_penalty", 1.0),
                presence_penalty=get("presence_penalty", 0.0), frequency_penalty=get("frequency_penalty", 0.0),
                seed=req.seed, ignore_eos=req.ignore_eos, stop=req.stops(), logprobs=logprobs,
                top_logprobs=top_logprobs)


def max_new_tokens(asked: int | None, name: str, prompt_len: int, m: Served, cap: int, default: int | None,
                   lo: int) -> int:
    """How many tokens to generate: the request's number, checked against the cap and the context window."""
    room = m.context - prompt_len
    if asked is None:
        n = min(cap, room) if default is None else min(default, room)
        if room < max(lo, 1):
            raise APIError(400, f"the prompt has {prompt_len} tokens but the context window is {m.context}; "
                           "shorten the prompt", "messages", "context_length_exceeded")
        return n
    if asked > cap:
        raise APIError(400, f"'{name}' must be at most {cap}, got {asked}", name)
    if prompt_len + asked > m.context:
        raise APIError(400, f"prompt ({prompt_len} tokens) + {name} ({asked}) = {prompt_len + asked} exceeds the "
                       f"context window of {m.context} tokens; shorten the prompt or lower {name}", name,
                       "context_length_exceeded")
    return asked


def row_processors(constraint: Constraint | None, rows: int) -> list[list]:
    """Fresh processors for each row (a matcher each; built in a worker thread: big grammars take a while)."""
    return [constraint.processors() if constraint else [] for _ in range(rows)]


def submit(m: Served, prompts: list[list[int]], kw: dict, max_new: int, n: int, processors: list[list], **extra):
    """Queue n rows per prompt (row i gets processors[i]); returns (requests, queue of (row index, event))."""
    rows, room = len(prompts) * n, m.scheduler.max_batch + m.scheduler.max_queue
    if rows > room:  # could never fit, however long the client waits: not a 429
        raise APIError(400, f"{rows} rows (prompts x n) exceed what this server holds at once ({room})", "n")
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    reqs = []
    for p in prompts:
        for j in range(n):
            i = len(reqs)
            emit = (lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev)))
            args = dict(kw, max_new_tokens=max(max_new, 1))
            if args["seed"] is not None:
                args["seed"] += j  # n > 1 with a seed: different choices, each reproducible
            try:
                params = SamplingParams(**args)
            except ValueError as e:
                raise APIError(400, str(e), str(e).split()[0]) from None
            reqs.append(GenRequest(p, params, max_new, emit, processors=processors[i], **extra))
    try:
        m.scheduler.submit(reqs)
    except QueueFull as e:
        raise APIError(429, str(e), code="server_busy", headers={"Retry-After": "1"}) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return reqs, q


def guarded(kind: str, fn, *a):
    """Run a guard step; any failure inside the guard is a 500 for this request alone (logged)."""
    try:
        return fn(*a)
    except Exception as e:
        logging.getLogger("llmkit.serve.app").exception("guard failed on the %s", kind)
        raise APIError(500, f"guard failed on the {kind}: {type(e).__name__}: {e}") from None


def guard_input(st, items: list, head: dict, chat: bool, stream: bool, tools: list | None = None):
    """None, or the refusal to answer instead of generating (llmkit.trust.guard); items (and the tool definitions
    offered to the model) are redacted in place."""
    g = st.guard
    if g is None:
        return None
    REQUEST_ID.set(head["id"])  # this thread's context: a flagged input is queued with the request id
    refused = guarded("input", check_inputs, g, items, chat)
    if refused is None and tools:
        checked, refused = guarded("input", g.check_tree, tools)
        tools[:] = checked
    if refused is None:
        return None
    body = refusal_response(head, g.policy.refusal_message, chat, stream)
    if not stream:
        return body
    text = "".join(sse(c) for c in body) + "data: [DONE]\n\n"
    return StreamingResponse(iter([text]), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def output_guard(st, n: int, request_id: str | None = None):
    """The request's output guard (one stream per row), or None without a policy."""
    return RequestGuard(st.guard, n, request_id) if st.guard is not None else None


async def _watch_disconnect(request: Request, q):
    """Put a "disconnect" event in q as soon as the client closes its connection (the body is read already, so the
    next ASGI message is the disconnect), so that a non-streaming request stops within one decode step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            q.put_nowait((None, ("disconnect",)))
            return


def hold_tokens(st, key, tokens: int):
    """Hold a request's prompt plus all it may generate against its key's tokens/minute (429 if they do not fit);
    events() settles the hold to what was used."""
    if st.keys is None:
        return None
    try:
        return st.keys.reserve(key, tokens)
    except RateLimited as e:
        st.http.count("rejected", "rate_limit")
        raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from None


async def events(request: Request, m: Served, reqs, q, hold, n_prompt: int, poll_disconnect: bool, rg=None):
    """(row index, event) until every row is done; frees the rows of a client that left, settles the key's tokens
    (hold: what hold_tokens reserved at admission).

    poll_disconnect: watch for the client leaving (non-streaming requests; a streaming response notices it when a
    write fails). rg (safety.RequestGuard): pieces pass through the output guard; a stream it stops ends with
    content_filter."""
    left = len(reqs)
    watcher = asyncio.create_task(_watch_disconnect(request, q)) if poll_disconnect else None
    try:
        while left:
            i, ev = await q.get()
            if ev[0] == "disconnect":
                return
            if ev[0] == "error":
                raise APIError(500, ev[1])
            for ev in guarded("output", rg.events, i, ev) if rg is not None else [ev]:
                if ev[0] == "done":
                    left -= 1
                    if ev[1] == "content_filter":
                        m.scheduler.cancel([reqs[i]])
                yield i, ev
    finally:  # client gone, error or finished: free every row this request still holds
        if watcher is not None:
            watcher.cancel()
        m.scheduler.cancel([r for r in reqs if r.finish_reason is None])
        st = state_of(request)
        if st.keys is not None:
            st.keys.settle(hold, n_prompt + sum(len(r.state.token_ids) for r in reqs if r.state is not None))


def usage(reqs, n_prompt: int) -> dict:
    done = sum(len(r.state.token_ids) for r in reqs if r.state is not None)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_response(gen) -> StreamingResponse:
    async def guarded():
        try:
            async for chunk in gen:
                yield chunk
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.param, e.code))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone: an error event is all a client can still get
            yield sse(error_body(500, f"{type(e).__name__}: {e}"))
            yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------------------
# Chat


def chat_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as the chat template reads them."""
    return [{"role": "system" if x.role == "developer" else x.role, "content": x.text(),
             **({"name": x.name} if x.name else {}),
             **({"tool_calls": [c.model_dump() for c in x.tool_calls]} if x.tool_calls else {}),
             **({"tool_call_id": x.tool_call_id} if x.tool_call_id else {})} for x in req.messages]


def offered_tools(req: ChatRequest) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.uses_tools() else None


def chat_prompt(m: Served, req: ChatRequest, msgs: list[dict] | None = None, tools: list | None = None) -> list[int]:
    """Token ids of the conversation (tools rendered natively or in the generic format); runs in a worker thread."""
    msgs = chat_messages(req) if msgs is None else msgs
    tok = m.engine.tok
    tools = offered_tools(req) if tools is None else tools
    msgs, extra = toolcalls.render_messages(msgs, tools, toolcalls.template_supports_tools(tok))
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **extra)
    except jinja2.TemplateError as e:
        raise APIError(400, f"the model's chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


def chat_choice(i: int, r, req: ChatRequest, want_lp: bool, rg=None) -> dict:
    text, calls = (rg.texts[i] if rg is not None else r.state.text), []
    if req.uses_tools():
        text, calls = toolcalls.parse_calls(text)
    msg = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    reason = r.finish_reason if rg is None else rg.finish_reason(i, r.finish_reason)
    reason = "tool_calls" if calls and reason == "stop" else reason
    return {"index": i, "message": msg, "logprobs": chat_logprobs(r.state.logprobs) if want_lp else None,
            "finish_reason": reason}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, key=Depends(authorize)):
    st = state_of(request)
    m = st.model(req.model).generative("/v1/chat/completions")
    if req.n > st.cfg.max_n:
        raise APIError(400, f"'n' must be at most {st.cfg.max_n}, got {req.n}", "n")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": m.name,
            "system_fingerprint": "llmkit"}
    msgs, tools = chat_messages(req), offered_tools(req)
    refusal = await run_in_threadpool(guard_input, st, msgs, head, True, req.stream, tools)
    if refusal is not None:
        return refusal
    ids = await run_in_threadpool(chat_prompt, m, req, msgs, tools)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = max_new_tokens(req.new_tokens(), name, len(ids), m, st.cfg.max_tokens_cap, None, 1)
    constraint = await run_in_threadpool(build_constraint, m, req, max_new)
    procs = await run_in_threadpool(row_processors, constraint, req.n)
    kw = sampling_kwargs(req, req.logprobs, req.top_logprobs or 0)
    hold = hold_tokens(st, key, len(ids) + req.n * max_new)
    reqs, q = submit(m, [ids], kw, max_new, req.n, procs)
    rg = output_guard(st, len(reqs), head["id"])
    want_lp = req.logprobs and not (rg is not None and rg.hides_logprobs)
    if not req.stream:
        async for _ in events(request, m, reqs, q, hold, len(ids), poll_disconnect=True, rg=rg):
            pass
        choices = [chat_choice(i, r, req, want_lp, rg) for i, r in enumerate(reqs)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(reqs, len(ids))}
    return stream_response(chat_stream(request, m, req, reqs, q, hold, ids, head, rg, want_lp))


async def chat_stream(request, m, req: ChatRequest, reqs, q, hold, ids, head, rg=None, want_lp=False):
    chunk = {**head, "object": "chat.completion.chunk"}
    sent_lp = [0] * len(reqs)
    calls = [toolcalls.CallStream() if req.uses_tools() else None for _ in reqs]

    def out(i, delta, lp=None, reason=None):
        return sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]})

    for i in range(len(reqs)):
        yield out(i, {"role": "assistant", "content": ""})
    async for i, ev in events(request, m, reqs, q, hold, len(ids), poll_disconnect=False, rg=rg):
        r, lp = reqs[i], None
        if want_lp and r.state.logprobs is not None:
            lp = chat_logprobs(r.state.logprobs[sent_lp[i]:])
            sent_lp[i] = len(r.state.logprobs)
        if ev[0] == "piece":
            deltas = calls[i].push(ev[1]) if calls[i] else [{"content": ev[1]}]
            for j, d in enumerate(deltas or ([{}] if lp else [])):
                yield out(i, d, lp if j == 0 else None)
            continue
        tail = calls[i].finish() if calls[i] else []
        for d in tail:
            yield out(i, d)
        reason = r.finish_reason if rg is None else rg.finish_reason(i, r.finish_reason)
        if calls[i] and calls[i].n and reason == "stop":
            reason = "tool_calls"
        yield out(i, {}, lp, reason)
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(reqs, len(ids))})
    yield "data: [DONE]\n\n"


def chat_logprobs(entries) -> dict:
    def one(tok, lp):
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8", "replace"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, v) for t, v in e["top_logprobs"]]}
                        for e in entries]}


# ---------------------------------------------------------------------------------------------------------------
# Completions


def completion_prompts(m: Served, req: CompletionRequest, texts: list | None = None) -> list[list[int]]:
    vocab = m.engine.config.vocab_size
    texts = req.prompts() if texts is None else texts
    out = [m.engine.tok.encode(x) if isinstance(x, str) else list(x) for x in texts]
    if any(not ids or max(ids) >= vocab for ids in out):
        raise APIError(400, f"every prompt needs at least one token, with ids in [0, {vocab})", "prompt")
    return out


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, key=Depends(authorize)):
    st = state_of(request)
    m = st.model(req.model).generative("/v1/completions")
    if req.n > st.cfg.max_n:
        raise APIError(400, f"'n' must be at most {st.cfg.max_n}, got {req.n}", "n")
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": m.name}
    texts = req.prompts()
    if st.guard is not None:  # token ids are decoded and checked as text; redacted ones are encoded again
        decoded = await run_in_threadpool(lambda: [x if isinstance(x, str) else m.engine.tok.decode(x) for x in texts])
        checked = list(decoded)
        refusal = await run_in_threadpool(guard_input, st, checked, head, False, req.stream)
        if refusal is not None:
            return refusal
        texts = [c if isinstance(x, str) or c != d else x for x, d, c in zip(texts, decoded, checked)]
    prompts = await run_in_threadpool(completion_prompts, m, req, texts)
    top = req.logprobs
    max_new = max_new_tokens(req.max_tokens, "max_tokens", max(len(p) for p in prompts), m, st.cfg.max_tokens_cap,
                             16, 0)
    if max_new == 0 and req.stream:
        raise APIError(400, "'max_tokens': 0 needs stream false", "max_tokens")
    constraint = await run_in_threadpool(build_constraint, m, req, max(max_new, 1))
    procs = await run_in_threadpool(row_processors, constraint, req.n * len(prompts))
    kw = sampling_kwargs(req, top is not None, top or 0)
    hold = hold_tokens(st, key, sum(len(p) for p in prompts) + req.n * len(prompts) * max_new)
    reqs, q = submit(m, prompts, kw, max_new, req.n, procs, prompt_logprobs=req.echo and top is not None)
    rg = output_guard(st, len(reqs), head["id"])
    if rg is not None and rg.hides_logprobs:
        top = None
    n_prompt = sum(len(p) for p in prompts)
    tok = m.engine.tok
    if not req.stream:
        async for _ in events(request, m, reqs, q, hold, n_prompt, poll_disconnect=True, rg=rg):
            pass
        choices = []
        for i, r in enumerate(reqs):
            prefix = tok.decode(r.prompt_ids) if req.echo else ""
            lp = completion_logprobs(r, tok, req.echo, prefix) if top is not None else None
            text = rg.texts[i] if rg is not None else r.state.text
            reason = r.finish_reason if rg is None else rg.finish_reason(i, r.finish_reason)
            choices.append({"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": reason})
        return {**head, "choices": choices, "usage": usage(reqs, n_prompt)}
    return stream_response(completion_stream(request, m, req, reqs, q, hold, n_prompt, head, rg))


async def completion_stream(request, m, req: CompletionRequest, reqs, q, hold, n_prompt, head, rg=None):
    tok = m.engine.tok
    if req.echo:
        for i, r in enumerate(reqs):
            yield sse({**head, "choices": [{"index": i, "text": tok.decode(r.prompt_ids), "logprobs": None,
                                            "finish_reason": None}]})
    async for i, ev in events(request, m, reqs, q, hold, n_prompt, poll_disconnect=False, rg=rg):
        reason = reqs[i].finish_reason if rg is None else rg.finish_reason(i, reqs[i].finish_reason)
        text, reason = (ev[1], None) if ev[0] == "piece" else ("", reason)
        yield sse({**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(reqs, n_prompt)})
    yield "data: [DONE]\n\n"


def completion_logprobs(r, tok, echo: bool, prefix: str) -> dict:
    """The legacy completions format (tokens, token_logprobs, top_logprobs, text_offset), prompt first with echo."""
    tokens, lps, tops = [], [], []
    if echo and r.prompt_scores is not None:
        for t, (lp, top) in zip(r.prompt_ids, r.prompt_scores):
            tokens.append(tok.decode([t]))
            lps.append(lp)
            tops.append({tok.decode([i]): v for i, v in top} if lp is not None else None)
    for e in r.state.logprobs or []:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append(dict(e["top_logprobs"]))
    offsets, pos = [], 0 if echo else len(prefix)
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
