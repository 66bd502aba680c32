"""cmz.compat: the legacy function names, arguments and return shapes, on both backends."""

import pytest

import cmz
from cmz import compat


@pytest.fixture
def legacy(client):
    compat.configure(client)
    return compat


def test_conversation_functions(legacy):
    sid = legacy.create_conversation_session("kid_a", "cougar")
    assert sid.startswith("conv_cougar_kid_a_") and len(sid.rsplit("_", 1)[1]) == 8
    info = legacy.get_session_info(sid)
    assert info["messageCount"] == 0 and info["userId"] == "kid_a" and info["animalName"] == "Cora the Cougar"
    for t in range(3):
        assert legacy.store_conversation_turn(sid, f"question {t}", f"answer {t}", {"tokensPrompt": 10 + t, "latencyMs": 300})
    history = legacy.get_conversation_history(sid)
    assert [m["text"] for m in history] == ["question 0", "answer 0", "question 1", "answer 1", "question 2", "answer 2"]
    assert set(history[1]) == {"messageId", "role", "text", "timestamp", "metadata"}
    assert history[1]["metadata"] == {"tokensPrompt": 10, "latencyMs": 300}
    assert [m["text"] for m in legacy.get_conversation_history(sid, limit=2)] == ["question 2", "answer 2"]
    assert legacy.get_session_info(sid)["messageCount"] == 6
    other = legacy.create_conversation_session("kid_a", "porcupine")
    legacy.store_conversation_turn(other, "hi", "hello")
    sessions = legacy.get_user_sessions("kid_a")
    assert [s["sessionId"] for s in sessions] == [other, sid]
    assert legacy.get_user_sessions("kid_a", limit=1)[0]["sessionId"] == other
    analytics = legacy.get_conversation_analytics("kid_a")
    assert (analytics["totalSessions"], analytics["totalMessages"]) == (2, 8)
    assert analytics["sessionsByAnimal"] == {"cougar": 1, "porcupine": 1}
    assert legacy.get_conversation_analytics("kid_a", animal_id="cougar")["totalMessages"] == 6


def test_missing_things_keep_the_legacy_return_shapes(legacy):
    assert legacy.get_session_info("conv_x_nobody_00000000") is None
    assert legacy.get_conversation_history("conv_x_nobody_00000000") == []
    assert legacy.store_conversation_turn("conv_x_nobody_00000000", "q", "a") is False
    assert legacy.get_user_sessions("nobody_at_all") == []
    assert legacy.create_conversation_session("bad id!", "cougar") is None


def test_access_checks_now_include_parents(legacy, client):
    kid = client.auth.authenticate(client.auth.login("student1@cmz.org", "student123")["token"])
    parent = client.auth.authenticate(client.auth.login("parent@cmz.org", "parent123")["token"])
    other = client.auth.authenticate(client.auth.login("other@cmz.org", "other123")["token"])
    sid = legacy.create_conversation_session(kid.user_id, "cougar")
    assert legacy.check_user_access_to_session(kid.user_id, sid)
    assert legacy.check_user_access_to_session(parent.user_id, sid, "parent")
    assert not legacy.check_user_access_to_session(other.user_id, sid)
    assert legacy.check_user_access_to_session("someone", sid, "zookeeper")
    assert not legacy.check_user_access_to_session(kid.user_id, "conv_x_nobody_00000000")


def test_jwt_functions(legacy):
    user = {"user_id": "kid_b", "email": "kid_b@cmz.org", "role": "student", "familyId": "family_rivera"}
    token = legacy.generate_jwt_token(user)
    payload = legacy.verify_jwt_token(token)
    assert payload["user_id"] == payload["userId"] == payload["sub"] == "kid_b"
    assert payload["role"] == payload["user_type"] == "student" and payload["iss"] == "cmz-api"
    assert legacy.decode_jwt_payload("Bearer " + token)["email"] == "kid_b@cmz.org"
    response = legacy.create_auth_response(dict(user, password="secret"))
    assert set(response) == {"token", "user", "expiresIn"} and "password" not in response["user"]
    assert response["expiresIn"] == 86400
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert legacy.verify_jwt_token(tampered) is None
    assert legacy.decode_jwt_payload(tampered) is None
    with pytest.raises(ValueError):
        legacy.generate_jwt_token({"email": "no-id@cmz.org"})


def test_the_default_client_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", "env-secret-0123456789-0123456789-abcdef")
    monkeypatch.setenv("CMZ_DEV_USERS", "embedded")
    for var in ("DYNAMODB_ENDPOINT_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    compat._client = None
    try:
        token = compat.generate_jwt_token({"userId": "env_user", "role": "user"})
        assert compat.verify_jwt_token(token)["userId"] == "env_user"
        assert isinstance(compat.client(), cmz.Client)
    finally:
        compat._client = None
