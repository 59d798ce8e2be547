"""`llmkit guard review`'s web app: a page where a reviewer sees each item the guard flagged and marks it allowed or
blocked with a note (llmkit.trust.review holds the queue).

Routes: GET / (the page, llmkit/web/review.html), GET /api/review/items?status=pending|decided|all (items and
counts), POST /api/review/items/{id} {"decision": "allowed"|"blocked", "note": str} (the updated item). With an API
key, /api/* needs 'Authorization: Bearer KEY' (the page asks for it).
"""
from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from llmkit.trust.review import ReviewQueue

WEB = Path(__file__).parents[1] / "web"


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: str
    note: str = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_review_app(queue: ReviewQueue, api_key: str | None = None) -> FastAPI:
    """The review page and its JSON API over queue."""
    app = FastAPI(title="llmkit review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(_Refused)
    async def _refused(request, e: _Refused):
        return _error(e.status, e.message)

    def auth(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise _Refused(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.get("/")
    async def page():
        return FileResponse(WEB / "review.html")

    @app.get("/api/review/items", dependencies=[Depends(auth)])
    def items(status: str = "pending", limit: int = 500):
        try:
            return {"items": queue.items(status, limit), "counts": queue.counts()}
        except ValueError as e:
            raise _Refused(400, str(e)) from None

    @app.post("/api/review/items/{item_id}", dependencies=[Depends(auth)])
    def decide(item_id: int, body: Decision):
        try:
            return queue.decide(item_id, body.decision, body.note)
        except KeyError:
            raise _Refused(404, f"no review item {item_id}") from None
        except ValueError as e:
            raise _Refused(400, str(e)) from None

    app.state.queue = queue
    return app
