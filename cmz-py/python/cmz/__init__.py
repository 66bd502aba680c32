"""cmz: store and serve LLM chatbot conversations, from Python.

    import cmz

    client = cmz.Client.from_env()          # DynamoDB / OpenAI from the legacy variables
    login = client.auth.login("admin@cmz.org", "admin123")
    me = client.auth.authenticate(login["token"])
    reply = client.conversations.turn(me, "cougar", "Can you roar?")
    for event in client.conversations.stream_turn(me, "cougar", "Tell me a story",
                                                  session_id=reply["sessionId"]):
        print(event)

Results are dicts with the legacy camelCase keys (``sessionId``, ``messageCount``,
``tokensPrompt``...), the shapes the Flask services already return, so they can be passed
to ``jsonify`` unchanged. Every error is a :class:`CmzError` whose ``code`` is the code of
the HTTP API's error body. ``cmz.compat`` keeps the legacy function names.
"""

from ._cmz import (
    Auth,
    Client,
    CmzError,
    Conflict,
    Conversations,
    ERROR_CODES,
    Forbidden,
    InternalError,
    NotFound,
    Principal,
    RateLimited,
    Timeout,
    TurnStream,
    Unauthorized,
    Unavailable,
    ValidationError,
    __version__,
)

__all__ = [
    "Auth",
    "Client",
    "CmzError",
    "Conflict",
    "Conversations",
    "ERROR_CODES",
    "Forbidden",
    "InternalError",
    "NotFound",
    "Principal",
    "RateLimited",
    "Timeout",
    "TurnStream",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "__version__",
]
