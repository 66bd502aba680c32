"""A first tour of `import cmz`: log in, chat with an animal (whole and streamed), read the
history, and use the legacy function names. Runs in memory, or on DynamoDB when
DYNAMODB_ENDPOINT_URL is set (with CMZ_DYNAMODB_CREATE_TABLES=1 to create the tables).

    python3 cmz-py/examples/quickstart.py
"""

import asyncio
import os

import cmz
from cmz import compat

if os.environ.get("DYNAMODB_ENDPOINT_URL"):
    client = cmz.Client.from_env(dict(os.environ, CMZ_DEV_USERS="embedded"))
else:
    client = cmz.Client.in_memory()

login = client.auth.login("student1@cmz.org", "student123")
me = client.auth.authenticate(login["token"])
print(f"logged in as {me.user_id} ({me.role})")

reply = client.conversations.turn(me, "cougar", "Hi! Can you roar?")
session = reply["sessionId"]
print(f"Cora: {reply['reply']}")

print("Cora (streaming): ", end="")
for event in client.conversations.stream_turn(me, "cougar", "What do you eat?", session_id=session):
    if event["type"] == "delta":
        print(event["content"], end="", flush=True)
print()


async def later():
    more = await client.conversations.aturn(me, "cougar", "Where do you sleep?", session_id=session)
    return more["turn"]


print(f"turns so far: {asyncio.run(later())}")
for message in client.conversations.history(me, session)["messages"]:
    print(f"  {message['seq']:>2} {message['role']:>9}: {message['text'][:60]}")

try:
    other = client.auth.authenticate(client.auth.login("other@cmz.org", "other123")["token"])
    client.conversations.history(other, session)
except cmz.NotFound as error:
    # A conversation one may not read answers like one that does not exist.
    print(f"another family's user gets {type(error).__name__} ({error.code})")

compat.configure(client)
legacy_id = compat.create_conversation_session(me.user_id, "porcupine")
compat.store_conversation_turn(legacy_id, "Do quills hurt?", "Only if you poke them!", {"tokensPrompt": 42})
print(f"compat history: {[m['text'] for m in compat.get_conversation_history(legacy_id)]}")
valid, claims = compat.verify_jwt_token(login["token"])
print(f"compat verify of our token: {claims['email'] if valid and claims else None}")
