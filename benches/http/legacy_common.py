"""The legacy conversation-turn logic shared by `legacy_flask.py` and `legacy_fastapi.py`.

This is the work the legacy Python stack did per turn, with DynamoDB and OpenAI replaced by
in-process stand-ins so that only the web stack and the data layout are measured:

* the access token is a PyJWT HS256 token (`JWT_SECRET`, issuer `cmz-api`), verified with
  `jwt.decode` (the signature IS checked here, unlike the legacy verifier);
* a conversation is ONE JSON document (the legacy single DynamoDB item) held as a string in a
  dict: created with `json.dumps`, read whole with `json.loads`, rewritten whole with
  `json.dumps` on every turn (the legacy `list_append` update rewrote the whole item);
* the session item is a second JSON document, updated every turn;
* the persona system prompt is built from a persona dict (name, personality, facts), with the
  same text and the same three animals as cmz's demo (`cmz-tower/src/sample-personas.json`);
* the "model" answers instantly from the persona facts, exactly like cmz's offline persona
  model (`cmz-core/src/memory/offline.rs`): a greeting on the first turn, then the fact that
  shares the most 4+-letter words with the question.

Nothing here depends on the web framework.
"""

import json
import os
import re
import time
import uuid
from datetime import datetime, timezone

import jwt

JWT_SECRET = os.environ.get("JWT_SECRET", "")
JWT_ALGORITHM = os.environ.get("JWT_ALGORITHM", "HS256")
JWT_ISSUER = "cmz-api"
CHUNK_DELAY_S = float(os.environ.get("CHUNK_DELAY_MS", "0")) / 1000.0
MAX_MESSAGE_CHARS = 4000

if len(JWT_SECRET.encode()) < 32:
    raise SystemExit("JWT_SECRET must be set (at least 32 bytes)")

# The animal table (`quest-dev-animal`): the same personas as cmz's demo.
PERSONAS = {
    "cougar": {
        "animalId": "cougar",
        "name": "Cora the Cougar",
        "personality": "calm, curious and a little bit sneaky; loves explaining how she stalks and pounces",
        "facts": [
            "Cougars can leap about 6 metres in a single bound.",
            "I purr, hiss and chirp, but I can't roar like a lion.",
            "Cougars are also called pumas, mountain lions and panthers.",
            "I mostly hunt at dawn and dusk, when my eyes work best.",
        ],
    },
    "porcupine": {
        "animalId": "porcupine",
        "name": "Pokey the Porcupine",
        "personality": "friendly, a bit shy, and proud of his quills",
        "facts": [
            "Porcupines have about 30,000 quills.",
            "My quills have tiny barbs, so they stick when I use them for defense.",
            "I can't shoot my quills; they come loose when something touches them.",
            "I love to munch on tree bark and leaves.",
        ],
    },
    "red_panda": {
        "animalId": "red_panda",
        "name": "Rusty the Red Panda",
        "personality": "playful, sleepy in the afternoon, and always hungry for bamboo",
        "facts": [
            "Red pandas eat mostly bamboo, up to 20,000 leaves a day.",
            "I wrap my fluffy tail around me like a blanket when it's cold.",
            "I have a false thumb that helps me hold bamboo.",
            "Red pandas spend most of their lives in trees.",
        ],
    },
}

CHILD_SAFETY_GUIDELINES = [
    "You are talking with children and families visiting the zoo; keep every reply friendly, age-appropriate and short (at most a few sentences).",
    "Never ask for or repeat personal information such as full names, addresses, phone numbers, schools or passwords.",
    "Do not discuss violence in graphic detail, adult topics, or anything frightening; gently steer back to animals and nature.",
    "If asked about something unsafe or off-topic, say kindly that you would rather talk about animals and suggest asking a parent or a zookeeper.",
    "Stay in character as the animal, and be honest: if you do not know something, say so.",
]

# The conversation table (one JSON document per conversation) and the session table.
CONVERSATIONS = {}
SESSIONS = {}

HISTORY_MESSAGES = 20  # the window fed to the model: the last 10 turns


class ApiError(Exception):
    """An error answered as the legacy `Error` body `{code, message}`."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self):
        return {"code": self.code, "message": self.message}


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def verify_token(token):
    """The claims of a valid access token; `ApiError(401)` otherwise."""
    if not token:
        raise ApiError(401, "unauthorized", "Missing access token")
    try:
        claims = jwt.decode(
            token,
            JWT_SECRET,
            algorithms=[JWT_ALGORITHM],
            issuer=JWT_ISSUER,
            options={"require": ["exp", "iat", "iss"]},
        )
    except jwt.PyJWTError:
        raise ApiError(401, "unauthorized", "Invalid or expired token")
    user_id = claims.get("user_id") or claims.get("userId") or claims.get("sub")
    if not user_id:
        raise ApiError(401, "unauthorized", "Invalid or expired token")
    claims["user_id"] = user_id
    return claims


def bearer(header_value):
    if header_value and header_value.startswith("Bearer "):
        return header_value[7:].strip()
    return None


def validate_turn(animal_id, message, session_id):
    """Checks the request fields; returns the persona."""
    if not isinstance(animal_id, str) or not animal_id:
        raise ApiError(400, "validation_error", "animalId is required")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(400, "validation_error", "message is required")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ApiError(400, "validation_error", f"message is longer than {MAX_MESSAGE_CHARS} characters")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise ApiError(400, "validation_error", "sessionId must be a non-empty string")
    persona = PERSONAS.get(animal_id)
    if persona is None:
        raise ApiError(404, "not_found", f"Animal {animal_id} not found")
    return persona


def system_prompt(persona):
    prompt = (
        f"You are {persona['name']}, an animal ambassador at Cougar Mountain Zoo.\n\n"
        f"PERSONALITY: {persona['personality'] or 'warm, curious and playful'}\n"
    )
    if persona["facts"]:
        prompt += "\nKEY FACTS you can share:\n" + "".join(f"- {f}\n" for f in persona["facts"])
    prompt += "\nGUIDELINES:\n" + "".join(f"- {g}\n" for g in CHILD_SAFETY_GUIDELINES)
    return prompt


_WORD_SPLIT = re.compile(r"[\W_]+")  # Rust: split on anything not alphanumeric


def _words(text):
    return [w.lower() for w in _WORD_SPLIT.split(text) if len(w) >= 4]


def offline_reply(persona, model_messages):
    """cmz's offline persona model, in Python: greeting + the best-matching fact."""
    question = next((m["content"] for m in reversed(model_messages) if m["role"] == "user"), "")
    turn = sum(1 for m in model_messages if m["role"] == "user")
    greeting = "" if any(m["role"] == "assistant" for m in model_messages) else f"Hi, I'm {persona['name']}! "
    facts = persona["facts"]
    if not facts:
        return f"{greeting}I love meeting visitors. Ask me anything about my life here at the zoo!"
    asked = set(_words(question))
    best_score, best_index = 0, None
    for i, fact in enumerate(facts):
        score = sum(1 for w in _words(fact) if w in asked)
        if score > best_score:
            best_score, best_index = score, i
    if best_index is None:
        best_index = max(turn - 1, 0) % len(facts)
    return f"{greeting}{facts[best_index]} What else would you like to know?"


def open_conversation(claims, persona, session_id):
    """The conversation document (loaded with json.loads) and whether it was just created."""
    user_id = claims["user_id"]
    created = False
    if session_id is None:
        # Legacy create: put the new conversation item and the session item.
        session_id = f"conv_{persona['animalId']}_{user_id}_{uuid.uuid4().hex[:8]}"
        start = now_iso()
        CONVERSATIONS[session_id] = json.dumps(
            {
                "conversationId": session_id,
                "userId": user_id,
                "animalId": persona["animalId"],
                "animalName": persona["name"],
                "messageCount": 0,
                "startTime": start,
                "endTime": start,
                "status": "active",
                "messages": [],
            }
        )
        SESSIONS[session_id] = json.dumps(
            {
                "sessionId": session_id,
                "userId": user_id,
                "animalId": persona["animalId"],
                "startTime": start,
                "lastActivity": start,
                "messageCount": 0,
                "status": "active",
            }
        )
        created = True
    # Legacy get_item: the whole conversation, every turn.
    stored = CONVERSATIONS.get(session_id)
    if stored is None:
        raise ApiError(404, "not_found", f"Session {session_id} not found")
    document = json.loads(stored)
    if document["userId"] != user_id or document["animalId"] != persona["animalId"]:
        raise ApiError(403, "forbidden", "Not your conversation")
    return document, created


def model_messages(persona, document, message):
    history = [{"role": m["role"], "content": m["text"]} for m in document["messages"][-HISTORY_MESSAGES:]]
    return [{"role": "system", "content": system_prompt(persona)}] + history + [{"role": "user", "content": message}]


def append_turn(document, message, reply, latency_ms):
    """Appends the user and assistant messages and rewrites the whole document."""
    user_time = now_iso()
    reply_time = now_iso()
    turn_id = str(uuid.uuid4())
    document["messages"].append({"messageId": str(uuid.uuid4()), "role": "user", "text": message, "timestamp": user_time})
    document["messages"].append(
        {
            "messageId": turn_id,
            "role": "assistant",
            "text": reply,
            "timestamp": reply_time,
            "metadata": {"tokensPrompt": None, "tokensCompletion": None, "latencyMs": latency_ms, "model": "offline-persona"},
        }
    )
    document["messageCount"] += 2
    document["endTime"] = reply_time
    session_id = document["conversationId"]
    CONVERSATIONS[session_id] = json.dumps(document)
    session = json.loads(SESSIONS[session_id])
    session["lastActivity"] = reply_time
    session["messageCount"] = document["messageCount"]
    SESSIONS[session_id] = json.dumps(session)
    return {
        "convoTurnId": turn_id,
        "timestamp": reply_time,
        "tokensPrompt": None,
        "tokensCompletion": None,
        "latencyMs": latency_ms,
    }


def convo_turn(claims, body):
    """POST /convo_turn: the whole turn; returns the response body."""
    if not isinstance(body, dict):
        raise ApiError(400, "validation_error", "The body must be a JSON object")
    session_id = body.get("sessionId")
    persona = validate_turn(body.get("animalId"), body.get("message"), session_id)
    message = body["message"]
    document, _ = open_conversation(claims, persona, session_id)
    started = time.perf_counter()
    reply = offline_reply(persona, model_messages(persona, document, message))
    latency_ms = int((time.perf_counter() - started) * 1000)
    turn = append_turn(document, message, reply, latency_ms)
    return {"reply": reply, "sessionId": document["conversationId"], "turn": turn}


def stream_chunks(reply):
    """The reply cut after each space, as cmz's offline model streams it."""
    parts = reply.split(" ")
    return [p + " " for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def prepare_stream(claims, animal_id, message, session_id):
    """Validation, session and reply for GET /convo_turn/stream (before the first byte)."""
    persona = validate_turn(animal_id, message, session_id)
    document, created = open_conversation(claims, persona, session_id)
    reply = offline_reply(persona, model_messages(persona, document, message))
    return document, created, reply


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
