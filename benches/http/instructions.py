#!/usr/bin/env python3
"""Instructions per request of cmz's demo server, counted by callgrind.

    cargo build --profile profiling -p cmz-examples --bin demo
    python3 benches/http/instructions.py [--requests 2000]

Runs target/profiling/demo under `valgrind --tool=callgrind` on a free loopback port, sends
300 requests to warm it up on one keep-alive connection, zeroes the counters
(`callgrind_control -z`), sends `--requests` more, dumps (`callgrind_control -d`) and prints
the user-space instructions per request, for `POST /convo_turn` (a new conversation each,
as in run.py) and for `GET /system_health` (the same stack with no turn behind it). Unlike
req/s, the count does not move with the machine's other work. Needs valgrind (apt-get) and
PyJWT (pip).
"""

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
import time
import http.client
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = ROOT / "target" / "profiling" / "demo"
HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def token(secret):
    import jwt

    now, user = int(time.time()), "user_student_ana"
    claims = {"user_id": user, "userId": user, "email": "student1@cmz.org", "role": "student",
              "user_type": "student", "exp": now + 86400, "iat": now, "iss": "cmz-api", "sub": user}
    return jwt.encode(claims, secret, algorithm="HS256")


def count(route, requests):
    secret = secrets.token_hex(32)
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="cmz-callgrind-")) / "callgrind.out"
    env = {**os.environ, "JWT_SECRET": secret, "CMZ_BIND": f"{HOST}:{port}", "RUST_LOG": "warn",
           "CMZ_TURN_RATE_LIMIT": "1000000000", "CMZ_DEV_USERS": "embedded"}
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(DEMO)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        connection = None
        for _ in range(300):
            try:
                connection = http.client.HTTPConnection(HOST, port, timeout=30)
                connection.request("GET", "/system_health")
                connection.getresponse().read()
                break
            except OSError:
                connection = None
                time.sleep(0.2)
        if connection is None:
            raise SystemExit("the demo did not start under valgrind")
        headers = {"Authorization": f"Bearer {token(secret)}", "Content-Type": "application/json"}
        body = json.dumps({"animalId": "cougar", "message": "What do cougars eat?"})

        def send(n):
            for _ in range(n):
                if route == "turn":
                    connection.request("POST", "/convo_turn", body, headers)
                else:
                    connection.request("GET", "/system_health", headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"{route}: HTTP {response.status}")

        send(300)
        subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
        send(requests)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    dumped = Path(f"{out}.1")
    summary = subprocess.run(["callgrind_annotate", str(dumped)], capture_output=True, text=True).stdout
    total = int(re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", summary).group(1).replace(",", ""))
    return total / requests


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per route [2000]")
    args = parser.parse_args()
    if not DEMO.exists():
        raise SystemExit(f"{DEMO} is missing: cargo build --profile profiling -p cmz-examples --bin demo")
    turn = count("turn", args.requests)
    health = count("health", args.requests)
    print(f"POST /convo_turn:   {turn:,.0f} instructions per request ({args.requests} requests)")
    print(f"GET /system_health: {health:,.0f} instructions per request (the stack with no turn)")


if __name__ == "__main__":
    main()
