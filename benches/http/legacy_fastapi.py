"""The legacy way, with FastAPI (async): `POST /convo_turn` and `GET /convo_turn/stream`.

The same work as `legacy_flask.py` (see `legacy_common.py`): PyJWT verification, body
validation (a pydantic model, as a FastAPI user would write it), ONE JSON document per
conversation loaded and rewritten whole, persona prompt, offline reply; the stream is a
`StreamingResponse` over an async generator with `asyncio.sleep(CHUNK_DELAY_MS)` before each
word.

Deployed as a user would:

    JWT_SECRET=... CHUNK_DELAY_MS=500 uvicorn --app-dir benches/http legacy_fastapi:app \
        --host 127.0.0.1 --port 8082 --workers 2
"""

import asyncio
import time
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

import legacy_common as legacy

app = FastAPI(title="legacy cmz (FastAPI)")


class ConvoTurnRequest(BaseModel):
    animalId: str
    message: str
    sessionId: Optional[str] = None
    contextSummary: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None


@app.exception_handler(legacy.ApiError)
async def api_error(_request: Request, error: legacy.ApiError):
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(RequestValidationError)
async def validation_error(_request: Request, error: RequestValidationError):
    return JSONResponse({"code": "validation_error", "message": str(error.errors()[:1])}, status_code=400)


@app.get("/system_health")
async def health():
    return {"status": "healthy"}


@app.post("/convo_turn")
async def convo_turn(body: ConvoTurnRequest, request: Request):
    claims = legacy.verify_token(legacy.bearer(request.headers.get("authorization")))
    return legacy.convo_turn(claims, body.model_dump(exclude_none=True))


@app.get("/convo_turn/stream")
async def convo_turn_stream(
    request: Request,
    animalId: Optional[str] = None,
    message: Optional[str] = None,
    sessionId: Optional[str] = None,
    token: Optional[str] = None,
):
    claims = legacy.verify_token(token or legacy.bearer(request.headers.get("authorization")))
    document, created, reply = legacy.prepare_stream(claims, animalId, message, sessionId)
    session_id = document["conversationId"]

    async def events():
        started = time.perf_counter()
        if created:
            yield legacy.sse("session", {"type": "new_session", "sessionId": session_id, "timestamp": legacy.now_iso()})
        yield legacy.sse("metadata", {"type": "start", "sessionId": session_id, "animalId": animalId, "timestamp": legacy.now_iso()})
        chunks = legacy.stream_chunks(reply)
        for number, chunk in enumerate(chunks, start=1):
            if legacy.CHUNK_DELAY_S:
                await asyncio.sleep(legacy.CHUNK_DELAY_S)
            yield legacy.sse("message", {"type": "content", "content": chunk, "chunkId": number})
        latency_ms = int((time.perf_counter() - started) * 1000)
        turn = legacy.append_turn(document, message, reply, latency_ms)
        yield legacy.sse(
            "complete",
            {
                "type": "complete",
                "fullResponse": reply,
                "chunkCount": len(chunks),
                "sessionId": session_id,
                "timestamp": turn["timestamp"],
                "tokensPrompt": None,
                "tokensCompletion": None,
            },
        )

    return StreamingResponse(events(), media_type="text/event-stream", headers=legacy.SSE_HEADERS)
