"""The seed's checklist against a running demo server: log in, family list, a turn, the
history showing it; then the legacy React frontend's requests (the public animal list, a
chat under a session id the page makes up, the history pages, the family view), from its
development origin. Usage: python3 .ci/demo_smoke.py http://127.0.0.1:PORT"""

import json
import sys
import time
import urllib.request

base = sys.argv[1]
ORIGIN = "http://localhost:3000"


def call(method, path, token=None, body=None, origin=None):
    request = urllib.request.Request(base + path, method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", "Bearer " + token)
    if origin:
        request.add_header("origin", origin)
    with urllib.request.urlopen(request, timeout=30) as response:
        if origin:
            allowed = response.headers.get("access-control-allow-origin")
            assert allowed == origin, (method, path, allowed)
        text = response.read()
        return json.loads(text) if text else None


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

# The legacy frontend, cross-origin from its development server.
preflight = urllib.request.Request(base + "/convo_turn", method="OPTIONS")
preflight.add_header("origin", ORIGIN)
preflight.add_header("access-control-request-method", "POST")
preflight.add_header("access-control-request-headers", "authorization,content-type")
with urllib.request.urlopen(preflight, timeout=30) as response:
    assert response.headers.get("access-control-allow-origin") == ORIGIN, dict(response.headers)
animals = call("GET", "/animal_list", origin=ORIGIN)
assert animals and all(a["status"] == "active" and a["name"] for a in animals), animals
animal = animals[0]["animalId"]
assert call("GET", "/animal/" + animal, origin=ORIGIN)["animalId"] == animal
student = call("POST", "/auth", body={"username": "student1@cmz.org", "password": "student123"}, origin=ORIGIN)
assert student["user"]["name"], student
made_up = "session_%d" % int(time.time() * 1000)
chat = {"message": "Hello! What do you eat?", "animalId": animal, "sessionId": made_up, "userId": "frontend_user"}
for _ in range(2):
    reply = call("POST", "/convo_turn", student["token"], chat, origin=ORIGIN)
    assert reply["sessionId"] == made_up and reply["reply"] and reply["turnId"] and reply["timestamp"], reply
listing = call("GET", "/conversations/sessions?", student["token"], origin=ORIGIN)
entry = next(s for s in listing["sessions"] if s["sessionId"] == made_up)
assert entry["status"] in ("active", "completed", "archived") and entry["timestamp"], entry
assert entry["messageCount"] == 4 and entry["lastMessage"] == reply["reply"] and entry["userName"], entry
viewer = call("GET", "/conversations/sessions/" + made_up, student["token"], origin=ORIGIN)
assert [m["role"] for m in viewer["messages"]] == ["user", "assistant"] * 2, viewer
assert viewer["sessionInfo"]["animalId"] == animal and viewer["sessionInfo"]["createdAt"], viewer
parent = call("POST", "/auth", body={"username": "parent@cmz.org", "password": "parent123"}, origin=ORIGIN)
family = call("GET", "/convo_history?parentUserId=" + parent["user"]["userId"], parent["token"], origin=ORIGIN)
assert any(s["sessionId"] == made_up for s in family["sessions"]), family
print("legacy frontend requests passed:", made_up)
