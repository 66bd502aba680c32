"""Drop-in replacements for the legacy ``conversation_dynamo.py`` and ``jwt_utils.py``.

Same names, same arguments, same return shapes, so a service swaps one import at a time::

    # from conversation_dynamo import store_conversation_turn
    from cmz.compat import store_conversation_turn

What changes underneath (see MIGRATING.md): conversations are stored the v2 way (one item
per turn, constant cost, no 400 KB limit), legacy items are still read and continued, and
``verify_jwt_token`` / ``decode_jwt_payload`` check the signature, expiry and issuer.

The functions use one process-wide :class:`cmz.Client` made by ``Client.from_env()`` on
first use (the same variables as the legacy code); :func:`configure` sets another. Like
the legacy functions they are server-side code: they act with the session owner's rights
and read session data as the trusted ``cmz-compat`` service (audited as such).
"""

import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional

from . import _cmz

logger = logging.getLogger("cmz.compat")

_client: Optional[_cmz.Client] = None
# Reads on behalf of the legacy functions, which had no caller identity.
_SERVICE = None


def configure(client: _cmz.Client) -> None:
    """Use ``client`` for every compat function (tests, or explicit configuration)."""
    global _client
    _client = client


def client() -> _cmz.Client:
    """The client the compat functions use (``Client.from_env()`` on first use)."""
    global _client
    if _client is None:
        _client = _cmz.Client.from_env()
    return _client


def _service() -> _cmz.Principal:
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = _cmz.Principal("cmz-compat", "admin")
    return _SERVICE


def _legacy_session(session: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "sessionId": session["sessionId"],
        "conversationId": session["sessionId"],
        "userId": session["userId"],
        "animalId": session["animalId"],
        "animalName": session.get("animalName", ""),
        "startTime": session["startTime"],
        "lastActivity": session["lastActivity"],
        "messageCount": session["messageCount"],
        "status": session.get("status", "active"),
        "summary": session.get("summary"),
    }


def _legacy_message(message: Dict[str, Any]) -> Dict[str, Any]:
    out = {
        "messageId": message["messageId"],
        "role": message["role"],
        "text": message["text"],
        "timestamp": message["timestamp"],
    }
    if message.get("metadata"):
        out["metadata"] = message["metadata"]
    return out


# ---- conversation_dynamo.py -------------------------------------------------------------


def create_conversation_session(user_id: str, animal_id: str, animal_name: Optional[str] = None) -> Optional[str]:
    """Starts an empty conversation for ``user_id`` with ``animal_id``; returns its id
    (``conv_{animal}_{user}_{8 hex}``), or None if it could not be stored."""
    try:
        owner = _cmz.Principal(user_id, "user")
        session = client().conversations.create_session(owner, animal_id, animal_name=animal_name)
        return str(session["sessionId"])
    except _cmz.CmzError as error:
        logger.error("create_conversation_session failed: %s (%s)", error, error.code)
        return None


def store_conversation_turn(
    session_id: str, user_message: str, assistant_reply: str, metadata: Optional[Dict[str, Any]] = None
) -> bool:
    """Appends a turn (the user's message and the reply) to a conversation, atomically.
    ``metadata`` keeps the legacy keys (``tokensPrompt``, ``tokensCompletion``,
    ``latencyMs``...). True when stored, False otherwise (the error is logged)."""
    try:
        conversations = client().conversations
        session = conversations.session(_service(), session_id)
        owner = _cmz.Principal(session["userId"], "user")
        conversations.store_turn(
            owner, session["animalId"], user_message, assistant_reply, session_id=session_id, metadata=metadata
        )
        return True
    except _cmz.CmzError as error:
        logger.error("store_conversation_turn failed: %s (%s)", error, error.code)
        return False


def get_conversation_history(session_id: str, limit: int = 50) -> List[Dict[str, Any]]:
    """The last ``limit`` messages of a conversation, oldest first, as the legacy message
    dicts (``messageId``, ``role``, ``text``, ``timestamp``, ``metadata``); [] if there is
    no such conversation."""
    try:
        recent = client().conversations.recent(_service(), session_id, limit=limit)
        return [_legacy_message(m) for m in recent]
    except _cmz.NotFound:
        return []
    except _cmz.CmzError as error:
        logger.error("get_conversation_history failed: %s (%s)", error, error.code)
        return []


def get_user_sessions(user_id: str, limit: int = 20) -> List[Dict[str, Any]]:
    """A user's sessions, newest activity first (a GSI query, no more table scan)."""
    try:
        owner = _cmz.Principal(user_id, "user")
        page = client().conversations.sessions(owner, limit=limit)
        return [_legacy_session(s) for s in page["sessions"]]
    except _cmz.CmzError as error:
        logger.error("get_user_sessions failed: %s (%s)", error, error.code)
        return []


def get_session_info(session_id: str) -> Optional[Dict[str, Any]]:
    """A session's item (legacy shape), or None."""
    try:
        return _legacy_session(client().conversations.session(_service(), session_id))
    except _cmz.NotFound:
        return None
    except _cmz.CmzError as error:
        logger.error("get_session_info failed: %s (%s)", error, error.code)
        return None


def check_user_access_to_session(user_id: str, session_id: str, user_role: str = "user") -> bool:
    """Whether ``user_id`` (in ``user_role``) may read the session: its owner, a parent of
    its student (the legacy TODO, now done), or admin/administrator/zookeeper."""
    try:
        principal = _cmz.Principal(user_id, user_role)
        client().conversations.session(principal, session_id)
        return True
    except (_cmz.Forbidden, _cmz.NotFound):
        return False
    except _cmz.ValidationError:
        return False


def get_conversation_analytics(user_id: str, animal_id: Optional[str] = None, days: int = 30) -> Dict[str, Any]:
    """Counts over a user's sessions active in the last ``days`` days (optionally with one
    animal): sessions, messages, average messages per session, sessions per animal."""
    since = datetime.now(timezone.utc) - timedelta(days=days)
    owner = _cmz.Principal(user_id, "user")
    sessions: List[Dict[str, Any]] = []
    cursor = None
    try:
        while True:
            page = client().conversations.sessions(owner, limit=100, cursor=cursor)
            for s in page["sessions"]:
                if _parse(s["lastActivity"]) < since:
                    page["nextCursor"] = None  # newest first: the rest is older
                    break
                if animal_id is None or s["animalId"] == animal_id:
                    sessions.append(s)
            cursor = page["nextCursor"]
            if not cursor:
                break
    except _cmz.CmzError as error:
        logger.error("get_conversation_analytics failed: %s (%s)", error, error.code)
    messages = sum(s["messageCount"] for s in sessions)
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


def _parse(timestamp: str) -> datetime:
    value = timestamp.rstrip("Z")
    if "." in value:
        head, fraction = value.split(".", 1)
        value = head + "." + fraction[:6]
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


# ---- jwt_utils.py -----------------------------------------------------------------------


def generate_jwt_token(user_data: Dict[str, Any]) -> str:
    """An HS256 access token with the legacy claims for ``user_data`` (``user_id`` or
    ``userId``, ``email``, ``role``, optional ``familyId``)."""
    user_id = user_data.get("user_id") or user_data.get("userId")
    if not user_id:
        raise ValueError("user_data needs user_id or userId")
    return client().auth.issue_token(
        str(user_id),
        str(user_data.get("email", "")),
        str(user_data.get("role", "user")),
        family_id=user_data.get("familyId") or user_data.get("family_id"),
    )


def decode_jwt_payload(token: str) -> Optional[Dict[str, Any]]:
    """The token's claims, or None. Unlike the legacy function it verifies the signature,
    expiry and issuer first: a forged token decodes to None."""
    try:
        return client().auth.verify_token(_strip_bearer(token))
    except _cmz.CmzError:
        return None


def verify_jwt_token(token: str) -> Optional[Dict[str, Any]]:
    """The claims of a valid token, or None (forged, ``alg: none``, expired, revoked, or
    from another issuer). The legacy function accepted forged tokens; this one does not."""
    try:
        client().auth.authenticate(_strip_bearer(token))
        return client().auth.verify_token(_strip_bearer(token))
    except _cmz.CmzError:
        return None


def create_auth_response(user_data: Dict[str, Any]) -> Dict[str, Any]:
    """The legacy login response: ``{"token", "user", "expiresIn"}``."""
    token = generate_jwt_token(user_data)
    claims = client().auth.verify_token(token)
    user = {k: v for k, v in user_data.items() if k not in ("password", "passwordHash", "password_hash")}
    return {"token": token, "user": user, "expiresIn": int(claims["exp"]) - int(claims["iat"])}


def _strip_bearer(token: str) -> str:
    token = token.strip()
    return token[7:].strip() if token.lower().startswith("bearer ") else token
