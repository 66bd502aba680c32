"""One turn, two front ends: the same request over HTTP (the demo server built with the
``openai`` feature) and from Python (``cmz.Client``) reaches one OpenAI-compatible server
with identical messages and settings. The server here records what it is sent and answers
in OpenAI's wire format over real HTTP."""

import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

import cmz
from conftest import memory_env


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.chat_bodies = []
        self.lock = threading.Lock()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def do_POST(self):  # noqa: N802 (the stdlib's name)
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
            return
        with self.server.lock:
            self.server.chat_bodies.append(body)
        self._send(
            200,
            {
                "id": "chatcmpl-recorded",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-4o-mini"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Roar! Yes I can."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 42, "completion_tokens": 5, "total_tokens": 47},
            },
        )

    def do_GET(self):  # noqa: N802
        self._send(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo(recorder, tmp_path):
    binary = os.environ.get("CMZ_DEMO_OPENAI_BIN")
    if not binary:
        pytest.fail(
            "CMZ_DEMO_OPENAI_BIN is not set: build the demo with "
            "`cargo build -p cmz-examples --features openai --bin demo` (bash .ci/run does)"
        )
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "CMZ_BIND": f"127.0.0.1:{port}",
            "OPENAI_BASE_URL": recorder.base_url,
            "OPENAI_API_KEY": "sk-recorded",
        }
    )
    for name in ("DYNAMODB_ENDPOINT_URL", "CMZ_MODERATION", "JWT_SECRET"):
        env.pop(name, None)
    log = open(tmp_path / "demo.log", "wb")
    process = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/system_health", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.25)
        else:
            pytest.fail("the demo did not start")
        if process.poll() is not None:
            pytest.fail("the demo exited: " + (tmp_path / "demo.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def post(url, body, token=None):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    if token:
        request.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_same_turn_over_http_and_from_python_reaches_the_model_identically(recorder, demo):
    token = post(demo + "/auth", {"username": "student1@cmz.org", "password": "student123"})["token"]
    over_http = post(
        demo + "/convo_turn",
        {
            "animalId": "cougar",
            "message": "Can you roar?",
            "contextSummary": "We met at the cougar den yesterday.",
            "contextWindow": 3,
            "maxTokens": 120,
            "temperature": 0.4,
            "priority": "high",
            "moderationLevel": "standard",
        },
        token,
    )
    assert over_http["reply"] == "Roar! Yes I can."
    assert len(recorder.chat_bodies) == 1

    client = cmz.Client.from_env(
        memory_env({"OPENAI_BASE_URL": recorder.base_url, "OPENAI_API_KEY": "sk-recorded"})
    )
    me = client.auth.authenticate(client.auth.login("student1@cmz.org", "student123")["token"])
    from_python = client.conversations.turn(
        me,
        "cougar",
        "Can you roar?",
        context_summary="We met at the cougar den yesterday.",
        context_window=3,
        max_tokens=120,
        temperature=0.4,
        priority="high",
        moderation_level="standard",
    )
    assert from_python["reply"] == "Roar! Yes I can."
    assert len(recorder.chat_bodies) == 2

    http_call, python_call = recorder.chat_bodies
    assert http_call == python_call
    # And the settings are the request's, not a front end's own defaults.
    assert http_call["max_tokens"] == 120
    assert abs(http_call["temperature"] - 0.4) < 1e-6
    system = [m["content"] for m in http_call["messages"] if m["role"] == "system"]
    assert any("We met at the cougar den yesterday." in text for text in system)
    assert http_call["messages"][-1] == {"role": "user", "content": "Can you roar?"}


def test_the_defaults_are_the_same_from_both_front_ends(recorder, demo):
    token = post(demo + "/auth", {"username": "student1@cmz.org", "password": "student123"})["token"]
    post(demo + "/convo_turn", {"animalId": "cougar", "message": "Hello!"}, token)
    client = cmz.Client.from_env(
        memory_env({"OPENAI_BASE_URL": recorder.base_url, "OPENAI_API_KEY": "sk-recorded"})
    )
    me = client.auth.authenticate(client.auth.login("student1@cmz.org", "student123")["token"])
    client.conversations.turn(me, "cougar", "Hello!")
    http_call, python_call = recorder.chat_bodies
    assert http_call == python_call
    assert http_call["max_tokens"] == 300
    assert abs(http_call["temperature"] - 0.7) < 1e-6
