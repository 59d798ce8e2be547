"""What the server's routes share: configuration, served models, errors, dependencies (auth, model lookup), the body
limit, and the scheduler supervisor.

Errors: every failure becomes OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status.
Scheduler threads: if one dies (it catches per-step errors itself, so this is a bug or resource exhaustion), every
request it held gets an error event, /health answers 503 until a fresh scheduler for the same engine has replaced it
(the supervisor checks every second and on each /health), and llmkit:scheduler_restarts_total counts it.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from llmkit.infer.compiled import build_if_missing
from llmkit.infer.engine import Engine
from llmkit.infer.scheduler import Scheduler
from llmkit.serve.auth import Key, KeyRing, RateLimited, read_key_file
from llmkit.serve.metrics import HttpCounters
from llmkit.trust.guard import Guard
from llmkit.trust.review import ReviewQueue

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


@dataclass
class ServeConfig:
    """Everything `llmkit serve` can be told."""
    models: dict = field(default_factory=lambda: {"default": "default"})  # name -> path, "default" or LoadedModel
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str | None = None  # keys with optional rpm/tpm limits (llmkit.serve.auth)
    max_batch: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting for a row; beyond that 429
    max_tokens_cap: int = 4096  # the most new tokens one request may ask for
    max_n: int = 8  # the most choices per request
    max_body_bytes: int = 4 << 20
    cors_origins: list = field(default_factory=list)
    dtype: str | None = None
    device: str = "cpu"
    embedding_pooling: str = "auto"  # llmkit.infer.embed: auto|mean|last|cls
    kv_cache_mb: float | None = None  # per model; None: max_batch rows of up to 1,024 tokens (kvpool)
    batch_invariant: bool = False  # each request's tokens as if it ran alone (engine.DecodeBatch)
    speculative: object = None  # "ngram" or a draft model (folder or Transformer): speculative decoding for greedy
    # requests, the same tokens as without it (infer/speculative.py)
    draft_tokens: int = 4  # tokens drafted per step with speculative
    compile: str = "off"  # the compiled batch-1 decode step (infer/compiled.py): "auto" (cached, else built in the
    # background), "on" (built before serving) or "off"
    guard: str | None = None  # policy YAML (llmkit.trust.guard): inputs checked, outputs guarded while streaming
    review_db: str | None = None  # SQLite file the guard's `flag` action queues texts in (llmkit.trust.review)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


@dataclass
class EncoderEngine:
    """What the routes read of an Engine, for an encoder (BERT-style): it only embeds, so no KV cache and no
    scheduler."""
    model: object
    tok: object
    config: object


@dataclass
class Served:
    """One model being served: its engine, scheduler and caches of compiled grammars (an encoder: an EncoderEngine
    and no scheduler)."""
    name: str
    engine: Engine | EncoderEngine
    scheduler: Scheduler | None
    grammars: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    grammar_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context(self) -> int:
        return self.engine.config.max_position_embeddings

    @property
    def encoder(self) -> bool:
        return self.scheduler is None

    def generative(self, what: str) -> "Served":
        """This model, if it generates text; an encoder answers 400 (it serves /v1/embeddings only)."""
        if self.encoder:
            raise APIError(400, f"model {self.name!r} is an encoder (a masked, BERT-style language model): it serves "
                           f"/v1/embeddings only, not {what}; serve a causal (decoder) model for text generation",
                           "model", "model_not_generative")
        return self


class ServerState:
    """Models (loaded in a background thread), keys, counters; shared by every route through app.state.llmkit."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.models: dict[str, Served] = {}
        self.guard = None  # llmkit.trust.guard.Guard, loaded with the models when cfg.guard names a policy
        self.error: str | None = None
        self.ready = False
        self.http = HttpCounters()
        keys = read_key_file(cfg.api_key_file) if cfg.api_key_file else []
        if cfg.api_key:
            keys.append(Key(cfg.api_key, "api-key"))
        self.keys = KeyRing(keys) if keys else None
        self._stop = threading.Event()
        self.lock = threading.Lock()

    def __getitem__(self, name):  # older callers read app.state.llmkit["models"] / ["ready"] / ["error"]
        return getattr(self, name)

    # -----------------------------------------------------------------------------------------------------------
    def load(self):
        """Load every model and start its scheduler (runs in a thread; failures are reported by /health)."""
        try:
            from llmkit.model.checkpoint import load_model  # looked up per load: tests patch it

            for name, spec in self.cfg.models.items():
                lm = spec if hasattr(spec, "model") else load_model(spec, dtype=self.cfg.dtype, device=self.cfg.device)
                if lm.tokenizer is None:
                    raise ValueError(f"model {name!r} ({lm.path}) has no tokenizer; the server needs one")
                if not lm.model.config.causal:  # an encoder: embeddings only
                    self.models[name] = Served(name, EncoderEngine(lm.model, lm.tokenizer, lm.model.config), None)
                    continue
                draft = self.cfg.speculative  # "ngram", None, a draft model folder (loaded per served model)
                if isinstance(draft, str) and draft != "ngram":
                    draft = load_model(draft, dtype=self.cfg.dtype, device=self.cfg.device).model
                mode = {"on": True, "auto": "cached", "off": False}[self.cfg.compile] if draft is None else False
                engine = Engine(lm.model, lm.tokenizer, lm.generation_config, kv_cache_mb=self.cfg.kv_cache_mb,
                                max_batch=self.cfg.max_batch, compile=mode,
                                batch_invariant=self.cfg.batch_invariant, speculative=draft,
                                draft_tokens=self.cfg.draft_tokens)
                note = build_if_missing(engine, spec, self.cfg.dtype) if mode == "cached" else None
                if note:
                    print(f"{name}: {note}", flush=True)
                self.models[name] = Served(name, engine, self._scheduler(engine))
                print(f"{name}: {engine.pool.describe()}", flush=True)
            if self.cfg.guard:
                self.guard = Guard.from_file(self.cfg.guard)
                if self.cfg.review_db:
                    self.guard.review = ReviewQueue(self.cfg.review_db, policy=str(self.cfg.guard))
            self.ready = True
            threading.Thread(target=self._watch, name="llmkit-supervisor", daemon=True).start()
        except Exception as e:  # reported by /health and every route, instead of a silent dead server
            self.error = f"{type(e).__name__}: {e}"

    def _scheduler(self, engine: Engine) -> Scheduler:
        return Scheduler(engine, self.cfg.max_batch, self.cfg.max_queue)

    def close(self):
        self._stop.set()
        for m in self.models.values():
            if m.scheduler is not None:
                m.scheduler.close()

    def _watch(self):
        while not self._stop.wait(1.0):
            self.check_schedulers()

    def check_schedulers(self) -> list[str]:
        """Replace dead scheduler threads; returns the names of the models whose scheduler was dead."""
        dead = []
        with self.lock:
            for m in self.models.values():
                if m.scheduler is None or m.scheduler.thread.is_alive() or m.scheduler._closed:
                    continue
                dead.append(m.name)
                old = m.scheduler
                for r in list(old.running.values()) + list(old.waiting):
                    if r.finish_reason is None and not r.cancelled:
                        r.emit(("error", "the scheduler thread died; retry the request"))
                for rid in list(old.running):  # their KV blocks go back to the engine's pool, which outlives it
                    old.core.cancel(rid)
                m.scheduler = self._scheduler(m.engine)
                self.http.count("restart")
        return dead

    # -----------------------------------------------------------------------------------------------------------
    def model(self, name: str | None) -> Served:
        """The served model of that name (the first one if None); 503 while loading, 404 if unknown."""
        if self.error:
            raise APIError(503, f"model failed to load: {self.error}")
        if not self.ready:
            raise APIError(503, "model is loading; retry in a few seconds")
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(self.models)}", "model",
                           "model_not_found")
        return self.models[name]


def state_of(request: Request) -> ServerState:
    return request.app.state.llmkit


def authorize(request: Request) -> Key | None:
    """FastAPI dependency: the caller's key (None when the server needs none); 401 without one, 429 over a limit."""
    st = state_of(request)
    st.http.count("request")
    if st.keys is None:
        return None
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    key = st.keys.find(token)
    if key is None:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    try:
        st.keys.admit(key)
    except RateLimited as e:
        st.http.count("rejected", "rate_limit")
        raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from None
    return key


# ---------------------------------------------------------------------------------------------------------------
# Body limit: counted while reading, so chunked uploads (no Content-Length) are held to it too


class BodyLimit:
    """ASGI middleware: reads a request body up to max_bytes before the app sees it; larger bodies get 413.

    The rest of an oversized body is read and dropped (up to DRAIN_FACTOR x the limit, then the connection closes),
    so the client receives the 413 response instead of a connection reset.
    """
    DRAIN_FACTOR = 16

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        chunks, size, more = [], 0, True
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(receive, send, 0, f"request body of {int(declared)} bytes")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(receive, send, size if more else -1, "request body")
            chunks.append(body)
        data = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, receive, send, read: int, what: str):
        if self.on_reject:
            self.on_reject()
        drained = max(read, 0)
        while read >= 0 and drained <= self.DRAIN_FACTOR * self.max_bytes:  # -1: the whole body was read already
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                break
            drained += len(msg.get("body", b""))
        resp = error_response(413, f"{what} exceeds the limit of {self.max_bytes} bytes",
                              headers={"Connection": "close"})
        await resp({"type": "http"}, receive, send)
