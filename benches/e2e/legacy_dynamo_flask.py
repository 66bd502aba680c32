"""The legacy turn on DynamoDB, with Flask: `POST /convo_turn` as the legacy handler and
`conversation_dynamo.py` do it, with an instant model.

Per turn, as the legacy module does (`LEGACY-REAL.md`): the Bearer JWT checked (PyJWT, as in
`benches/http/legacy_common.py`), the session item read, the WHOLE conversation item read
(`get_session_info`), the persona prompt built from the last messages, an instant reply
(the same rule as cmz's offline persona model, so both servers store the same text), then
`list_append` of both messages on the conversation item and the session item updated. A new
conversation puts the conversation item and the session item first.

    JWT_SECRET=... DYNAMODB_ENDPOINT_URL=http://127.0.0.1:8000 \\
    CONVERSATION_DYNAMO_TABLE_NAME=... CONVERSATION_SESSION_TABLE_NAME=... \\
    gunicorn -k gthread -w 2 --threads 16 -b 127.0.0.1:8081 --chdir benches/e2e legacy_dynamo_flask:app
"""

import os
import sys
import time
import uuid
from decimal import Decimal

import boto3
from flask import Flask, jsonify, request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "http"))
import legacy_common as legacy  # noqa: E402

ENDPOINT = os.environ["DYNAMODB_ENDPOINT_URL"]
REGION = os.environ.get("AWS_REGION", "us-west-2")
# The legacy module makes one boto3 resource at import; so does this app (one per worker).
dynamodb = boto3.resource(
    "dynamodb",
    endpoint_url=ENDPOINT,
    region_name=REGION,
    aws_access_key_id="bench",
    aws_secret_access_key="local",
)
CONVERSATIONS = dynamodb.Table(os.environ.get("CONVERSATION_DYNAMO_TABLE_NAME", "quest-dev-conversation"))
SESSIONS = dynamodb.Table(os.environ.get("CONVERSATION_SESSION_TABLE_NAME", "quest-dev-session"))

app = Flask(__name__)


@app.errorhandler(legacy.ApiError)
def api_error(error):
    return jsonify(error.body()), error.status


@app.get("/system_health")
def health():
    return jsonify({"status": "healthy"})


def create_conversation_session(user_id, persona):
    """The legacy `create_conversation_session`: the conversation item, then the session item."""
    conversation_id = f"conv_{persona['animalId']}_{user_id}_{uuid.uuid4().hex[:8]}"
    started = legacy.now_iso()
    CONVERSATIONS.put_item(
        Item={
            "conversationId": conversation_id,
            "userId": user_id,
            "animalId": persona["animalId"],
            "animalName": persona["name"],
            "messageCount": 0,
            "startTime": started,
            "endTime": started,
            "status": "active",
            "messages": [],
        }
    )
    SESSIONS.put_item(
        Item={
            "sessionId": conversation_id,
            "userId": user_id,
            "animalId": persona["animalId"],
            "startTime": started,
            "lastActivity": started,
            "messageCount": 0,
            "status": "active",
        }
    )
    return conversation_id


def store_conversation_turn(session_id, user_message, assistant_reply, latency_ms):
    """The legacy `store_conversation_turn`: `list_append` on the one conversation item, then
    the session item's activity; returns the user message's id."""
    at = legacy.now_iso()
    user_id = str(uuid.uuid4())
    messages = [
        {"messageId": user_id, "role": "user", "text": user_message, "timestamp": at},
        {
            "messageId": str(uuid.uuid4()),
            "role": "assistant",
            "text": assistant_reply,
            "timestamp": at,
            "metadata": {"latencyMs": Decimal(latency_ms), "model": "offline-persona"},
        },
    ]
    CONVERSATIONS.update_item(
        Key={"conversationId": session_id},
        UpdateExpression="SET messages = list_append(messages, :msgs), messageCount = messageCount + :count, endTime = :time",
        ExpressionAttributeValues={":msgs": messages, ":count": 2, ":time": at},
    )
    SESSIONS.update_item(
        Key={"sessionId": session_id},
        UpdateExpression="SET lastActivity = :time, messageCount = messageCount + :count",
        ExpressionAttributeValues={":time": at, ":count": 2},
    )
    return user_id, at


@app.post("/convo_turn")
def convo_turn():
    claims = legacy.verify_token(legacy.bearer(request.headers.get("Authorization")))
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise legacy.ApiError(400, "validation_error", "The body must be a JSON object")
    session_id = body.get("sessionId")
    persona = legacy.validate_turn(body.get("animalId"), body.get("message"), session_id)
    message = body["message"]
    user_id = claims["user_id"]
    if session_id is None:
        session_id = create_conversation_session(user_id, persona)
    elif "Item" not in SESSIONS.get_item(Key={"sessionId": session_id}):
        raise legacy.ApiError(404, "not_found", f"Session {session_id} not found")
    # get_session_info: the whole conversation item, every turn.
    conversation = CONVERSATIONS.get_item(Key={"conversationId": session_id}).get("Item")
    if conversation is None:
        raise legacy.ApiError(404, "not_found", f"Session {session_id} not found")
    if conversation["userId"] != user_id:
        raise legacy.ApiError(403, "forbidden", "Not your conversation")
    document = {"messages": conversation.get("messages", [])}
    started = time.perf_counter()
    reply = legacy.offline_reply(persona, legacy.model_messages(persona, document, message))
    latency_ms = int((time.perf_counter() - started) * 1000)
    turn_id, at = store_conversation_turn(session_id, message, reply, latency_ms)
    return jsonify(
        {
            "reply": reply,
            "sessionId": session_id,
            "turn": {"convoTurnId": turn_id, "timestamp": at, "tokensPrompt": None,
                     "tokensCompletion": None, "latencyMs": latency_ms},
        }
    )
