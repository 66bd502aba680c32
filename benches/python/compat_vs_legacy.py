"""cmz.compat against the legacy Python code, in the same run.

1. `store_conversation_turn` + `get_conversation_history` through `cmz.compat` vs the
   legacy boto3 path (`list_append` on one item; the whole item read back), on DynamoDB
   Local: requests, capacity and wall time at turn 1 and turn 400.
2. `verify_jwt_token` (cmz.compat) vs PyJWT's `jwt.decode` on the same HS256 token.

    CMZ_TEST_DYNAMODB_URL=http://127.0.0.1:8000 python3 benches/python/compat_vs_legacy.py

(needs the cmz wheel, boto3 and PyJWT installed, and DynamoDB Local running).
"""

import os
import secrets
import statistics
import sys
import time

import jwt

import cmz
from cmz import compat

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "cmz-dynamo", "tests", "fixtures"))
from legacy_conversation_dynamo import LegacyConversations  # noqa: E402

QUESTION, ANSWER = "q" * 90, "a" * 600
CHECKPOINTS = (1, 400)
SECRET = "bench-secret-0123456789-0123456789-abcdef"


def tables():
    prefix = "bench" + secrets.token_hex(3) + "-"
    names = {
        "CONVERSATION_DYNAMO_TABLE_NAME": "quest-dev-conversation",
        "CONVERSATION_SESSION_TABLE_NAME": "quest-dev-session",
        "CONVERSATION_MESSAGE_TABLE_NAME": "quest-dev-conversation-message",
        "USER_DYNAMO_TABLE_NAME": "quest-dev-user",
        "FAMILY_DYNAMO_TABLE_NAME": "quest-dev-family",
        "ANIMAL_DYNAMO_TABLE_NAME": "quest-dev-animal",
        "CMZ_META_TABLE_NAME": "quest-dev-cmz",
        "CMZ_CARE_TABLE_NAME": "quest-dev-cmz-care",
    }
    return {k: prefix + v for k, v in names.items()}


def storage(endpoint):
    env = dict(tables(), DYNAMODB_ENDPOINT_URL=endpoint, CMZ_DYNAMODB_CREATE_TABLES="1", JWT_SECRET=SECRET)
    client = cmz.Client.from_env(env)
    compat.configure(client)
    legacy = LegacyConversations(endpoint, env["CONVERSATION_DYNAMO_TABLE_NAME"], env["CONVERSATION_SESSION_TABLE_NAME"])
    cmz_id = compat.create_conversation_session("bench_kid", "cougar")
    legacy_id = legacy.create_conversation_session("bench_kid", "cougar", "Cora")
    rows = []
    for turn in range(1, max(CHECKPOINTS) + 1):
        before = client.capacity()
        started = time.perf_counter()
        assert compat.store_conversation_turn(cmz_id, QUESTION, ANSWER, {"tokensPrompt": 120, "latencyMs": 640})  # the user message id
        cmz_store = time.perf_counter() - started
        middle = client.capacity()
        started = time.perf_counter()
        window = compat.get_conversation_history(cmz_id, limit=20)
        cmz_read = time.perf_counter() - started
        after = client.capacity()
        started = time.perf_counter()
        wcu = legacy.store_conversation_turn(legacy_id, QUESTION, ANSWER) + 1.0  # + the session update
        legacy_store = time.perf_counter() - started
        started = time.perf_counter()
        messages, rcu = legacy.get_conversation_history(legacy_id)
        legacy_read = time.perf_counter() - started
        assert len(window) == min(20, 2 * turn) and len(messages) == 2 * turn
        if turn in CHECKPOINTS:
            rows.append(
                {
                    "turn": turn,
                    "cmz": {
                        "storeRequests": middle["requests"] - before["requests"],
                        "storeWcu": middle["writeUnits"] - before["writeUnits"],
                        "storeMs": cmz_store * 1000,
                        "readRequests": after["requests"] - middle["requests"],
                        "readRcu": after["readUnits"] - middle["readUnits"],
                        "readMs": cmz_read * 1000,
                    },
                    "legacy": {
                        "storeRequests": 2,
                        "storeWcu": float(wcu),
                        "storeMs": legacy_store * 1000,
                        "readRequests": 1,
                        "readRcu": float(rcu),
                        "readMs": legacy_read * 1000,
                    },
                }
            )
    return rows


def tokens():
    client = cmz.Client.in_memory(jwt_secret=SECRET, dev_users=False)
    compat.configure(client)
    token = compat.generate_jwt_token({"user_id": "bench_kid", "email": "kid@cmz.org", "role": "student"})
    assert jwt.decode(token, SECRET, algorithms=["HS256"], issuer="cmz-api")["user_id"] == "bench_kid"
    assert compat.verify_jwt_token(token)[1]["user_id"] == "bench_kid"
    n = 20_000

    def rate(fn):
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append(n / (time.perf_counter() - started))
        return statistics.median(runs)

    ours = rate(lambda: compat.verify_jwt_token(token))
    theirs = rate(lambda: jwt.decode(token, SECRET, algorithms=["HS256"], issuer="cmz-api"))
    return ours, theirs


def main():
    endpoint = os.environ.get("CMZ_TEST_DYNAMODB_URL") or sys.exit("set CMZ_TEST_DYNAMODB_URL to a DynamoDB Local")
    print("## store_conversation_turn + get_conversation_history (last 20 messages), DynamoDB Local\n")
    print("| turn | path | store requests | store WCU | store ms | read requests | read RCU | read ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in storage(endpoint):
        for path in ("cmz", "legacy"):
            r = row[path]
            print(
                f"| {row['turn']} | {path} | {r['storeRequests']} | {r['storeWcu']:.1f} | {r['storeMs']:.2f} | "
                f"{r['readRequests']} | {r['readRcu']:.1f} | {r['readMs']:.2f} |"
            )
        c, l = row["cmz"], row["legacy"]
        print(
            f"| {row['turn']} | legacy / cmz | {l['storeRequests'] / c['storeRequests']:.2f}× | {l['storeWcu'] / c['storeWcu']:.1f}× | "
            f"{l['storeMs'] / c['storeMs']:.2f}× | {l['readRequests'] / c['readRequests']:.2f}× | {l['readRcu'] / max(c['readRcu'], 0.5):.1f}× | "
            f"{l['readMs'] / c['readMs']:.2f}× |"
        )
    ours, theirs = tokens()
    print("\n## verify_jwt_token (cmz.compat) vs PyJWT jwt.decode, same HS256 token\n")
    print(f"cmz.compat.verify_jwt_token: {ours:,.0f} ops/s; PyJWT jwt.decode: {theirs:,.0f} ops/s; ratio {ours / theirs:.2f}×")


if __name__ == "__main__":
    main()
