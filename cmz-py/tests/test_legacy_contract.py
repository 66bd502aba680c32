"""The legacy contracts, row by row (../shared/reference/LEGACY-REAL.md): what the real
``conversation_dynamo.py`` and ``jwt_utils.py`` take, return and raise, checked through
``cmz.compat`` in memory and on DynamoDB Local. The deliberate differences (verified
signatures, the admin and parent policy) are tested as differences."""

import base64
import inspect
import json
import os
import re
import subprocess
import sys
import time
import uuid

import jwt
import pytest

import cmz
from cmz import compat

from conftest import JWT_SECRET, dynamo_env, dynamodb_url

UNKNOWN = "conv_cougar_nobody_00000000"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def legacy(client):
    compat.configure(client)
    yield compat
    compat._client = None


# ---- signatures -------------------------------------------------------------------------

LEGACY_SIGNATURES = {
    "get_conversations_table": [],
    "get_sessions_table": [],
    "create_conversation_session": [("user_id",), ("animal_id",), ("animal_name", None)],
    "store_conversation_turn": [("session_id",), ("user_message",), ("assistant_reply",), ("metadata", None)],
    "get_conversation_history": [("session_id",), ("limit", 10)],
    "get_user_sessions": [("user_id",), ("animal_id", None), ("limit", 20)],
    "get_session_info": [("session_id",)],
    "check_user_access_to_session": [("user_id",), ("session_id",), ("user_role", "user")],
    "archive_old_conversations": [("days_old", 90)],
    "get_conversation_analytics": [("session_id",)],
    "get_thread_id": [("session_id",)],
    "store_thread_id": [("session_id",), ("thread_id",)],
    "generate_jwt_token": [("user_data",), ("expiration_seconds", 86400)],
    "decode_jwt_payload": [("token",)],
    "verify_jwt_token": [("token",)],
    "create_auth_response": [("user_data",)],
}


@pytest.mark.parametrize("name", sorted(LEGACY_SIGNATURES))
def test_every_legacy_function_has_the_legacy_parameters_and_defaults(name):
    expected = LEGACY_SIGNATURES[name]
    params = list(inspect.signature(getattr(compat, name)).parameters.values())
    assert [p.name for p in params] == [e[0] for e in expected]
    for param, want in zip(params, expected):
        assert param.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, param
        if len(want) == 2:
            assert param.default == want[1], (name, param.name)
        else:
            assert param.default is inspect.Parameter.empty, (name, param.name)


def test_module_attributes_are_the_legacy_ones():
    assert compat.CONVERSATION_TABLE == os.getenv("CONVERSATION_DYNAMO_TABLE_NAME", "quest-dev-conversation")
    assert compat.CONVERSATION_SESSION_TABLE == os.getenv("CONVERSATION_SESSION_TABLE_NAME", "quest-dev-session")
    assert compat.AWS_REGION == os.getenv("AWS_REGION", "us-west-2")
    assert compat.JWT_ALGORITHM == os.getenv("JWT_ALGORITHM", "HS256")
    assert compat.TOKEN_EXPIRATION_SECONDS == 86400
    assert isinstance(compat.JWT_SECRET, str) and len(compat.JWT_SECRET) >= 32
    assert type(compat.dynamodb).__name__ == "dynamodb.ServiceResource"


def test_module_attributes_follow_the_environment():
    env = dict(
        os.environ,
        CONVERSATION_DYNAMO_TABLE_NAME="zoo-conversation",
        CONVERSATION_SESSION_TABLE_NAME="zoo-session",
        AWS_REGION="eu-north-1",
        JWT_SECRET="s" * 40,
        TOKEN_EXPIRATION_SECONDS="600",
    )
    code = (
        "from cmz import compat as c; print(c.CONVERSATION_TABLE, c.CONVERSATION_SESSION_TABLE, "
        "c.AWS_REGION, c.JWT_SECRET == 's' * 40, c.TOKEN_EXPIRATION_SECONDS)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["zoo-conversation", "zoo-session", "eu-north-1", "True", "600"]


def test_the_table_getters_say_what_to_use_instead():
    for getter in (compat.get_conversations_table, compat.get_sessions_table):
        with pytest.raises(NotImplementedError, match="cmz.compat"):
            getter()


# ---- conversation_dynamo.py ---------------------------------------------------------------


def test_create_conversation_session_returns_the_legacy_id_and_writes_the_conversation(legacy):
    sid = legacy.create_conversation_session("kid_a", "cougar")
    assert isinstance(sid, str)
    assert re.fullmatch(r"conv_cougar_kid_a_[0-9a-f]{8}", sid), sid
    info = legacy.get_session_info(sid)
    assert info["conversationId"] == sid
    assert (info["userId"], info["animalId"], info["messageCount"], info["status"]) == ("kid_a", "cougar", 0, "active")
    assert info["animalName"] == "cougar", "animal_name, else the animal id"
    assert info["messages"] == []
    assert info["startTime"] == info["endTime"]
    named = legacy.create_conversation_session("kid_a", "cougar", "Cora")
    assert legacy.get_session_info(named)["animalName"] == "Cora"
    assert legacy.create_conversation_session("kid_a", "cougar") != sid


def test_ids_the_legacy_code_makes_are_accepted(legacy):
    # generate_jwt_token derives user ids from emails: test+tag@cmz.org -> test+tag_cmz_org
    for user in ("test+tag_cmz_org", "o'brien_zoo_org", "user_1730000000000"):
        sid = legacy.create_conversation_session(user, "leo_001")
        assert sid.startswith(f"conv_leo_001_{user}_")
        assert legacy.store_conversation_turn(sid, "hi", "hello")
        assert [s["sessionId"] for s in legacy.get_user_sessions(user)] == [sid]


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "tab\there", "nul\x00", "x" * 200])
def test_ids_cmz_cannot_take_raise(legacy, bad):
    with pytest.raises(cmz.ValidationError):
        legacy.create_conversation_session(bad, "cougar")


def test_store_conversation_turn_returns_the_user_message_id_and_keeps_metadata_verbatim(legacy):
    sid = legacy.create_conversation_session("kid_b", "cougar")
    metadata = {
        "tokensPrompt": 120,
        "latencyMs": 640,
        "model": "gpt-4o-mini",
        "threadId": "thread_abc",
        "assistantId": "asst_1",
        "runStatus": "completed",
        "score": 0.5,
        "flags": ["a", "b"],
        "nested": {"x": None, "ok": True},
        "tokensCompletion": "n/a",
    }
    message_id = legacy.store_conversation_turn(sid, "Can you roar?", "I purr instead!", metadata)
    assert isinstance(message_id, str)
    assert str(uuid.UUID(message_id)) == message_id, "a uuid4 string"
    history = legacy.get_conversation_history(sid)
    assert [m["role"] for m in history] == ["user", "assistant"]
    user, assistant = history
    assert user["messageId"] == message_id
    assert set(user) == {"messageId", "role", "text", "timestamp"}, "no metadata on the user message"
    assert set(assistant) == {"messageId", "role", "text", "timestamp", "metadata"}
    assert assistant["metadata"] == metadata
    assert (user["text"], assistant["text"]) == ("Can you roar?", "I purr instead!")
    assert user["timestamp"] == assistant["timestamp"], "one timestamp per turn"
    assert ISO_Z.match(user["timestamp"]), user["timestamp"]
    info = legacy.get_session_info(sid)
    assert info["messageCount"] == 2
    assert info["endTime"] >= info["startTime"]
    # No or empty metadata: no metadata key.
    legacy.store_conversation_turn(sid, "q2", "a2")
    legacy.store_conversation_turn(sid, "q3", "a3", {})
    assert all("metadata" not in m for m in legacy.get_conversation_history(sid)[2:])


def test_store_conversation_turn_raises_the_legacy_exception(legacy):
    with pytest.raises(Exception, match=r"^Failed to store conversation turn: "):
        legacy.store_conversation_turn(UNKNOWN, "q", "a")
    with pytest.raises(Exception, match=r"^Failed to store conversation turn: "):
        legacy.store_conversation_turn("not an id!", "q", "a")
    sid = legacy.create_conversation_session("kid_c", "cougar")
    with pytest.raises(Exception, match=r"^Failed to store conversation turn: "):
        legacy.store_conversation_turn(sid, "q", "a", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert legacy.get_conversation_history(sid) == [], "a failed turn stores nothing"


def test_get_conversation_history_counts_messages_and_limit_0_is_everything(legacy):
    sid = legacy.create_conversation_session("kid_d", "cougar")
    for t in range(7):
        legacy.store_conversation_turn(sid, f"q{t}", f"a{t}")
    texts = [m["text"] for m in legacy.get_conversation_history(sid)]
    assert texts == ["q2", "a2", "q3", "a3", "q4", "a4", "q5", "a5", "q6", "a6"], "the default is 10 messages"
    assert [m["text"] for m in legacy.get_conversation_history(sid, limit=3)] == ["a5", "q6", "a6"]
    assert [m["text"] for m in legacy.get_conversation_history(sid, 1)] == ["a6"]
    everything = legacy.get_conversation_history(sid, limit=0)
    assert len(everything) == 14 and everything[0]["text"] == "q0"
    assert len(legacy.get_conversation_history(sid, limit=1000)) == 14
    assert legacy.get_conversation_history(UNKNOWN) == []
    assert legacy.get_conversation_history("") == []
    assert legacy.get_conversation_history(None) == []  # type: ignore[arg-type]


def test_get_user_sessions_filters_by_animal_newest_first(legacy):
    user = "kid_e_" + uuid.uuid4().hex[:6]
    first = legacy.create_conversation_session(user, "cougar")
    second = legacy.create_conversation_session(user, "porcupine")
    third = legacy.create_conversation_session(user, "cougar")
    legacy.store_conversation_turn(first, "q", "a")  # now the newest activity
    sessions = legacy.get_user_sessions(user)
    assert [s["sessionId"] for s in sessions] == [first, third, second]
    for s in sessions:
        assert set(s) == {"sessionId", "userId", "animalId", "startTime", "lastActivity", "messageCount", "status"}
    assert sessions[0]["messageCount"] == 2 and sessions[0]["status"] == "active"
    assert [s["sessionId"] for s in legacy.get_user_sessions(user, "cougar")] == [first, third]
    assert [s["sessionId"] for s in legacy.get_user_sessions(user, animal_id="porcupine")] == [second]
    assert [s["sessionId"] for s in legacy.get_user_sessions(user, limit=1)] == [first]
    assert [s["sessionId"] for s in legacy.get_user_sessions(user, "cougar", limit=1)] == [first]
    assert legacy.get_user_sessions("nobody_at_all") == []
    assert legacy.get_user_sessions("") == []


def test_get_session_info_is_the_conversation_item(legacy):
    sid = legacy.create_conversation_session("kid_f", "cougar", "Cora")
    legacy.store_conversation_turn(sid, "hello", "hi there", {"tokensPrompt": 5})
    info = legacy.get_session_info(sid)
    assert set(info) == {
        "conversationId", "userId", "animalId", "animalName", "messageCount",
        "startTime", "endTime", "status", "messages",
    }
    assert [m["text"] for m in info["messages"]] == ["hello", "hi there"]
    assert info["messages"][1]["metadata"] == {"tokensPrompt": 5}
    assert info["endTime"] == info["messages"][1]["timestamp"]
    assert legacy.get_session_info(UNKNOWN) is None
    assert legacy.get_session_info("") is None
    assert legacy.get_session_info(None) is None  # type: ignore[arg-type]


def test_thread_ids_are_kept_with_the_conversation(legacy):
    sid = legacy.create_conversation_session("kid_g", "cougar")
    assert legacy.get_thread_id(sid) is None
    assert legacy.store_thread_id(sid, "thread_abc123") is True
    assert legacy.get_thread_id(sid) == "thread_abc123"
    info = legacy.get_session_info(sid)
    assert info["threadId"] == "thread_abc123" and "lastActivity" in info
    legacy.store_conversation_turn(sid, "q", "a")
    assert legacy.get_thread_id(sid) == "thread_abc123", "a turn keeps it"
    assert legacy.store_thread_id(sid, "thread_def456") is True
    assert legacy.get_thread_id(sid) == "thread_def456"
    assert legacy.get_thread_id(UNKNOWN) is None
    assert legacy.store_thread_id(UNKNOWN, "thread_x") is False
    assert legacy.get_session_info(UNKNOWN) is None, "no conversation appears"


def test_check_user_access_to_session(legacy, client):
    kid = client.auth.authenticate(client.auth.login("student1@cmz.org", "student123")["token"])
    parent = client.auth.authenticate(client.auth.login("parent@cmz.org", "parent123")["token"])
    other = client.auth.authenticate(client.auth.login("other@cmz.org", "other123")["token"])
    sid = legacy.create_conversation_session(kid.user_id, "cougar")
    assert legacy.check_user_access_to_session(kid.user_id, sid) is True
    assert legacy.check_user_access_to_session(kid.user_id, sid, "nonsense-role") is True, "the owner"
    assert legacy.check_user_access_to_session("someone", sid, "administrator") is True
    assert legacy.check_user_access_to_session("someone", sid, "zookeeper") is True
    assert legacy.check_user_access_to_session(other.user_id, sid) is False
    assert legacy.check_user_access_to_session(other.user_id, sid, "student") is False
    assert legacy.check_user_access_to_session("administrator", UNKNOWN, "administrator") is False
    assert legacy.check_user_access_to_session("", sid) is False
    # Deliberate differences: cmz's policy.
    assert legacy.check_user_access_to_session(parent.user_id, sid, "parent") is True, "own family"
    assert legacy.check_user_access_to_session(other.user_id, sid, "parent") is False, "another family"
    assert legacy.check_user_access_to_session("someone", sid, "admin") is True


def test_archive_old_conversations_is_a_no_op(legacy):
    sid = legacy.create_conversation_session("kid_h", "cougar")
    assert legacy.archive_old_conversations() is None
    assert legacy.archive_old_conversations(days_old=0) is None
    assert legacy.get_session_info(sid) is not None


def test_get_conversation_analytics_is_the_legacy_per_conversation_one(legacy):
    assert legacy.get_conversation_analytics(UNKNOWN) == {}
    sid = legacy.create_conversation_session("kid_i", "cougar")
    analytics = legacy.get_conversation_analytics(sid)
    assert set(analytics) == {
        "sessionId", "messageCount", "startTime", "lastActivity", "duration",
        "averageResponseLength", "userEngagement",
    }
    assert (analytics["sessionId"], analytics["messageCount"], analytics["userEngagement"]) == (sid, 0, "low")
    assert analytics["duration"] is None and analytics["averageResponseLength"] == 0
    for t in range(3):
        legacy.store_conversation_turn(sid, f"q{t}", f"a{t}")
    assert legacy.get_conversation_analytics(sid)["userEngagement"] == "medium"  # 6 messages
    for t in range(3):
        legacy.store_conversation_turn(sid, f"q{t}", f"a{t}")
    analytics = legacy.get_conversation_analytics(sid)
    assert (analytics["messageCount"], analytics["userEngagement"]) == (12, "high")
    assert analytics["startTime"] == legacy.get_session_info(sid)["startTime"]
    # cmz's per-user analytics live under their own name.
    user = legacy.get_user_conversation_analytics("kid_i")
    assert (user["totalSessions"], user["totalMessages"]) == (1, 12)


# ---- jwt_utils.py -----------------------------------------------------------------------


def _claims(token):
    return jwt.decode(token, JWT_SECRET, algorithms=["HS256"], issuer="cmz-api")


def test_generate_jwt_token_has_the_legacy_claims(legacy):
    user = {"email": "a.b@cmz.org", "role": "parent", "password": "hunter2", "name": "Ana", "familyId": "fam_1"}
    token = legacy.generate_jwt_token(user)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "HS256" and header["typ"] == "JWT"
    claims = _claims(token)
    assert claims["user_id"] == claims["userId"] == claims["sub"] == "a_b_cmz_org"
    assert (claims["email"], claims["role"], claims["user_type"], claims["iss"]) == ("a.b@cmz.org", "parent", "parent", "cmz-api")
    assert claims["exp"] - claims["iat"] == 86400
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["name"] == "Ana" and claims["familyId"] == "fam_1", "other keys are copied"
    assert "password" not in claims
    short = _claims(legacy.generate_jwt_token({"user_id": "u1", "email": "u1@cmz.org"}, expiration_seconds=60))
    assert short["exp"] - short["iat"] == 60 and short["role"] == "user" and short["user_id"] == "u1"
    assert _claims(legacy.generate_jwt_token({"userId": "u2", "email": "x@y.z"}))["user_id"] == "u2"
    assert _claims(legacy.generate_jwt_token({"email": "test+tag@cmz.org"}))["user_id"] == "test+tag_cmz_org"


def test_decode_jwt_payload(legacy):
    token = legacy.generate_jwt_token({"user_id": "u3", "email": "u3@cmz.org", "role": "student"})
    assert legacy.decode_jwt_payload(token)["user_id"] == "u3"
    assert legacy.decode_jwt_payload("Bearer " + token)["email"] == "u3@cmz.org"
    for junk in (None, "", "Bearer ", "a.b", "a.b.c", "not a token"):
        assert legacy.decode_jwt_payload(junk) is None, junk


def test_verify_jwt_token_returns_the_legacy_tuple(legacy):
    token = legacy.generate_jwt_token({"user_id": "u4", "email": "u4@cmz.org", "role": "student"})
    ok, payload = legacy.verify_jwt_token(token)
    assert ok is True and payload["user_id"] == "u4"
    assert legacy.verify_jwt_token("Bearer " + token)[0] is True
    for junk in (None, "", "x.y.z"):
        assert legacy.verify_jwt_token(junk) == (False, None)
    # A token the legacy module made (PyJWT, same secret, legacy claims) verifies.
    now = int(time.time())
    legacy_claims = {"user_id": "u5", "userId": "u5", "email": "u5@cmz.org", "role": "user", "user_type": "user",
                     "exp": now + 600, "iat": now, "iss": "cmz-api", "sub": "u5"}
    ok, payload = legacy.verify_jwt_token(jwt.encode(legacy_claims, JWT_SECRET, algorithm="HS256"))
    assert ok and payload["email"] == "u5@cmz.org"
    # No leeway on expiry, as the legacy function.
    expired = dict(legacy_claims, exp=now - 2, iat=now - 100)
    assert legacy.verify_jwt_token(jwt.encode(expired, JWT_SECRET, algorithm="HS256")) == (False, None)
    # email, exp and iat are required.
    no_email = {k: v for k, v in legacy_claims.items() if k != "email"}
    assert legacy.verify_jwt_token(jwt.encode(no_email, JWT_SECRET, algorithm="HS256")) == (False, None)


def test_forged_tokens_are_invalid_a_deliberate_difference(legacy):
    now = int(time.time())
    claims = {"user_id": "admin", "email": "evil@x.org", "role": "admin", "exp": now + 600, "iat": now,
              "iss": "cmz-api", "sub": "admin"}
    forged = jwt.encode(claims, "another-secret-of-enough-length-0123456789", algorithm="HS256")
    assert legacy.verify_jwt_token(forged) == (False, None)
    assert legacy.decode_jwt_payload(forged) is None
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
        + "."
        + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        + "."
    )
    assert legacy.verify_jwt_token(unsigned) == (False, None)


def test_create_auth_response_has_the_legacy_shape(legacy):
    user = {"email": "kid@cmz.org", "role": "student", "password": "x", "user_id": "kid_1", "name": "Kim", "familyId": "f1"}
    response = legacy.create_auth_response(user)
    assert set(response) == {"token", "expiresIn", "user"}
    assert response["expiresIn"] == 86400
    assert response["user"] == {
        "email": "kid@cmz.org", "role": "student", "userId": "kid_1", "user_type": "student",
        "name": "Kim", "familyId": "f1",
    }
    assert not response["token"].startswith("Bearer ")
    assert legacy.verify_jwt_token(response["token"])[1]["user_id"] == "kid_1"
    derived = legacy.create_auth_response({"email": "a.b@zoo.org"})
    assert derived["user"] == {"email": "a.b@zoo.org", "role": "user", "userId": "a_b_zoo_org", "user_type": "user"}


# ---- configuration ----------------------------------------------------------------------


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_without_configuration_compat_uses_dynamodb_with_the_legacy_tables():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TABLE_NAME")}
    env.update(dynamo_env())
    env.pop("CMZ_DEV_USERS", None)
    code = (
        "import boto3, os\n"
        "from cmz import compat\n"
        "sid = compat.create_conversation_session('kid_cfg', 'cougar')\n"
        "compat.store_conversation_turn(sid, 'q', 'a')\n"
        "db = boto3.client('dynamodb', endpoint_url=os.environ['DYNAMODB_ENDPOINT_URL'], region_name='us-west-2',"
        " aws_access_key_id='x', aws_secret_access_key='x')\n"
        "item = db.get_item(TableName=os.environ['CONVERSATION_SESSION_TABLE_NAME'], Key={'sessionId': {'S': sid}})\n"
        "print(item['Item']['userId']['S'], item['Item']['messageCount']['N'])\n"
    )
    out = _run(code, dict(env, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kid_cfg", "2"]


def test_without_configuration_an_unreachable_dynamodb_is_an_error_not_memory():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TABLE_NAME")}
    env.update(JWT_SECRET=JWT_SECRET, DYNAMODB_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="x", AWS_MAX_ATTEMPTS="1")
    env.pop("CMZ_COMPAT_STORE", None)
    code = (
        "import cmz\nfrom cmz import compat\n"
        "try:\n    compat.create_conversation_session('kid_cfg', 'cougar')\n"
        "except cmz.CmzError as e:\n    print('error', e.code)\n"
        "else:\n    print('stored somewhere')\n"
    )
    out = _run(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "error unavailable"


def test_memory_only_when_asked_for():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TABLE_NAME")}
    env.update(JWT_SECRET=JWT_SECRET, CMZ_COMPAT_STORE="memory", DYNAMODB_ENDPOINT_URL="http://127.0.0.1:9")
    code = (
        "from cmz import compat\n"
        "sid = compat.create_conversation_session('kid_mem', 'cougar')\n"
        "compat.store_conversation_turn(sid, 'q', 'a')\n"
        "print(len(compat.get_conversation_history(sid)))\n"
    )
    out = _run(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_a_short_jwt_secret_is_a_startup_error_naming_the_variable():
    env = dict(os.environ, JWT_SECRET="too-short")
    out = _run("import cmz.compat", env)
    assert out.returncode != 0
    assert "JWT_SECRET" in out.stderr and "at least 32" in out.stderr and "secrets.token_urlsafe" in out.stderr
    out = _run("import cmz; cmz.Client.from_env({'JWT_SECRET': 'too-short'})", env)
    assert out.returncode != 0 and "JWT_SECRET must be at least 32 bytes" in out.stderr


def test_production_without_a_secret_is_a_startup_error():
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    env["ENVIRONMENT"] = "production"
    out = _run("import cmz.compat", env)
    assert out.returncode != 0 and "JWT_SECRET must be set" in out.stderr


# ---- legacy data on DynamoDB ------------------------------------------------------------


def _boto3():
    import boto3

    return boto3.client("dynamodb", endpoint_url=dynamodb_url(), region_name="us-west-2",
                        aws_access_key_id="x", aws_secret_access_key="x")


def test_legacy_conversations_are_read_and_continued_verbatim():
    env = dynamo_env()
    client = cmz.Client.from_env(env)
    compat.configure(client)
    try:
        db = _boto3()
        now = "2025-10-27T10:00:00.123456Z"
        legacy_meta = {"M": {"threadId": {"S": "thread_old"}, "tokens": {"N": "42"}, "custom": {"S": "kept"}}}
        db.put_item(
            TableName=env["CONVERSATION_DYNAMO_TABLE_NAME"],
            Item={
                "conversationId": {"S": "conv_leo_001_test+tag_cmz_org_1a2b3c4d"},
                "userId": {"S": "test+tag_cmz_org"}, "animalId": {"S": "leo_001"}, "animalName": {"S": "Leo"},
                "messageCount": {"N": "2"}, "startTime": {"S": now}, "endTime": {"S": now},
                "status": {"S": "active"}, "threadId": {"S": "thread_old"},
                "messages": {"L": [
                    {"M": {"messageId": {"S": str(uuid.uuid4())}, "role": {"S": "user"}, "text": {"S": "Hi Leo"},
                           "timestamp": {"S": now}}},
                    {"M": {"messageId": {"S": str(uuid.uuid4())}, "role": {"S": "assistant"}, "text": {"S": "Roar!"},
                           "timestamp": {"S": now}, "metadata": legacy_meta}},
                ]},
            },
        )
        sid = "conv_leo_001_test+tag_cmz_org_1a2b3c4d"
        history = compat.get_conversation_history(sid)
        assert [m["text"] for m in history] == ["Hi Leo", "Roar!"]
        assert history[1]["metadata"] == {"threadId": "thread_old", "tokens": 42, "custom": "kept"}
        assert compat.get_thread_id(sid) == "thread_old"
        compat.store_conversation_turn(sid, "More?", "Roar again!", {"k": 1})
        assert [m["text"] for m in compat.get_conversation_history(sid, limit=0)] == ["Hi Leo", "Roar!", "More?", "Roar again!"]
        assert compat.get_session_info(sid)["messageCount"] == 4
        assert [s["sessionId"] for s in compat.get_user_sessions("test+tag_cmz_org")] == [sid]
    finally:
        compat._client = None


def test_real_animal_items_drive_turns():
    env = dynamo_env()
    client = cmz.Client.from_env(env)
    db = _boto3()
    table = env["ANIMAL_DYNAMO_TABLE_NAME"]
    db.put_item(TableName=table, Item={
        "animalId": {"S": "leo_001"}, "name": {"S": "Leo"}, "species": {"S": "Lion"}, "status": {"S": "active"},
        "softDelete": {"BOOL": False}, "personality": {"M": {"description": {"S": "Proud."}}},
        "configuration": {"M": {"systemPrompt": {"S": "You are Leo."}, "temperature": {"N": "0.4"},
                                "aiModel": {"S": "gpt-4o-mini"}}},
    })
    db.put_item(TableName=table, Item={
        "animalId": {"S": "charlie_003"}, "name": {"S": "Charlie"}, "softDelete": {"BOOL": True},
        "personality": {"M": {"description": {"S": "Gentle."}}}, "configuration": {"M": {"status": {"S": "deleted"}}},
    })
    me = client.auth.authenticate(client.auth.login("student1@cmz.org", "student123")["token"])
    reply = client.conversations.turn(me, "leo_001", "Hello Leo")
    assert reply["reply"]
    assert client.conversations.session(me, reply["sessionId"])["animalName"] == "Leo"
    with pytest.raises(cmz.NotFound):
        client.conversations.turn(me, "charlie_003", "Hello Charlie")


# ---- a legacy deployment's tables, upgraded in place ----------------------------------

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "cmz-dynamo", "tests", "fixtures",
                       "legacy_conversation_dynamo.py")


@pytest.fixture(scope="module")
def own_dynamodb():
    """A DynamoDB Local of this module's own: on the server the suite shares, with hundreds
    of TTL tables, DynamoDB Local queues a new index for minutes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".ci"))
    import dynamodb_local

    try:
        server, endpoint = dynamodb_local.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield endpoint
    dynamodb_local.stop(server)


def test_a_legacy_deployment_upgrades_in_place_and_compat_continues_it(own_dynamodb):
    tables = {var: "legacy-" + uuid.uuid4().hex[:6] + "-" + name for var, name in [
        ("CONVERSATION_DYNAMO_TABLE_NAME", "conversation"), ("CONVERSATION_SESSION_TABLE_NAME", "session"),
        ("USER_DYNAMO_TABLE_NAME", "user"), ("FAMILY_DYNAMO_TABLE_NAME", "family"),
        ("ANIMAL_DYNAMO_TABLE_NAME", "animal"), ("CONVERSATION_MESSAGE_TABLE_NAME", "message"),
        ("CMZ_META_TABLE_NAME", "cmz"), ("CMZ_CARE_TABLE_NAME", "care"),
    ]}

    def fixture(*args):
        out = subprocess.run([sys.executable, FIXTURE, *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    fixture("legacy-tables", "--endpoint", own_dynamodb,
            "--conversations", tables["CONVERSATION_DYNAMO_TABLE_NAME"],
            "--sessions", tables["CONVERSATION_SESSION_TABLE_NAME"],
            "--users", tables["USER_DYNAMO_TABLE_NAME"], "--families", tables["FAMILY_DYNAMO_TABLE_NAME"],
            "--animals", tables["ANIMAL_DYNAMO_TABLE_NAME"])
    written = fixture("write", "--endpoint", own_dynamodb,
                      "--conversations", tables["CONVERSATION_DYNAMO_TABLE_NAME"],
                      "--sessions", tables["CONVERSATION_SESSION_TABLE_NAME"],
                      "--count", "1", "--turns", "2", "--user", "legacy_kid")
    sid = written[0]["conversationId"]
    env = dict(tables, DYNAMODB_ENDPOINT_URL=own_dynamodb, JWT_SECRET=JWT_SECRET,
               AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")

    # Without the upgrade, cmz refuses to start and names the command.
    with pytest.raises(cmz.CmzError) as refused:
        cmz.Client.from_env(env)
    assert "ensure-tables" in str(refused.value)

    # The server's create-tables setting (like `cmz-dynamo ensure-tables`) upgrades in place.
    cmz.Client.from_env(dict(env, CMZ_DYNAMODB_CREATE_TABLES="1"))
    client = cmz.Client.from_env(env)  # and now it starts as it is
    compat.configure(client)
    try:
        before = compat.get_conversation_history(sid, limit=0)
        assert len(before) == 4 and [m["role"] for m in before] == ["user", "assistant"] * 2
        compat.store_conversation_turn(sid, "and now?", "still here!")
        after = compat.get_conversation_history(sid, limit=0)
        assert after[:4] == before and [m["text"] for m in after[4:]] == ["and now?", "still here!"]
        assert compat.get_user_sessions("legacy_kid")[0]["sessionId"] == sid
    finally:
        compat._client = None
