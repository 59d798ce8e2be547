"""POST /v1/embeddings: pooled hidden states of the served model (decoder or encoder; llmkit.infer.embed), L2-normalised
unless the request says `"normalize": false`, float or base64."""
from __future__ import annotations

import base64

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from llmkit.serve.protocol import EmbeddingRequest
from llmkit.infer.embed import embed
from llmkit.serve.state import APIError, Served, authorize, state_of

router = APIRouter()


def _embed(m: Served, req: EmbeddingRequest, pooling: str):
    """(vectors, prompt tokens); runs in a worker thread, one embedding batch per model at a time."""
    tok, vocab = m.engine.tok, m.engine.config.vocab_size
    ids = [tok.encode(x) if isinstance(x, str) else list(x) for x in req.inputs()]
    for i, x in enumerate(ids):
        if not x or max(x) >= vocab:
            raise APIError(400, f"input[{i}] needs at least one token, with ids in [0, {vocab})", "input")
        if len(x) > m.context:
            raise APIError(400, f"input[{i}] has {len(x)} tokens; this model reads at most {m.context}", "input",
                           "context_length_exceeded")
    try:
        with m.embed_lock:
            vecs = embed(m.engine.model, ids, pooling, req.dimensions, normalize=req.normalize)
    except ValueError as e:
        raise APIError(400, str(e), "dimensions") from None
    return vecs, sum(len(x) for x in ids)


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request, key=Depends(authorize)):
    st = state_of(request)
    m = st.model(req.model)
    vecs, n = await run_in_threadpool(_embed, m, req, st.cfg.embedding_pooling)
    if st.keys is not None:
        st.keys.spend(key, n)
    if req.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes, base64
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vecs]
    else:
        data = vecs.tolist()
    return {"object": "list", "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
