"""Interop with the legacy formats, both ways: PyJWT tokens with the legacy claims, and
conversations written by boto3 the legacy way (read and continued through cmz.compat)."""

import json
import os
import subprocess
import sys
import time

import jwt
import pytest

import cmz
from cmz import compat
from conftest import JWT_SECRET, dynamo_env, dynamodb_url

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "cmz-dynamo", "tests", "fixtures", "legacy_conversation_dynamo.py")


def legacy_claims(**extra):
    now = int(time.time())
    claims = {
        "user_id": "legacy_kid",
        "userId": "legacy_kid",
        "email": "legacy_kid@cmz.org",
        "role": "student",
        "user_type": "student",
        "exp": now + 3600,
        "iat": now,
        "iss": "cmz-api",
        "sub": "legacy_kid",
        "displayName": "Legacy Kid",
    }
    claims.update(extra)
    return claims


def test_pyjwt_tokens_verify_and_forgeries_do_not(client):
    compat.configure(client)
    token = jwt.encode(legacy_claims(), JWT_SECRET, algorithm="HS256")
    valid, payload = compat.verify_jwt_token(token)
    assert valid and payload is not None
    assert payload["user_id"] == "legacy_kid" and payload["displayName"] == "Legacy Kid"
    assert client.auth.authenticate(token).role == "student"
    # Forged: another secret, alg none, an admin role slipped in, expired, wrong issuer.
    assert compat.verify_jwt_token(jwt.encode(legacy_claims(role="admin"), "not-the-secret-0123456789abcdef", algorithm="HS256")) == (False, None)
    unsigned = jwt.encode(legacy_claims(role="admin"), None, algorithm="none")
    assert compat.verify_jwt_token(unsigned) == (False, None) and compat.decode_jwt_payload(unsigned) is None
    assert compat.verify_jwt_token(jwt.encode(legacy_claims(exp=int(time.time()) - 3600), JWT_SECRET, algorithm="HS256")) == (False, None)
    assert compat.verify_jwt_token(jwt.encode(legacy_claims(iss="someone-else"), JWT_SECRET, algorithm="HS256")) == (False, None)
    with pytest.raises(cmz.Unauthorized):
        client.auth.authenticate(unsigned)


def test_cmz_tokens_decode_in_pyjwt(client):
    compat.configure(client)
    token = compat.generate_jwt_token({"user_id": "kid_c", "email": "c@cmz.org", "role": "parent"})
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], issuer="cmz-api")
    assert claims["user_id"] == claims["userId"] == "kid_c" and claims["role"] == "parent"


def test_boto3_legacy_conversations_are_read_and_continued():
    env = dynamo_env()
    client = cmz.Client.from_env(env)
    compat.configure(client)
    out = subprocess.run(
        [
            sys.executable,
            FIXTURE,
            "write",
            "--endpoint",
            dynamodb_url(),
            "--conversations",
            env["CONVERSATION_DYNAMO_TABLE_NAME"],
            "--sessions",
            env["CONVERSATION_SESSION_TABLE_NAME"],
            "--count",
            "2",
            "--turns",
            "3",
            "--user",
            "legacy_kid",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    written = json.loads(out.stdout)
    for conversation in written:
        cid = conversation["conversationId"]
        history = compat.get_conversation_history(cid)
        assert len(history) == 6 and history[0]["role"] == "user" and history[1]["metadata"]["tokensPrompt"] == 120
        assert compat.get_session_info(cid)["messageCount"] == 6
        assert compat.store_conversation_turn(cid, "Continued from Python", "Roar!")
        history = compat.get_conversation_history(cid)
        assert [m["text"] for m in history[-2:]] == ["Continued from Python", "Roar!"]
        assert len(history) == 8
    listed = {s["sessionId"] for s in compat.get_user_sessions("legacy_kid")}
    assert listed == {c["conversationId"] for c in written}
    # Through the full API too: the owner's next turn continues after the legacy messages.
    kid = cmz.Principal("legacy_kid", "student")
    cid = written[0]["conversationId"]
    stored = client.conversations.store_turn(kid, "lion", "one more", "and a roar", session_id=cid)
    assert [m["seq"] for m in stored["messages"]] == [9, 10]
