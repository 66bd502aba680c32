"""The legacy way, with Flask: `POST /convo_turn` and `GET /convo_turn/stream`.

Verifies the Bearer JWT with PyJWT, validates the body, loads the conversation as ONE JSON
document, builds the persona prompt, answers from the persona facts (like cmz's offline
model), appends both messages and rewrites the whole document (see `legacy_common.py`).
The stream sends the reply word by word as SSE, sleeping `CHUNK_DELAY_MS` before each word.

Deployed as a user would, with gunicorn's threaded workers:

    JWT_SECRET=... CHUNK_DELAY_MS=500 gunicorn -k gthread -w 2 --threads 600 \
        -b 127.0.0.1:8081 --chdir benches/http legacy_flask:app
"""

import time

from flask import Flask, Response, jsonify, request

import legacy_common as legacy

app = Flask(__name__)


@app.errorhandler(legacy.ApiError)
def api_error(error):
    return jsonify(error.body()), error.status


@app.get("/system_health")
def health():
    return jsonify({"status": "healthy"})


@app.post("/convo_turn")
def convo_turn():
    claims = legacy.verify_token(legacy.bearer(request.headers.get("Authorization")))
    body = request.get_json(silent=True)
    if body is None:
        raise legacy.ApiError(400, "validation_error", "The body must be JSON")
    return jsonify(legacy.convo_turn(claims, body))


@app.get("/convo_turn/stream")
def convo_turn_stream():
    token = request.args.get("token") or legacy.bearer(request.headers.get("Authorization"))
    claims = legacy.verify_token(token)
    message = request.args.get("message")
    document, created, reply = legacy.prepare_stream(
        claims, request.args.get("animalId"), message, request.args.get("sessionId")
    )
    session_id = document["conversationId"]
    animal_id = document["animalId"]

    def events():
        started = time.perf_counter()
        if created:
            yield legacy.sse("session", {"type": "new_session", "sessionId": session_id, "timestamp": legacy.now_iso()})
        yield legacy.sse("metadata", {"type": "start", "sessionId": session_id, "animalId": animal_id, "timestamp": legacy.now_iso()})
        chunks = legacy.stream_chunks(reply)
        for number, chunk in enumerate(chunks, start=1):
            if legacy.CHUNK_DELAY_S:
                time.sleep(legacy.CHUNK_DELAY_S)
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

    return Response(events(), mimetype="text/event-stream", headers=legacy.SSE_HEADERS)
