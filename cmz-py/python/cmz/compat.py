"""Drop-in replacements for the legacy ``conversation_dynamo.py`` and ``jwt_utils.py``.

Same names, parameters, defaults, return values and errors, so a service swaps one import
at a time::

    # from openapi_server.impl.utils.conversation_dynamo import store_conversation_turn
    from cmz.compat import store_conversation_turn

Only these differ, on purpose (MIGRATING.md says more):

- tokens are verified: ``verify_jwt_token`` and ``decode_jwt_payload`` check the signature
  (and so the algorithm), the issuer, the expiry and logout revocation; a forged,
  ``alg: none``, expired or revoked token is ``(False, None)`` / ``None``;
- ``check_user_access_to_session`` lets a ``parent`` read their own family's students'
  conversations (the legacy TODO) and treats ``admin`` like ``administrator``;
- passwords (``client().auth``) are argon2id; legacy PBKDF2 hashes still verify.

Underneath, conversations are stored the v2 way (one item per turn, constant cost, no
400 KB limit); conversations the legacy code wrote are read and continued.

Configuration is the legacy module's: with nothing configured the functions use DynamoDB,
the legacy table variables (``CONVERSATION_DYNAMO_TABLE_NAME``, ...), ``AWS_REGION``
(default ``us-west-2``) and the default AWS credential chain, and ``JWT_SECRET`` /
``JWT_ALGORITHM`` / ``TOKEN_EXPIRATION_SECONDS``. Memory is used only when asked for:
:func:`configure` with a client, or ``CMZ_COMPAT_STORE=memory``. The legacy functions had
no caller identity; like them these act as trusted server code (reads are audited as the
``cmz-compat`` service).
"""

import base64
import json
import logging
import os
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from . import _cmz

logger = logging.getLogger("cmz.compat")

# ---- module attributes, read at import as the legacy modules did -------------------------

CONVERSATION_TABLE: str = os.getenv("CONVERSATION_DYNAMO_TABLE_NAME", "quest-dev-conversation")
CONVERSATION_SESSION_TABLE: str = os.getenv("CONVERSATION_SESSION_TABLE_NAME", "quest-dev-session")
AWS_REGION: str = os.getenv("AWS_REGION", "us-west-2")


def _jwt_secret() -> str:
    secret = os.getenv("JWT_SECRET")
    if secret:
        return secret
    if os.getenv("ENVIRONMENT") == "production":
        raise RuntimeError(
            "JWT_SECRET must be set when ENVIRONMENT=production: set the secret the other "
            "services share (at least 32 bytes)"
        )
    # As the legacy module: a random secret for this process (tokens do not cross processes).
    return secrets.token_urlsafe(48)


JWT_SECRET: str = _jwt_secret()
if len(JWT_SECRET.encode()) < 32:
    raise RuntimeError(
        f"JWT_SECRET is {len(JWT_SECRET.encode())} bytes; cmz needs at least 32. Set a longer "
        "secret in every service that shares it, e.g. the output of "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`"
    )
JWT_ALGORITHM: str = os.getenv("JWT_ALGORITHM", "HS256")
TOKEN_EXPIRATION_SECONDS: int = int(os.getenv("TOKEN_EXPIRATION_SECONDS", "86400"))

_client: Optional[_cmz.Client] = None
_SERVICE: Optional[_cmz.Principal] = None


def __getattr__(name: str) -> Any:
    # The legacy module made a boto3 resource at import; cmz makes one only when asked for.
    if name == "dynamodb":
        try:
            import boto3  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError as error:
            raise AttributeError(
                "cmz.compat.dynamodb is a boto3 resource, and boto3 is not installed; cmz "
                "itself does not need it"
            ) from error
        resource = boto3.resource("dynamodb", region_name=AWS_REGION)
        globals()["dynamodb"] = resource
        return resource
    raise AttributeError(f"module 'cmz.compat' has no attribute {name!r}")


def configure(client: _cmz.Client) -> None:
    """Use ``client`` for every compat function (tests, or explicit configuration such as
    ``configure(cmz.Client.in_memory())``)."""
    global _client
    _client = client


def _default_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JWT_SECRET", JWT_SECRET)
    env.setdefault("JWT_ALGORITHM", JWT_ALGORITHM)
    env.setdefault("TOKEN_EXPIRATION_SECONDS", str(TOKEN_EXPIRATION_SECONDS))
    store = env.get("CMZ_COMPAT_STORE", "dynamodb").strip().lower()
    if store == "memory":
        for name in list(env):
            if name.endswith("_TABLE_NAME") or name == "DYNAMODB_ENDPOINT_URL":
                del env[name]
    elif store == "dynamodb":
        # The legacy tables, even when no table variable is set.
        env.setdefault("CONVERSATION_SESSION_TABLE_NAME", CONVERSATION_SESSION_TABLE)
        env.setdefault("CONVERSATION_DYNAMO_TABLE_NAME", CONVERSATION_TABLE)
        env.setdefault("AWS_REGION", AWS_REGION)
    else:
        raise ValueError(f"CMZ_COMPAT_STORE must be 'dynamodb' (the default) or 'memory', not {store!r}")
    return env


def client() -> _cmz.Client:
    """The client the compat functions use: the one given to :func:`configure`, else one
    made on first use from the environment, on DynamoDB (see the module docs)."""
    global _client
    if _client is None:
        _client = _cmz.Client.from_env(_default_env())
    return _client


def _service() -> _cmz.Principal:
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = _cmz.Principal("cmz-compat", "admin")
    return _SERVICE


T = TypeVar("T")


def _quietly(what: str, default: T, call: Callable[[], T]) -> T:
    """Runs ``call``; on a cmz error returns ``default`` (logged, except not-found), as the
    legacy readers returned ``[]`` / ``None`` on any problem."""
    try:
        return call()
    except _cmz.NotFound:
        return default
    except (_cmz.CmzError, ValueError, TypeError) as error:
        logger.error("%s failed: %s (%s)", what, error, getattr(error, "code", type(error).__name__))
        return default


def _legacy_metadata(message: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    metadata = message.get("metadata") or {}
    if "turnKey" in metadata:
        metadata = {k: v for k, v in metadata.items() if k != "turnKey"}
    return metadata or None


def _legacy_message(message: Dict[str, Any]) -> Dict[str, Any]:
    out = {
        "messageId": message["messageId"],
        "role": message["role"],
        "text": message["text"],
        "timestamp": message["timestamp"],
    }
    metadata = _legacy_metadata(message)
    if metadata:
        out["metadata"] = metadata
    return out


def _all_messages(session_id: str) -> List[Dict[str, Any]]:
    conversations = client().conversations
    messages: List[Dict[str, Any]] = []
    cursor = None
    while True:
        page = conversations.history(_service(), session_id, limit=500, cursor=cursor)
        messages.extend(_legacy_message(m) for m in page["messages"])
        cursor = page["nextCursor"]
        if not cursor:
            return messages


# ---- conversation_dynamo.py -------------------------------------------------------------


def get_conversations_table() -> Any:
    """Not available: cmz owns the tables' layout. Use the functions of this module, or
    ``cmz.compat.client().conversations`` for everything else."""
    raise NotImplementedError(
        "cmz.compat.get_conversations_table(): cmz owns the conversation tables' layout "
        "(one item per turn); read and write through the cmz.compat functions or "
        "cmz.compat.client().conversations instead of the boto3 Table"
    )


def get_sessions_table() -> Any:
    """Not available: cmz owns the tables' layout. Use :func:`get_session_info`,
    :func:`get_user_sessions` or ``cmz.compat.client().conversations``."""
    raise NotImplementedError(
        "cmz.compat.get_sessions_table(): cmz owns the session table's indexes and items; "
        "use get_session_info / get_user_sessions or cmz.compat.client().conversations "
        "instead of the boto3 Table"
    )


def create_conversation_session(user_id: str, animal_id: str, animal_name: Optional[str] = None) -> str:
    """Starts an empty conversation of ``user_id`` with ``animal_id`` and returns its id,
    ``conv_{animal_id}_{user_id}_{8 hex}``. ``animalName`` is ``animal_name`` or the animal
    id. Raises when it cannot be stored (a ``cmz.CmzError``: ``ValidationError`` for an id
    cmz cannot take, ``Unavailable`` when DynamoDB fails)."""
    owner = _cmz.Principal(user_id, "user")
    session = client().conversations.create_session(owner, animal_id, animal_name=animal_name or animal_id)
    return str(session["sessionId"])


def store_conversation_turn(
    session_id: str, user_message: str, assistant_reply: str, metadata: Optional[Dict[str, Any]] = None
) -> str:
    """Appends a turn (the user's message, then the reply, one timestamp) to a conversation,
    atomically, and returns the user message's ``messageId``. ``metadata`` is stored with
    the reply verbatim, whatever its keys. An unknown conversation or any failure raises
    ``Exception("Failed to store conversation turn: <reason>")``."""
    try:
        conversations = client().conversations
        session = conversations.session(_service(), session_id)
        owner = _cmz.Principal(session["userId"], "user")
        stored = conversations.store_turn(
            owner,
            session["animalId"],
            user_message,
            assistant_reply,
            session_id=session_id,
            metadata=metadata or None,
        )
        return str(stored["messages"][0]["messageId"])
    except (_cmz.CmzError, TypeError, ValueError) as error:
        raise Exception(f"Failed to store conversation turn: {error}") from error


def get_conversation_history(session_id: str, limit: int = 10) -> List[Dict[str, Any]]:
    """The last ``limit`` messages (not turns) of a conversation, oldest first, as
    ``{messageId, role, text, timestamp[, metadata]}``; ``limit=0`` returns every message;
    ``[]`` for an unknown conversation or on any error."""

    def read() -> List[Dict[str, Any]]:
        if limit > 0:
            recent = client().conversations.recent(_service(), session_id, limit=limit)
            return [_legacy_message(m) for m in recent]
        messages = _all_messages(session_id)
        # The legacy slice, negative limits included.
        return messages[-limit:] if len(messages) > limit else messages

    return _quietly("get_conversation_history", [], read)


def _legacy_session_item(session: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "sessionId": session["sessionId"],
        "userId": session["userId"],
        "animalId": session["animalId"],
        "startTime": session["startTime"],
        "lastActivity": session["lastActivity"],
        "messageCount": session["messageCount"],
        "status": session.get("status", "active"),
    }


def get_user_sessions(user_id: str, animal_id: Optional[str] = None, limit: int = 20) -> List[Dict[str, Any]]:
    """A user's sessions (optionally with one animal), newest ``lastActivity`` first, at
    most ``limit``: ``{sessionId, userId, animalId, startTime, lastActivity, messageCount,
    status}``; ``[]`` on any error. A GSI query, not the legacy table scan."""

    def read() -> List[Dict[str, Any]]:
        if limit <= 0:
            return []
        owner = _cmz.Principal(user_id, "user")
        found: List[Dict[str, Any]] = []
        cursor = None
        while len(found) < limit:
            page = client().conversations.sessions(owner, limit=100, cursor=cursor)
            for session in page["sessions"]:
                if animal_id is None or animal_id == "" or session["animalId"] == animal_id:
                    found.append(_legacy_session_item(session))
            cursor = page["nextCursor"]
            if not cursor:
                break
        return found[:limit]

    return _quietly("get_user_sessions", [], read)


def get_session_info(session_id: str) -> Optional[Dict[str, Any]]:
    """The conversation, as the legacy conversation item: ``conversationId, userId,
    animalId, animalName, messageCount, startTime, endTime, status, messages`` (every
    message, legacy dicts), plus ``threadId`` and ``lastActivity`` once a thread id was
    stored; ``None`` if there is no such conversation or on any error."""

    def read() -> Optional[Dict[str, Any]]:
        session = client().conversations.session(_service(), session_id)
        info: Dict[str, Any] = {
            "conversationId": session["sessionId"],
            "userId": session["userId"],
            "animalId": session["animalId"],
            "animalName": session.get("animalName") or session["animalId"],
            "messageCount": session["messageCount"],
            "startTime": session["startTime"],
            "endTime": session["lastActivity"],
            "status": session.get("status", "active"),
            "messages": _all_messages(session_id),
        }
        if session.get("threadId"):
            info["threadId"] = session["threadId"]
            info["lastActivity"] = session["lastActivity"]
        return info

    return _quietly("get_session_info", None, read)


_SEES_EVERYTHING = ("administrator", "zookeeper", "admin")


def check_user_access_to_session(user_id: str, session_id: str, user_role: str = "user") -> bool:
    """Whether ``user_id`` in ``user_role`` may read the conversation: ``False`` for an
    unknown one; ``True`` for ``administrator``, ``zookeeper`` (and ``admin``), for its
    owner, and for a ``parent`` of its student (cmz's family policy); else ``False``."""

    def check() -> bool:
        session = client().conversations.session(_service(), session_id)
        if user_role in _SEES_EVERYTHING or session["userId"] == user_id:
            return True
        if user_role != "parent":
            return False
        try:
            client().conversations.session(_cmz.Principal(user_id, "parent"), session_id)
            return True
        except (_cmz.Forbidden, _cmz.NotFound):
            # A conversation the parent may not read answers NotFound.
            return False

    return _quietly("check_user_access_to_session", False, check)


def archive_old_conversations(days_old: int = 90) -> None:
    """A no-op, as in the legacy module. Retention in cmz is a TTL on the items and
    ``client().conversations.delete`` / ``cmz-dynamo`` deletes by age."""
    return None


def get_conversation_analytics(session_id: str) -> Dict[str, Any]:
    """The legacy per-conversation analytics: ``{}`` for an unknown conversation, else
    ``{sessionId, messageCount (messages, up to 1,000), startTime, lastActivity, duration
    (None), averageResponseLength, userEngagement}``, engagement ``'high'`` above 10
    messages, ``'medium'`` above 5, else ``'low'``. ``averageResponseLength`` is the legacy
    formula (it reads an ``assistantReply`` key that messages do not have, so it is 0)."""
    info = get_session_info(session_id)
    if not info:
        return {}
    history = get_conversation_history(session_id, limit=1000)
    count = len(history)
    analytics: Dict[str, Any] = {
        "sessionId": session_id,
        "messageCount": count,
        "startTime": info.get("startTime"),
        "lastActivity": info.get("lastActivity"),
        "duration": None,
        "averageResponseLength": 0,
        "userEngagement": "high" if count > 10 else "medium" if count > 5 else "low",
    }
    if history:
        analytics["averageResponseLength"] = sum(len(m.get("assistantReply", "")) for m in history) // count
    return analytics


def get_user_conversation_analytics(user_id: str, animal_id: Optional[str] = None, days: int = 30) -> Dict[str, Any]:
    """cmz's per-user analytics (not a legacy function): counts over a user's sessions
    active in the last ``days`` days, optionally with one animal: ``{userId, periodDays,
    totalSessions, totalMessages, averageMessagesPerSession, sessionsByAnimal}``."""
    since = time.time() - days * 86400
    owner = _cmz.Principal(user_id, "user")
    sessions: List[Dict[str, Any]] = []
    cursor = None
    try:
        while True:
            page = client().conversations.sessions(owner, limit=100, cursor=cursor)
            cursor = page["nextCursor"]
            for s in page["sessions"]:
                if _epoch(s["lastActivity"]) < since:
                    cursor = None  # newest first: the rest is older
                    break
                if animal_id is None or s["animalId"] == animal_id:
                    sessions.append(s)
            if not cursor:
                break
    except _cmz.CmzError as error:
        logger.error("get_user_conversation_analytics failed: %s (%s)", error, error.code)
    messages = sum(int(s["messageCount"]) for s in sessions)
    animals: Dict[str, int] = {}
    for s in sessions:
        animals[s["animalId"]] = animals.get(s["animalId"], 0) + 1
    return {
        "userId": user_id,
        "periodDays": days,
        "totalSessions": len(sessions),
        "totalMessages": messages,
        "averageMessagesPerSession": (messages / len(sessions)) if sessions else 0.0,
        "sessionsByAnimal": animals,
    }


def _epoch(timestamp: str) -> float:
    from datetime import datetime, timezone

    value = timestamp.rstrip("Z")
    if "." in value:
        head, fraction = value.split(".", 1)
        value = head + "." + fraction[:6]
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()


def get_thread_id(session_id: str) -> Optional[str]:
    """The OpenAI thread id stored with the conversation, or ``None`` (also for an unknown
    conversation or on any error)."""

    def read() -> Optional[str]:
        thread = client().conversations.session(_service(), session_id).get("threadId")
        return str(thread) if thread else None

    return _quietly("get_thread_id", None, read)


def store_thread_id(session_id: str, thread_id: str) -> bool:
    """Stores ``thread_id`` with the conversation: ``True``, or ``False`` on failure
    (including an unknown conversation, which the legacy update would have created)."""

    def write() -> bool:
        conversations = client().conversations
        owner = conversations.session(_service(), session_id)["userId"]
        conversations.set_thread_id(_cmz.Principal(owner, "user"), session_id, thread_id)
        return True

    return _quietly("store_thread_id", False, write)


# ---- jwt_utils.py -----------------------------------------------------------------------

_NOT_COPIED = ("email", "role", "user_id", "userId", "password")


def _legacy_user_id(user_data: Dict[str, Any]) -> str:
    email = str(user_data.get("email", ""))
    return str(user_data.get("user_id") or user_data.get("userId") or email.replace("@", "_").replace(".", "_"))


def generate_jwt_token(user_data: Dict[str, Any], expiration_seconds: int = TOKEN_EXPIRATION_SECONDS) -> str:
    """An access token with the legacy claims: ``user_id`` and ``userId`` (``user_id``,
    else ``userId``, else the email with ``@`` and ``.`` replaced by ``_``), ``email``,
    ``role`` (default ``'user'``), ``user_type`` (= role), ``exp`` = ``iat`` +
    ``expiration_seconds``, ``iat``, ``iss: 'cmz-api'``, ``sub``, plus every other key of
    ``user_data`` but ``email, role, user_id, userId, password``, plus ``jti`` (for logout).
    Signed with ``JWT_SECRET`` (HS256). A user id cmz cannot take (empty, or with spaces or
    ``/``) raises ``cmz.ValidationError``; the claims that decide validity (``exp``,
    ``iat``, ``nbf``, ``iss``, ``sub``, ``aud``, ``jti``) cannot be set through
    ``user_data``."""
    extra = {k: v for k, v in user_data.items() if k not in _NOT_COPIED}
    return client().auth.issue_token(
        _legacy_user_id(user_data),
        str(user_data.get("email", "")),
        str(user_data.get("role", "user")),
        expires_in=int(expiration_seconds),
        claims=extra,
    )


def _strip_bearer(token: str) -> str:
    return token[7:] if token.startswith("Bearer ") else token


def decode_jwt_payload(token: Optional[str]) -> Optional[Dict[str, Any]]:
    """The token's claims (a ``Bearer `` prefix is stripped), or ``None`` on any problem,
    including ``None`` or ``''``. Unlike the legacy function it verifies the token first:
    a forged, expired or revoked token decodes to ``None``."""
    if not token or not isinstance(token, str):
        return None
    token = _strip_bearer(token)
    try:
        client().auth.verify_token(token)
    except _cmz.CmzError:
        return None
    # The payload exactly as signed (the legacy function returned the raw claims).
    try:
        encoded = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (IndexError, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def verify_jwt_token(token: Optional[str]) -> Tuple[bool, Optional[Dict[str, Any]]]:
    """``(True, payload)`` for a valid token (verified signature and issuer, not expired,
    not revoked, with ``email``, ``exp`` and ``iat``), else ``(False, None)``. The legacy
    function never checked the signature; this one does."""
    payload = decode_jwt_payload(token)
    if not payload:
        return False, None
    if "exp" in payload and payload["exp"] < int(time.time()):
        return False, None
    if any(field not in payload for field in ("email", "exp", "iat")):
        return False, None
    return True, payload


def create_auth_response(user_data: Dict[str, Any]) -> Dict[str, Any]:
    """The legacy login response: ``{token, expiresIn (exp - iat), user: {email, role,
    userId, user_type, ...every other key of user_data but password, user_id, userId}}``."""
    token = generate_jwt_token(user_data)
    payload = decode_jwt_payload(token)
    expires_in = TOKEN_EXPIRATION_SECONDS
    if payload and "exp" in payload and "iat" in payload:
        expires_in = int(payload["exp"]) - int(payload["iat"])
    user: Dict[str, Any] = {
        "email": user_data.get("email", ""),
        "role": user_data.get("role", "user"),
        "userId": _legacy_user_id(user_data),
        "user_type": user_data.get("role", "user"),
    }
    for key, value in user_data.items():
        if key not in ("password", "user_id", "userId") and key not in user:
            user[key] = value
    return {"token": token, "expiresIn": expires_in, "user": user}
