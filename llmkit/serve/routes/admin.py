"""GET /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics, the web page."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from llmkit.serve.protocol import ChatRequest, DetokenizeRequest, TokenizeRequest
from llmkit.serve.routes.chat import chat_prompt
from llmkit.serve.metrics import render
from llmkit.serve.state import APIError, authorize, state_of

WEB = Path(__file__).parents[2] / "web"
router = APIRouter()


@router.get("/v1/models")
async def models(request: Request, key=Depends(authorize)):
    st = state_of(request)
    st.model(None)
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "llmkit", "max_model_len": m.context}
            for m in st.models.values()]
    return {"object": "list", "data": data}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request, key=Depends(authorize)):
    m = state_of(request).model(req.model)
    if req.messages is not None:
        ids = await run_in_threadpool(chat_prompt, m, ChatRequest(messages=req.messages))
    else:
        ids = await run_in_threadpool(m.engine.tok.encode, req.prompt, req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": m.context}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request, key=Depends(authorize)):
    m = state_of(request).model(req.model)
    vocab = m.engine.config.vocab_size
    if any(i >= vocab for i in req.tokens):
        raise APIError(400, f"'tokens' must be token ids in [0, {vocab})", "tokens")
    return {"prompt": await run_in_threadpool(m.engine.tok.decode, req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None, key=Depends(authorize)):
    """What lm-eval's remote tokenizer backend (and vLLM's endpoint) report: special tokens and the chat template."""
    m = state_of(request).model(model)
    tok = m.engine.tok
    special = getattr(tok, "special_tokens", {}) or {}
    return {"tokenizer_class": type(tok).__name__, "model_max_length": m.context, "vocab_size": tok.vocab_size,
            "eos_token": special.get("eos_token"), "bos_token": special.get("bos_token"),
            "pad_token": special.get("pad_token"), "unk_token": special.get("unk_token"),
            "chat_template": getattr(tok, "chat_template", None)}


@router.get("/health")
async def health(request: Request):
    st = state_of(request)
    if st.error:
        return JSONResponse({"status": "error", "error": st.error}, status_code=503)
    if not st.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    dead = st.check_schedulers()
    if dead:  # replaced just now; this answer still says it was down
        return JSONResponse({"status": "restarting", "restarted": dead}, status_code=503)
    return {"status": "ok", "api_key_required": st.keys is not None}


@router.get("/metrics")
async def metrics(request: Request, key=Depends(authorize)):
    return Response(render(request.app.state.metrics), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/")
async def index():
    return FileResponse(WEB / "index.html")


@router.get("/web/{name}")
async def web_file(name: str):
    path = WEB / name
    if name not in ("app.js", "style.css", "tokens.js") or not path.exists():
        raise APIError(404, f"no such file: /web/{name}")
    return FileResponse(path)
