"""What `Client.from_env` reads: the services' variables only (never the HTTP server's),
and the per-user turn limit, which holds for Python turns as for HTTP ones."""

import pytest

import cmz
from conftest import JWT_SECRET, login, make_client

# Settings only the HTTP server reads, each malformed.
BAD_HTTP_SETTINGS = {
    "CMZ_BIND": "not an address",
    "CMZ_CORS_ORIGINS": "\x7f",
    "CMZ_BODY_LIMIT_BYTES": "lots",
    "CMZ_REQUEST_TIMEOUT_SECONDS": "soon",
    "CMZ_DEFAULT_ANIMAL_ID": "not/an/animal",
}


def test_malformed_http_settings_do_not_affect_the_client(backend):
    client = make_client(backend, BAD_HTTP_SETTINGS)
    kid = login(client, "student1@cmz.org", "student123")
    assert client.conversations.turn(kid, "cougar", "hello")["reply"]


def test_a_malformed_bind_in_the_process_environment_is_ignored(monkeypatch):
    for name, value in BAD_HTTP_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("CMZ_DEV_USERS", "embedded")
    for name in ("DYNAMODB_ENDPOINT_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "CMZ_TURN_RATE_LIMIT"):
        monkeypatch.delenv(name, raising=False)
    client = cmz.Client.from_env()
    kid = login(client, "student2@cmz.org", "student123")
    assert client.conversations.turn(kid, "cougar", "hello")["reply"]


def test_a_malformed_service_setting_is_still_an_error():
    with pytest.raises(cmz.ValidationError):
        make_client("memory", {"CMZ_TURN_RATE_LIMIT": "many"})


def test_the_third_turn_over_a_limit_of_two_is_refused(backend):
    client = make_client(backend, {"CMZ_TURN_RATE_LIMIT": "2"})
    kid = login(client, "student1@cmz.org", "student123")
    first = client.conversations.turn(kid, "cougar", "one")
    session = first["sessionId"]
    events = list(client.conversations.stream_turn(kid, "cougar", "two", session_id=session))
    assert events[-1]["type"] == "complete"
    with pytest.raises(cmz.RateLimited) as raised:
        client.conversations.turn(kid, "cougar", "three", session_id=session)
    assert raised.value.code == "rate_limit_exceeded"
    assert 0 < raised.value.retry_after <= 3600
    # A summary is a model call too; streams are refused before they start.
    with pytest.raises(cmz.RateLimited):
        client.conversations.summarize(kid, session)
    with pytest.raises(cmz.RateLimited):
        client.conversations.stream_turn(kid, "cougar", "four", session_id=session)
    assert len(client.conversations.history(kid, session)["messages"]) == 4, "nothing stored"
    # The limit is per user.
    other = login(client, "student2@cmz.org", "student123")
    assert client.conversations.turn(other, "cougar", "hi")["reply"]
