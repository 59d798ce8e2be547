"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching scheduler, plus the web chat page.

Routes (one module each): routes_chat (POST /v1/chat/completions, /v1/completions), routes_embeddings
(POST /v1/embeddings), routes_admin (GET /v1/models, POST /tokenize, /detokenize, GET /tokenizer_info, /health,
/metrics, the web page). Request bodies are pydantic models (llmkit.serve.protocol); shared state, auth, limits and
errors are serve_state's. Every error, including validation errors, malformed JSON, chat template errors and
anything unexpected, is OpenAI's body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.serve.routes import admin as routes_admin

from llmkit.serve.routes import chat as routes_chat

from llmkit.serve.routes import embeddings as routes_embeddings
from llmkit.serve.metrics import registry
from llmkit.serve.state import APIError, ServeConfig, ServerState, error_response, BodyLimit

__all__ = ["ServeConfig", "create_app", "BackgroundServer", "serve", "APIError"]


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errs = e.errors()
    if not errs:
        return "invalid request body", None
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg')}", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", (loc[0] if loc else None)


def _install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        status = e.status_code if e.status_code >= 400 else 400
        message = "request body could not be parsed" if status == 400 else e.detail
        return error_response(status, f"{request.method} {request.url.path}: {message}")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still OpenAI's body, never a plain-text 500
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI app; models load in a background thread (GET /health answers 503 until they are ready)."""
    state = ServerState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="llmkit-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes,
                       on_reject=lambda: state.http.count("rejected", "body_too_large"))
    _install_error_handlers(app)
    for r in (routes_chat, routes_embeddings, routes_admin):
        app.include_router(r.router)
    app.state.llmkit = state
    app.state.metrics = registry(state.models, state.http, lambda: state.guard)
    return app


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
        while not st.ready and not st.error and time.time() < deadline:
            time.sleep(0.05)
        if st.error:
            self.stop()
            raise ValueError(st.error)
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(cfg: ServeConfig, sock=None):
    """Run the server in the foreground until Ctrl-C; `sock` is a socket already bound to the address (optional)."""
    import uvicorn

    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None and cfg.api_key_file is None:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach it can use it")
    port = sock.getsockname()[1] if sock is not None else cfg.port

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # said once the port listens: a script that waits for this line can connect
                print(f"llmkit serving {', '.join(cfg.models)} on http://{cfg.host}:{port} (web chat at /, "
                      "API at /v1)", flush=True)

    server = Server(uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning"))
    server.run(sockets=None if sock is None else [sock])
