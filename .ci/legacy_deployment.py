"""A legacy deployment's tables, upgraded in place, then the DynamoDB demo on them, as an
operator would do it:

1. tables and items made the legacy way (the boto3 fixture of cmz-dynamo's tests): a parent
   whose password hash is in the legacy PBKDF2 format, an animal with `personality` as a
   map and a configured `systemPrompt`, and a conversation of that parent with a `messages`
   list;
2. the demo refuses to start on them and names `ensure-tables`;
3. `cmz-dynamo ensure-tables` upgrades them and says what it changed; a second run says
   `nothing to change`; no legacy item was touched;
4. the demo starts on them, and over HTTP: the legacy parent logs in with their legacy
   password, `GET /animal_list` shows the legacy animal, `POST /convo_turn` continues the
   legacy conversation, and the history shows the old messages followed by the new turn.

Usage: python3 .ci/legacy_deployment.py --demo BINARY --cmz-dynamo BINARY [--endpoint URL]

Without --endpoint it runs on a DynamoDB Local of its own, started from
CMZ_DYNAMODB_LOCAL_DIR (as .ci/run fetches it) and stopped at the end. DynamoDB Local builds
a GSI added to an existing table on the same ten-thread job pool that sweeps every table
with TTL for expired items, each sweep pausing 10 s: on the long-lived server the test suite
shares, with hundreds of TTL tables, such an index stays CREATING for many minutes.
"""

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import boto3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dynamodb_local  # noqa: E402 (beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "cmz-dynamo", "tests", "fixtures", "legacy_conversation_dynamo.py")

LEGACY_EMAIL = "legacy.parent@example.org"
LEGACY_USER = "legacy_parent"
LEGACY_PASSWORD = "legacy-parent-" + secrets.token_hex(4)
ANIMAL = "leo_001"
SYSTEM_PROMPT = (
    "You are Leo, the lion of Cougar Mountain Zoo. You are sleepy and proud, you love naps in "
    "the sun, and you answer children's questions about lions in a few friendly sentences."
)
# The dev users the demo seeds (CMZ_DEV_USERS=embedded): an admin, and a student who owns
# nothing of the legacy data.
ADMIN = ("admin@cmz.org", "admin123")
STRANGER = ("other@cmz.org", "other123")


def step(text):
    print(f"--- {text}", flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dynamodb_local(logs):
    """A fresh in-memory DynamoDB Local; returns (process, endpoint)."""
    log = open(os.path.join(logs, "legacy-deployment-dynamodb-local.log"), "w")
    return dynamodb_local.start(log=log, heap="256m", timeout=60)


stop = dynamodb_local.stop


def fixture(*args):
    out = subprocess.run([sys.executable, FIXTURE, *args], capture_output=True, text=True, timeout=120)
    check(out.returncode == 0, f"the legacy fixture {args[0]} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


class Http:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, token=None, body=None, expect=200):
        """The JSON answer of a request; fails unless the status is `expect`."""
        request = urllib.request.Request(self.base + path, method=method)
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("content-type", "application/json")
        if token:
            request.add_header("authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        sent = f"{method} {path}" + (f" {json.dumps(body)}" if body is not None else "")
        check(status == expect, f"{sent}: expected HTTP {expect}, got {status}: {text}")
        return json.loads(text) if text else None

    def login(self, email, password):
        answer = self.call("POST", "/auth", body={"username": email, "password": password})
        check(answer.get("token"), f"POST /auth as {email}: no token in {answer}")
        return answer


def ensure_tables(binary, env):
    try:
        return subprocess.run([binary, "ensure-tables"], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(
            f"cmz-dynamo ensure-tables did not finish in 90 s; what it printed:\n{timeout.stdout or ''}"
            f"{timeout.stderr or ''}") from None


def scan_all(client, table):
    """Every item of `table`, in a stable order."""
    items, start = [], None
    while True:
        page = client.scan(TableName=table, ConsistentRead=True, **({"ExclusiveStartKey": start} if start else {}))
        items.extend(page["Items"])
        start = page.get("LastEvaluatedKey")
        if not start:
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", help="an existing DynamoDB (default: a DynamoDB Local of its own)")
    parser.add_argument("--demo", required=True, help="the demo binary built with the dynamo feature")
    parser.add_argument("--cmz-dynamo", required=True, help="the cmz-dynamo binary")
    parser.add_argument("--logs", default=os.path.join(ROOT, "target"), help="where the logs go")
    args = parser.parse_args()
    started = time.monotonic()
    os.makedirs(args.logs, exist_ok=True)
    if args.endpoint:
        run(args, args.endpoint)
    else:
        dynamodb, endpoint = start_dynamodb_local(args.logs)
        print(f"DynamoDB Local of this test on {endpoint} (ready in {time.monotonic() - started:.1f}s)", flush=True)
        try:
            run(args, endpoint)
        finally:
            stop(dynamodb)
    print(f"legacy deployment test passed in {time.monotonic() - started:.1f}s")


def run(args, endpoint):
    prefix = f"ci-legacy-{uuid.uuid4().hex[:8]}-"
    tables = {
        "CONVERSATION_DYNAMO_TABLE_NAME": prefix + "quest-dev-conversation",
        "CONVERSATION_SESSION_TABLE_NAME": prefix + "quest-dev-session",
        "CONVERSATION_MESSAGE_TABLE_NAME": prefix + "quest-dev-conversation-message",
        "USER_DYNAMO_TABLE_NAME": prefix + "quest-dev-user",
        "FAMILY_DYNAMO_TABLE_NAME": prefix + "quest-dev-family",
        "ANIMAL_DYNAMO_TABLE_NAME": prefix + "quest-dev-animal",
        "CMZ_META_TABLE_NAME": prefix + "quest-dev-cmz",
        "CMZ_CARE_TABLE_NAME": prefix + "quest-dev-cmz-care",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CMZ_", "JWT_"))}
    env.update(tables)
    env.update(
        {
            "DYNAMODB_ENDPOINT_URL": endpoint,
            "AWS_REGION": "us-west-2",
            "JWT_SECRET": secrets.token_hex(32),
            "CMZ_DEV_USERS": "embedded",
        }
    )
    client = boto3.client(
        "dynamodb", endpoint_url=endpoint, region_name="us-west-2",
        aws_access_key_id="cmz", aws_secret_access_key="local",
    )
    conversations, sessions = tables["CONVERSATION_DYNAMO_TABLE_NAME"], tables["CONVERSATION_SESSION_TABLE_NAME"]
    users, messages = tables["USER_DYNAMO_TABLE_NAME"], tables["CONVERSATION_MESSAGE_TABLE_NAME"]
    meta = tables["CMZ_META_TABLE_NAME"]

    step(f"1. a legacy deployment's tables and items on {endpoint} (prefix {prefix})")
    directory = fixture(
        "legacy-tables", "--endpoint", endpoint,
        "--conversations", conversations, "--sessions", sessions, "--users", users,
        "--families", tables["FAMILY_DYNAMO_TABLE_NAME"], "--animals", tables["ANIMAL_DYNAMO_TABLE_NAME"],
        "--password", LEGACY_PASSWORD, "--system-prompt", SYSTEM_PROMPT,
    )
    check(directory["userId"] == LEGACY_USER and directory["animalId"] == ANIMAL, f"the fixture wrote {directory}")
    written = fixture(
        "write", "--endpoint", endpoint, "--conversations", conversations, "--sessions", sessions,
        "--count", "1", "--turns", "2", "--user", LEGACY_USER, "--animal", ANIMAL,
    )
    conversation_id = written[0]["conversationId"]
    legacy_item = client.get_item(TableName=conversations, Key={"conversationId": {"S": conversation_id}},
                                  ConsistentRead=True)["Item"]
    legacy_messages = [(m["M"]["role"]["S"], m["M"]["text"]["S"]) for m in legacy_item["messages"]["L"]]
    check(len(legacy_messages) == 4, f"the legacy conversation has {len(legacy_messages)} messages, not 4")
    user_item = client.get_item(TableName=users, Key={"userId": {"S": LEGACY_USER}}, ConsistentRead=True)["Item"]
    legacy_hash = user_item["passwordHash"]["S"]
    check(len(legacy_hash) == 97 and legacy_hash[32] == ":", f"not a legacy PBKDF2 hash: {legacy_hash!r}")
    check("GlobalSecondaryIndexes" not in client.describe_table(TableName=sessions)["Table"],
          "the legacy session table should have no GSI")
    for table in (messages, meta):
        try:
            client.describe_table(TableName=table)
            raise AssertionError(f"cmz's own table {table} should not exist yet")
        except client.exceptions.ResourceNotFoundException:
            pass
    print(f"legacy user {LEGACY_EMAIL} (PBKDF2 hash), animal {ANIMAL} (personality map, systemPrompt), "
          f"conversation {conversation_id} with {len(legacy_messages)} messages")
    before = {name: scan_all(client, tables[name]) for name in (
        "CONVERSATION_DYNAMO_TABLE_NAME", "CONVERSATION_SESSION_TABLE_NAME", "USER_DYNAMO_TABLE_NAME",
        "FAMILY_DYNAMO_TABLE_NAME", "ANIMAL_DYNAMO_TABLE_NAME")}

    step("2. the demo refuses the legacy tables and names the command")
    port = free_port()
    try:
        refused = subprocess.run([args.demo], env={**env, "CMZ_BIND": f"127.0.0.1:{port}"},
                                 capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"the demo kept running on the legacy tables for 60 s:\n{timeout.stdout or ''}"
                             f"{timeout.stderr or ''}") from None
    output = refused.stdout + refused.stderr
    check(refused.returncode != 0, f"the demo started on the legacy tables (exit {refused.returncode}):\n{output}")
    error = next((line for line in refused.stderr.splitlines() if line.startswith("cmz demo:")), "")
    check(error, f"no 'cmz demo:' error line in:\n{output}")
    for expected in ("ensure-tables", sessions, "userId-lastActivity-index", "email-index", messages):
        check(expected in error, f"the startup error does not name {expected!r}:\n{error}")
    print(error)

    step("3. cmz-dynamo ensure-tables upgrades them in place")
    first = ensure_tables(args.cmz_dynamo, env)
    check(first.returncode == 0, f"ensure-tables failed (exit {first.returncode}):\n{first.stdout}\n{first.stderr}")
    print(first.stdout, end="")
    printed = first.stdout.splitlines()
    for change in (
        f"added GSI userId-lastActivity-index to table {sessions} (on-demand)",
        f"added GSI animalId-startTime-index to table {sessions} (on-demand)",
        f"turned on TTL (attribute ttl) for table {sessions}",
        f"created table {messages} (CONVERSATION_MESSAGE_TABLE_NAME)",
        f"turned on TTL (attribute ttl) for table {messages}",
        f"added GSI email-index to table {users} (on-demand)",
        f"created table {meta} (CMZ_META_TABLE_NAME)",
        f"turned on TTL (attribute ttl) for table {meta}",
    ):
        check(change in printed, f"ensure-tables did not print {change!r}:\n{first.stdout}")
    check("nothing to change" not in printed, f"the first run claims nothing to change:\n{first.stdout}")
    check(not first.stderr.strip(), f"ensure-tables warned:\n{first.stderr}")
    again = ensure_tables(args.cmz_dynamo, env)
    check(again.returncode == 0 and again.stdout.strip() == "nothing to change",
          f"the second run should print only 'nothing to change' (exit {again.returncode}):\n{again.stdout}\n{again.stderr}")
    print("second run:", again.stdout.strip())
    for name, items in before.items():
        check(scan_all(client, tables[name]) == items, f"ensure-tables changed the items of {tables[name]} ({name})")
    print("every legacy item is unchanged")

    step("4. the demo starts on the upgraded tables")
    port = free_port()
    log_path = os.path.join(args.logs, f"legacy-deployment-demo-{port}.log")
    with open(log_path, "w") as log:
        demo = subprocess.Popen([args.demo], env={**env, "CMZ_BIND": f"127.0.0.1:{port}"},
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        http = Http(f"http://127.0.0.1:{port}")
        for _ in range(120):
            check(demo.poll() is None, f"the demo exited ({demo.returncode}); its log:\n{open(log_path).read()}")
            try:
                urllib.request.urlopen(http.base + "/system_health", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        else:
            raise AssertionError(f"the demo did not answer /system_health; its log:\n{open(log_path).read()}")
        print(f"demo on {http.base} (log {os.path.relpath(log_path, ROOT)})")
        exercise(http, client, tables, conversation_id, legacy_messages, legacy_item)
    finally:
        stop(demo)


def exercise(http, client, tables, conversation_id, legacy_messages, legacy_item):
    users, messages = tables["USER_DYNAMO_TABLE_NAME"], tables["CONVERSATION_MESSAGE_TABLE_NAME"]
    conversations = tables["CONVERSATION_DYNAMO_TABLE_NAME"]

    animals = http.call("GET", "/animal_list")
    leo = next((a for a in animals if a.get("animalId") == ANIMAL), None)
    check(leo is not None, f"GET /animal_list does not show the legacy animal {ANIMAL}: {animals}")
    check(leo["name"] == "Leo" and leo["species"] == "Lion" and leo["status"] == "active", f"the legacy animal: {leo}")
    check(leo["personality"] == "A sleepy, proud lion who loves naps.",
          f"the personality map should read as its description: {leo}")
    check(SYSTEM_PROMPT not in json.dumps(animals), "GET /animal_list shows the configured prompt")
    print(f"GET /animal_list: {[a['animalId'] for a in animals]}; {ANIMAL} = {leo['name']}, {leo['personality']!r}")

    login = http.login(LEGACY_EMAIL, LEGACY_PASSWORD)
    token = login["token"]
    check(login["user"]["userId"] == LEGACY_USER and login["user"]["role"] == "parent",
          f"POST /auth as {LEGACY_EMAIL}: {login['user']}")
    upgraded = client.get_item(TableName=users, Key={"userId": {"S": LEGACY_USER}}, ConsistentRead=True)["Item"]
    check(upgraded["passwordHash"]["S"].startswith("$argon2id$"),
          f"the legacy hash should be upgraded on login: {upgraded['passwordHash']['S'][:40]}")
    check(upgraded["displayName"]["S"] == "Legacy Parent" and upgraded["familyId"]["S"] == "family_legacy",
          f"the login changed the legacy user's fields: {upgraded}")
    http.call("POST", "/auth", body={"username": LEGACY_EMAIL, "password": "not-" + LEGACY_PASSWORD}, expect=401)
    print(f"POST /auth as {LEGACY_EMAIL} with the legacy password: ok, hash upgraded to argon2id; a wrong one: 401")

    listed = http.call("GET", "/conversations/sessions", token)
    mine = [s for s in listed["sessions"] if s["sessionId"] == conversation_id]
    check(mine, f"GET /conversations/sessions does not list the legacy conversation: {listed}")
    check(mine[0]["messageCount"] == len(legacy_messages), f"the listed legacy session: {mine[0]}")
    detail = http.call("GET", f"/conversations/sessions/{conversation_id}", token)
    shown = [(m["role"], m["content"]) for m in detail["messages"]]
    check(shown == legacy_messages, f"the legacy messages as cmz shows them:\n{shown}\nexpected\n{legacy_messages}")
    print(f"GET /conversations/sessions/{conversation_id}: the {len(shown)} legacy messages, in order")

    question = "Do lions like the rain?"
    body = {"animalId": ANIMAL, "message": question, "sessionId": conversation_id}
    turn = http.call("POST", "/convo_turn", token, body)
    check(turn["sessionId"] == conversation_id, f"POST /convo_turn {body} answered in another session: {turn}")
    check(turn["reply"], f"POST /convo_turn {body}: an empty reply: {turn}")
    check(not turn["replayed"], f"POST /convo_turn {body}: a replayed turn: {turn}")
    check(SYSTEM_PROMPT[:30] not in turn["reply"] and "GUIDELINES" not in turn["reply"],
          f"POST /convo_turn {body}: the reply shows the system prompt: {turn['reply']!r}")
    print(f"POST /convo_turn: turnNumber {turn['turnNumber']}, fallback {turn['fallback']}, reply {turn['reply']!r}")

    expected = legacy_messages + [("user", question), ("assistant", turn["reply"])]
    detail = http.call("GET", f"/conversations/sessions/{conversation_id}", token)
    shown = [(m["role"], m["content"]) for m in detail["messages"]]
    check(shown == expected, f"GET /conversations/sessions/{conversation_id} after the turn:\n{shown}\nexpected\n{expected}")
    times = [m["timestamp"] for m in detail["messages"]]
    check(times == sorted(times), f"the history is not in time order: {times}")
    check(detail["sessionInfo"]["messageCount"] == len(expected), f"sessionInfo after the turn: {detail['sessionInfo']}")
    history = http.call("GET", "/convo_history?sessionId=" + urllib.parse.quote(conversation_id), token)
    shown = [(t["role"], t["content"]) for t in history["turns"]]
    check(shown == expected, f"GET /convo_history?sessionId={conversation_id}:\n{shown}\nexpected\n{expected}")
    print(f"GET /conversations/sessions/{{id}} and /convo_history?sessionId=: "
          f"{len(legacy_messages)} legacy messages, then the new turn")

    admin = http.login(*ADMIN)["token"]
    seen = http.call("GET", f"/conversations/sessions/{conversation_id}", admin)
    check([(m["role"], m["content"]) for m in seen["messages"]] == expected, f"the admin's view: {seen['messages']}")
    stranger = http.login(*STRANGER)["token"]
    http.call("GET", f"/conversations/sessions/{conversation_id}", stranger, expect=404)
    # A turn with its id (a shared browser keeps it) is the stranger's own new conversation.
    joined = http.call("POST", "/convo_turn", stranger, {**body, "message": "Can I join?"})
    check(joined["sessionId"] != conversation_id and joined["turnNumber"] == 1,
          f"POST /convo_turn with someone else's session id did not start a new one: {joined}")
    theirs = http.call("GET", "/conversations/sessions/" + urllib.parse.quote(joined["sessionId"]), stranger)
    check([(m["role"], m["content"]) for m in theirs["messages"]] == [("user", "Can I join?"), ("assistant", joined["reply"])],
          f"the stranger's new conversation: {theirs['messages']}")
    unchanged = http.call("GET", f"/conversations/sessions/{conversation_id}", token)
    check([(m["role"], m["content"]) for m in unchanged["messages"]] == expected,
          f"the legacy conversation after the stranger's turn: {unchanged['messages']}")
    print(f"{ADMIN[0]} reads it; {STRANGER[0]} (owns nothing) gets 404 reading it, and a turn with its id "
          f"is a new conversation of their own ({joined['sessionId']})")

    # In place: the legacy item is never written; the new turn is in cmz's messages table.
    now = client.get_item(TableName=conversations, Key={"conversationId": {"S": conversation_id}},
                          ConsistentRead=True)["Item"]
    check(now == legacy_item, "the legacy conversation item was rewritten")
    stored = client.query(
        TableName=messages, KeyConditionExpression="conversationId = :c",
        ExpressionAttributeValues={":c": {"S": conversation_id}}, ConsistentRead=True,
    )["Items"]
    seqs = sorted(int(item["seq"]["N"]) for item in stored)
    check(seqs and seqs[0] == len(legacy_messages) + 1, f"the new turn's items in {messages}: seq {seqs}")
    check(seqs[-1] <= len(legacy_messages) + 2,
          f"more than the owner's one turn stored under {conversation_id}: seq {seqs}")
    print(f"the legacy item is unchanged; the new turn is in {messages} from seq {seqs[0]}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as failure:
        print(f"legacy deployment test FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
