"""The seed's checklist against a running demo server: log in, family list, a turn, the
history showing it. Usage: python3 .ci/demo_smoke.py http://127.0.0.1:PORT"""

import json
import sys
import urllib.request

base = sys.argv[1]


def call(method, path, token=None, body=None):
    request = urllib.request.Request(base + path, method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


token = call("POST", "/auth", body={"username": "admin@cmz.org", "password": "admin123"})["token"]
families = call("GET", "/family_list", token)
assert len(families) == 2, families
turn = call("POST", "/convo_turn", token, {"animalId": "cougar", "message": "Hello from CI"})
session = turn["sessionId"]
history = call("GET", "/convo_history?sessionId=" + session, token)
assert [t["content"] for t in history["turns"]][0] == "Hello from CI", history
assert history["turns"][1]["content"] == turn["reply"], history
sessions = call("GET", "/conversations/sessions", token)
assert any(s["sessionId"] == session for s in sessions["sessions"]), sessions
print("demo smoke test passed:", session)
