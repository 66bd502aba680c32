"""Errors: every code raises its own subclass of cmz.CmzError with the same .code as the
HTTP API; bad arguments raise TypeError/ValueError or ValidationError; nothing crashes."""

import pytest

import cmz
from conftest import login, make_client

CODES = {
    "validation_error": cmz.ValidationError,
    "not_found": cmz.NotFound,
    "forbidden": cmz.Forbidden,
    "unauthorized": cmz.Unauthorized,
    "rate_limit_exceeded": cmz.RateLimited,
    "conflict": cmz.Conflict,
    "unavailable": cmz.Unavailable,
    "timeout": cmz.Timeout,
    "internal_error": cmz.InternalError,
}


def test_every_code_of_the_library_has_a_subclass_here():
    # ERROR_CODES comes from the Rust enum: a code added there fails here until mapped.
    assert set(cmz.ERROR_CODES) == set(CODES)
    assert len(cmz.ERROR_CODES) == len(set(cmz.ERROR_CODES))


@pytest.mark.parametrize("code", sorted(CODES))
def test_each_code_has_its_subclass(code):
    with pytest.raises(CODES[code]) as raised:
        cmz._cmz._raise_error(code, "boom")
    error = raised.value
    assert isinstance(error, cmz.CmzError) and not isinstance(error, RuntimeError)
    assert error.code == code
    assert "boom" in str(error)
    assert isinstance(error.details, dict)
    if code == "rate_limit_exceeded":
        assert error.retry_after == 30


def test_real_errors_map_to_their_codes(client, admin):
    with pytest.raises(cmz.NotFound):
        client.conversations.history(admin, "conv_cougar_nobody_00000000")
    with pytest.raises(cmz.ValidationError) as raised:
        client.conversations.turn(admin, "cougar", "x" * 100_000)
    assert raised.value.details.get("field") == "message"
    with pytest.raises(cmz.ValidationError):
        client.conversations.turn(admin, "cougar", "hi", context_window=99)
    with pytest.raises(cmz.NotFound):
        client.conversations.turn(admin, "unicorn", "hi")
    with pytest.raises(cmz.Unauthorized):
        client.auth.authenticate("not.a.token")
    with pytest.raises(cmz.Unauthorized):
        client.auth.login("admin@cmz.org", "wrong")


def test_login_throttling_is_rate_limited(backend):
    client = make_client(backend)
    for _ in range(5):
        with pytest.raises(cmz.Unauthorized):
            client.auth.login("parent@cmz.org", "wrong", client="10.0.0.9")
    with pytest.raises(cmz.RateLimited) as raised:
        client.auth.login("parent@cmz.org", "parent123", client="10.0.0.9")
    assert raised.value.code == "rate_limit_exceeded" and raised.value.retry_after > 0


def test_a_dead_dynamodb_is_unavailable():
    env = {
        "DYNAMODB_ENDPOINT_URL": "http://127.0.0.1:9",
        "CMZ_DYNAMODB_TIMEOUT_MS": "2000",
        "JWT_SECRET": "x" * 40,
    }
    with pytest.raises(cmz.Unavailable) as raised:
        cmz.Client.from_env(env)
    assert raised.value.code == "unavailable"


def test_bad_arguments_raise_type_or_value_errors(client, admin):
    with pytest.raises(TypeError):
        client.conversations.turn(admin, 123, "hi")
    with pytest.raises(TypeError):
        client.conversations.turn("not a principal", "cougar", "hi")
    with pytest.raises(TypeError):
        client.conversations.history(admin, "conv_x", limit="ten")
    with pytest.raises(cmz.ValidationError):
        client.conversations.history(admin, "conv_x", limit=-1)
    with pytest.raises(cmz.ValidationError):
        client.conversations.recent(admin, "conv_x", limit=10**30)
    with pytest.raises(ValueError):
        cmz.Client.dynamodb(tables={"NOT_A_TABLE_VARIABLE": "x"})
    with pytest.raises(TypeError):
        client.conversations.store_turn(admin, "cougar", "q", "a", metadata={"latencyMs": object()})
    with pytest.raises(cmz.ValidationError):
        # (A malformed setting the client reads: HTTP-only ones such as CMZ_BIND are not read.)
        cmz.Client.from_env({"CMZ_TURN_RATE_LIMIT": "many", "JWT_SECRET": "x" * 40})
    # And the interpreter is still fine.
    assert client.conversations.turn(admin, "cougar", "still here?")["reply"]


def test_a_session_one_may_not_read_is_not_found_and_carries_no_data(client):
    kid = login(client, "student2@cmz.org", "student123")
    other = login(client, "other@cmz.org", "other123")
    session = client.conversations.turn(kid, "cougar", "my secret")["sessionId"]
    # NotFound (it was Forbidden): such a session answers like a missing one.
    with pytest.raises(cmz.NotFound) as raised:
        client.conversations.history(other, session)
    assert "my secret" not in str(raised.value)
