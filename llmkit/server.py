"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching scheduler, plus the web chat page.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize, POST /detokenize,
GET /metrics (Prometheus text), GET /health (503 while loading), GET / (web/index.html). Request bodies are
validated by hand so every mistake gets OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.engine import Engine, SamplingParams
from llmkit.safety import RequestGuard, check_inputs, refusal_response
from llmkit.scheduler import QueueFull, Request as GenRequest, Scheduler

WEB = Path(__file__).parent / "web"
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ServeConfig:
    """Everything `llmkit serve` can be told."""
    models: dict = field(default_factory=lambda: {"default": "default"})  # name -> spec (path, "default") or LoadedModel
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting for a row; beyond that 429
    max_tokens_cap: int = 4096  # the most new tokens one request may ask for
    max_n: int = 8  # the most choices per request
    max_body_bytes: int = 4 << 20
    cors_origins: list = field(default_factory=list)
    dtype: str | None = None
    device: str = "cpu"
    guard: str | None = None  # policy YAML (llmkit.safety): inputs checked, outputs guarded while streaming


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class Served:
    """One model being served."""
    name: str
    engine: Engine
    scheduler: Scheduler

    @property
    def context(self) -> int:
        return self.engine.config.max_position_embeddings


# ---------------------------------------------------------------------------------------------------------------
# Request parsing: one helper per field type, each naming the field in its error


def _field(body: dict, name: str, kind, default=None, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise APIError(400, f"'{name}' must be of type {kind.__name__}, got {type(v).__name__}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return float(v) if kind is float else v


def _sampling(body: dict, logprobs: bool, top_logprobs: int) -> dict:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    return dict(
        temperature=_field(body, "temperature", float, 1.0, 0, 2), top_p=_field(body, "top_p", float, 1.0, 0, 1),
        top_k=max(0, _field(body, "top_k", int, 0, -1)), min_p=_field(body, "min_p", float, 0.0, 0, 1),
        repetition_penalty=_field(body, "repetition_penalty", float, 1.0, 0.01, 10),
        presence_penalty=_field(body, "presence_penalty", float, 0.0, -2, 2),
        frequency_penalty=_field(body, "frequency_penalty", float, 0.0, -2, 2),
        seed=_field(body, "seed", int), ignore_eos=_field(body, "ignore_eos", bool, False), stop=[s for s in stop or [] if s], logprobs=logprobs, top_logprobs=top_logprobs)


def _params(kw: dict, max_new: int, seed_offset: int) -> SamplingParams:
    kw = dict(kw, max_new_tokens=max(max_new, 1))
    if kw["seed"] is not None:
        kw["seed"] += seed_offset  # n > 1 with a seed: different choices, each reproducible
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise APIError(400, str(e), str(e).split()[0]) from None


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m["role"] not in ROLES:
            raise APIError(400, f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content or ""})
    return out


def _max_tokens(body: dict, prompt_len: int, m: Served, cap: int, default: int | None, lo: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _field(body, name, int, None, lo, cap)
    room = m.context - prompt_len
    if n is None:
        n = min(cap, room) if default is None else min(default, room)
        if room < max(lo, 1):
            raise APIError(400, f"the prompt has {prompt_len} tokens but the context window is {m.context}; "
                           "shorten the prompt", "messages", "context_length_exceeded")
    elif prompt_len + n > m.context:
        raise APIError(400, f"prompt ({prompt_len} tokens) + {name} ({n}) = {prompt_len + n} exceeds the context "
                       f"window of {m.context} tokens; shorten the prompt or lower {name}", name,
                       "context_length_exceeded")
    return n


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI app; models load in a background thread (GET /health answers 503 until they are ready)."""
    state = {"models": {}, "error": None, "ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="llmkit-load", daemon=True).start()
        yield
        for m in state["models"].values():
            m.scheduler.close()

    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    stats = {"http_requests": 0}
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"], allow_headers=["*"])

    def load():
        try:
            from llmkit.checkpoint import load_model

            for name, spec in cfg.models.items():
                lm = spec if hasattr(spec, "model") else load_model(spec, dtype=cfg.dtype, device=cfg.device)
                if lm.tokenizer is None:
                    raise ValueError(f"model {name!r} ({lm.path}) has no tokenizer; the server needs one")
                engine = Engine(lm.model, lm.tokenizer, lm.generation_config)
                state["models"][name] = Served(name, engine, Scheduler(engine, cfg.max_batch, cfg.max_queue))
            if cfg.guard:
                from llmkit.safety import Guard

                state["guard"] = Guard.from_file(cfg.guard)
            state["ready"] = True
        except Exception as e:  # reported by /health and every route, instead of a silent dead server
            state["error"] = f"{type(e).__name__}: {e}"

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    # -----------------------------------------------------------------------------------------------------------
    async def body_of(request: Request, auth: bool = True) -> dict:
        if auth:
            check_key(request)
        stats["http_requests"] += 1
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
        if not raw:
            raise APIError(400, "empty request body: send a JSON object")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def check_key(request: Request):
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def model_of(body: dict) -> Served:
        if state["error"]:
            raise APIError(503, f"model failed to load: {state['error']}")
        if not state["ready"]:
            raise APIError(503, "model is loading; retry in a few seconds")
        name = body.get("model")
        models = state["models"]
        if name is None:
            return next(iter(models.values()))
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", "model")
        if name not in models:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(models)}", "model",
                           "model_not_found")
        return models[name]

    def run(m: Served, prompts: list[list[int]], kw: dict, max_new: int, n: int, **extra):
        """Submit n requests per prompt; yields (index, event) until every one is done."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        reqs = []
        for p in prompts:
            for j in range(n):
                i = len(reqs)
                emit = (lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev)))
                reqs.append(GenRequest(p, _params(kw, max_new, j), max_new, emit, **extra))
        try:
            m.scheduler.submit(reqs)
        except QueueFull as e:
            raise APIError(429, str(e), code="server_busy") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return reqs, q

    def guarded(kind: str, fn, *a):
        """Run a guard step; any failure inside the guard is a 500 for this request alone."""
        try:
            return fn(*a)
        except Exception as e:
            logging.getLogger("llmkit.server").exception("guard failed on %s", kind)
            raise APIError(500, f"guard failed on the {kind}: {type(e).__name__}: {e}") from None

    def guard_input(items: list, head: dict, chat: bool, stream: bool):
        """None, or the refusal to send instead of generating; items (messages or prompts) are redacted in place."""
        g = state.get("guard")
        if g is None or guarded("input", check_inputs, g, items, chat) is None:
            return None
        body = refusal_response(head, g.policy.refusal_message, chat, stream)
        if not stream:
            return body
        sse = "".join(_sse(c) for c in body) + "data: [DONE]\n\n"
        return StreamingResponse(iter([sse]), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def events(m: Served, request: Request, reqs, q, poll_disconnect: bool, rg=None):
        left = len(reqs)
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return
                    continue
                if ev[0] == "error":
                    raise APIError(500, ev[1])
                for ev in guarded("output", rg.events, i, ev) if rg is not None else [ev]:
                    if ev[0] == "done":
                        left -= 1
                        if ev[1] == "content_filter":
                            m.scheduler.cancel([reqs[i]])
                    yield i, ev
        finally:  # client gone, error or finished: free every row this request still holds
            m.scheduler.cancel([r for r in reqs if r.finish_reason is None])

    # -----------------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        m = model_of(body)
        msgs = _messages(body)
        n = _field(body, "n", int, 1, 1, cfg.max_n)
        want_lp = _field(body, "logprobs", bool, False)
        top = _field(body, "top_logprobs", int, 0, 0, 20)
        kw = _sampling(body, want_lp or top > 0, top)
        fmt = body.get("response_format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object"):
            raise APIError(400, "'response_format' must be {'type': 'text'} or {'type': 'json_object'}",
                           "response_format")
        stream = _field(body, "stream", bool, False)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": m.name, "system_fingerprint": "llmkit"}
        refusal = guard_input(msgs, head, True, stream)
        if refusal is not None:
            return refusal
        try:
            ids = m.engine.chat_prompt_ids(msgs)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        max_new = _max_tokens(body, len(ids), m, cfg.max_tokens_cap, None, 1)
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        reqs, q = run(m, [ids], kw, max_new, n, json_mode=fmt["type"] == "json_object")
        rg = RequestGuard(state["guard"], len(reqs)) if state.get("guard") else None
        reason = (lambda i, r: rg.finish_reason(i, r.finish_reason)) if rg else (lambda i, r: r.finish_reason)
        show_lp = kw["logprobs"] and not (rg and rg.hides_logprobs)

        def usage():
            done = sum(len(r.state.token_ids) for r in reqs)
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        if not stream:
            async for _ in events(m, request, reqs, q, poll_disconnect=True, rg=rg):
                pass
            choices = [{"index": i, "message": {"role": "assistant", "content": rg.texts[i] if rg else r.state.text},
                        "logprobs": _chat_logprobs(r.state.logprobs) if show_lp else None,
                        "finish_reason": reason(i, r)} for i, r in enumerate(reqs)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage()}

        async def sse():
            chunk = {**head, "object": "chat.completion.chunk"}
            sent_lp = [0] * len(reqs)
            for i in range(len(reqs)):
                yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            try:
                async for i, ev in events(m, request, reqs, q, poll_disconnect=False, rg=rg):
                    r = reqs[i]
                    lp = None
                    if show_lp and r.state.logprobs is not None:
                        lp = _chat_logprobs(r.state.logprobs[sent_lp[i]:])
                        sent_lp[i] = len(r.state.logprobs)
                    if ev[0] == "piece":
                        c = {"index": i, "delta": {"content": ev[1]}, "logprobs": lp, "finish_reason": None}
                    else:
                        c = {"index": i, "delta": {}, "logprobs": lp, "finish_reason": reason(i, r)}
                    yield _sse({**chunk, "choices": [c]})
            except APIError as e:
                yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            if usage_in_stream:
                yield _sse({**chunk, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        m = model_of(body)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": m.name}
        if isinstance(body.get("prompt"), (str, list)) and state.get("guard"):
            texts = [body["prompt"]] if isinstance(body["prompt"], str) else list(body["prompt"])
            refusal = guard_input(texts, head, False, _field(body, "stream", bool, False))
            if refusal is not None:
                return refusal
            body["prompt"] = texts if isinstance(body["prompt"], list) else texts[0]
        prompts = _prompts(body, m)
        n = _field(body, "n", int, 1, 1, cfg.max_n)
        top = _field(body, "logprobs", int, None, 0, 20)
        echo = _field(body, "echo", bool, False)
        kw = _sampling(body, top is not None, top or 0)
        stream = _field(body, "stream", bool, False)
        longest = max(len(p) for p in prompts)
        max_new = _max_tokens(body, longest, m, cfg.max_tokens_cap, 16, 0)
        if max_new == 0 and stream:
            raise APIError(400, "'max_tokens': 0 needs stream false", "max_tokens")
        reqs, q = run(m, prompts, kw, max_new, n, prompt_logprobs=echo and top is not None)
        rg = RequestGuard(state["guard"], len(reqs)) if state.get("guard") else None
        reason = (lambda i, r: rg.finish_reason(i, r.finish_reason)) if rg else (lambda i, r: r.finish_reason)
        if rg and rg.hides_logprobs:
            top = None
        tok = m.engine.tok
        n_prompt = sum(len(p) for p in prompts)

        def usage():
            done = sum(len(r.state.token_ids) for r in reqs)
            return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}

        if not stream:
            async for _ in events(m, request, reqs, q, poll_disconnect=True, rg=rg):
                pass
            choices = []
            for i, r in enumerate(reqs):
                prefix = tok.decode(r.prompt_ids) if echo else ""
                lp = _completion_logprobs(r, tok, echo, prefix) if top is not None else None
                choices.append({"index": i, "text": prefix + (rg.texts[i] if rg else r.state.text), "logprobs": lp,
                                "finish_reason": reason(i, r)})
            return {**head, "choices": choices, "usage": usage()}

        async def sse():
            if echo:
                for i, r in enumerate(reqs):
                    yield _sse({**head, "choices": [{"index": i, "text": tok.decode(r.prompt_ids), "logprobs": None,
                                                     "finish_reason": None}]})
            try:
                async for i, ev in events(m, request, reqs, q, poll_disconnect=False, rg=rg):
                    r = reqs[i]
                    text, why = (ev[1], None) if ev[0] == "piece" else ("", reason(i, r))
                    yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": None,
                                                     "finish_reason": why}]})
            except APIError as e:
                yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -----------------------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        model_of({})
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "llmkit", "max_model_len": m.context}
                for m in state["models"].values()]
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        m = model_of(body)
        if "messages" in body:
            ids = m.engine.chat_prompt_ids(_messages(body))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' (a string) or 'messages' is required", "prompt")
            ids = m.engine.tok.encode(prompt, add_special_tokens=_field(body, "add_special_tokens", bool, True))
        return {"tokens": ids, "count": len(ids), "max_model_len": m.context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        m = model_of(body)
        ids = body.get("tokens")
        vocab = m.engine.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                for i in ids):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        return {"prompt": m.engine.tok.decode(ids)}

    @app.get("/health")
    async def health():
        if state["error"]:
            return JSONResponse({"status": "error", "error": state["error"]}, status_code=503)
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "api_key_required": cfg.api_key is not None}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)
        text = _prometheus(state["models"], stats)
        if state.get("guard") is not None:
            text += "\n".join(state["guard"].metrics_lines()) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html")

    @app.get("/web/{name}")
    async def web_file(name: str):
        path = WEB / name
        if name not in ("app.js", "style.css", "tokens.js") or not path.exists():
            raise APIError(404, f"no such file: /web/{name}")
        return FileResponse(path)

    app.state.llmkit = state
    return app


def _prompts(body: dict, m: Served) -> list[list[int]]:
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "'prompt' is required: a string, a list of strings, or token ids", "prompt")
    is_ids = lambda x: isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
    if isinstance(p, str) or is_ids(p):
        p = [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
        raise APIError(400, "'prompt' must be a string, a list of strings, or a list of token id lists", "prompt")
    if len(p) > 64:
        raise APIError(400, f"at most 64 prompts per request, got {len(p)}", "prompt")
    out = [m.engine.tok.encode(x) if isinstance(x, str) else x for x in p]
    vocab = m.engine.config.vocab_size
    if any(not ids or min(ids) < 0 or max(ids) >= vocab for ids in out):
        raise APIError(400, f"every prompt needs at least one token, with ids in [0, {vocab})", "prompt")
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_logprobs(entries) -> dict:
    def one(tok, lp):
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, v) for t, v in e["top_logprobs"]]}
                        for e in entries]}


def _completion_logprobs(r, tok, echo: bool, prefix: str) -> dict:
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


def _prometheus(models: dict, http: dict) -> str:
    lines = ["# TYPE llmkit_http_requests_total counter", f"llmkit_http_requests_total {http['http_requests']}"]
    series = [("requests_total", "counter", lambda s: s.stats.requests),
              ("requests_rejected_total", "counter", lambda s: s.stats.rejected),
              ("prompt_tokens_total", "counter", lambda s: s.stats.prompt_tokens),
              ("generation_tokens_total", "counter", lambda s: s.stats.generated_tokens),
              ("queue_length", "gauge", lambda s: s.queue_length),
              ("running_batch_size", "gauge", lambda s: s.batch_size)]
    for name, kind, get in series:
        lines.append(f"# TYPE llmkit_{name} {kind}")
        lines += [f'llmkit_{name}{{model="{m.name}"}} {get(m.scheduler)}' for m in models.values()]
    for name, attr in (("time_to_first_token_seconds", "ttft"), ("time_per_output_token_seconds", "tpot")):
        lines.append(f"# TYPE llmkit_{name} histogram")
        for m in models.values():
            h = getattr(m.scheduler.stats, attr)
            lab = f'model="{m.name}"'
            lines += [f'llmkit_{name}_bucket{{{lab},le="{b}"}} {c}' for b, c in zip(h.buckets, h.counts)]
            lines += [f'llmkit_{name}_bucket{{{lab},le="+Inf"}} {h.count}',
                      f"llmkit_{name}_sum{{{lab}}} {h.sum:.6f}", f"llmkit_{name}_count{{{lab}}} {h.count}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Running it


class BackgroundServer:
    """uvicorn in a thread on an already-bound loopback socket (tests, benchmarks): `.url`, `.stop()`."""

    def __init__(self, cfg: ServeConfig, wait_ready: float = 300):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((cfg.host, cfg.port))
        self.url = f"http://{cfg.host}:{self.sock.getsockname()[1]}"
        self.app = create_app(cfg)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + wait_ready
        st = self.app.state.llmkit
        while not st["ready"] and not st["error"] and time.time() < deadline:
            time.sleep(0.05)
        if st["error"]:
            self.stop()
            raise ValueError(st["error"])
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(cfg: ServeConfig):
    """Run the server in the foreground until Ctrl-C."""
    import uvicorn

    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach it can use it")
    print(f"llmkit serving {', '.join(cfg.models)} on http://{cfg.host}:{cfg.port} (web chat at /, API at /v1)",
          flush=True)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")
